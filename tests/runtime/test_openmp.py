"""`release_openmp_team` hands back the calling thread's OpenMP workers (runtime/openmp.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from runtime_helpers import FIXED_BW

from step3_edge.runtime.openmp import _pause, release_openmp_team


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(_pause() is None, reason="this torch does not run on GNU OpenMP")
def test_release_frees_the_calling_threads_team() -> None:
    got: dict[str, object] = {}

    def work() -> None:                      # a fresh thread: its first parallel op makes a team
        prev = torch.get_num_threads()       # (a runtime loaded earlier may have set 1)
        torch.set_num_threads(2)
        before = _threads()
        x = torch.randn(1 << 22)
        torch.add(x, 1.0, out=x)             # 4M elements: well over the grain size
        got["with_team"] = _threads()
        got["released"] = release_openmp_team()
        deadline = time.monotonic() + 5
        while _threads() > before and time.monotonic() < deadline:
            time.sleep(0.01)
        got["before"], got["after"] = before, _threads()
        torch.set_num_threads(prev)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert got["released"] is True
    assert got["with_team"] == got["before"] + 1
    assert got["after"] == got["before"]


SCRIPT = r"""
import json, os, sys, threading, time
import torch
from step3_edge.runtime import Step3Runtime

def threads():
    return len(os.listdir("/proc/self/task"))

torch.set_num_threads(2)
torch.randn(1 << 22).add_(1.0)                      # the main thread owns a team
rt = Step3Runtime.load(sys.argv[1], device="cpu", vision=False,
                       bandwidths=json.loads(sys.argv[2]))
after_load = threads()                              # load handed the main thread's team back

done, leave = threading.Barrier(3), threading.Event()

def caller(i):                                      # stays alive until counted
    torch.randn(1 << 22).add_(1.0)                  # a caller's own torch work (a team)
    rt.generate([3 + i, 7, 11], max_new_tokens=4)   # submit hands it back
    done.wait()
    leave.wait()

ts = [threading.Thread(target=caller, args=(i,)) for i in range(2)]
for t in ts:
    t.start()
done.wait()
deadline = time.monotonic() + 10                    # the scheduler frees its team when idle
while (idle := threads()) > after_load + 2 and time.monotonic() < deadline:
    time.sleep(0.05)
# the count the wait ended on (a thread that starts or ends after it is not a kept team)
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(after_load + 2, idle, names)                  # + the two callers, without teams
leave.set()
for t in ts:
    t.join()
rt.close()
"""


@pytest.mark.skipif(_pause() is None, reason="this torch does not run on GNU OpenMP")
def test_runtime_leaves_no_team_but_the_working_engines(bundle) -> None:
    """The main thread's team (from before the load), the callers' and the idle scheduler's
    are all handed back: with any of them kept, libgomp throttles the engine's workers."""

    out = subprocess.run([sys.executable, "-c", SCRIPT, str(bundle), json.dumps(FIXED_BW)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    after_load, idle, names = out.stdout.split(maxsplit=2)
    assert int(idle) == int(after_load), names
