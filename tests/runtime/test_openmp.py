"""`release_openmp_team` hands back the calling thread's OpenMP workers (runtime/openmp.py)."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

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
