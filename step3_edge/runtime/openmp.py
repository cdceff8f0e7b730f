"""Keep the engine thread the only owner of an OpenMP team.

With GNU OpenMP (the runtime in torch's Linux wheels) every thread that starts a parallel region
owns a team of worker threads, kept alive as long as that thread lives. `Step3Runtime` steps its
engine on the scheduler thread; once another thread (the one that loaded the weights, or one
that preprocessed an image) also owns a team, libgomp counts more OpenMP threads than cores and
stops spinning between parallel regions, so each of a decode step's ~1,700 small parallel ops
waits for its workers to wake: 1.7-2x per step on two cores (`bench/bench_decode_thread.py`).

`release_openmp_team` hands back the calling thread's team with the OpenMP 5.0 call
`omp_pause_resource_all(omp_pause_soft)`, which torch does not expose; libgomp frees only the
caller's own pool, and the team is rebuilt if that thread opens a parallel region again. It is
a no-op where the process has no libgomp (macOS and Windows builds use other runtimes, whose
pause is process-wide, so it is not called there) or a libgomp older than GCC 9's.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path

import torch                    # loads the OpenMP runtime before it is looked up

OMP_PAUSE_SOFT = 1


@functools.cache
def _pause() -> Callable[[int], int] | None:
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return None
    libs = {line.split()[-1] for line in maps.read_text().splitlines()
            if "/libgomp" in line and ".so" in line}
    if not libs:
        return None
    here = str(Path(torch.__file__).parent)         # torch's own copy when another is loaded
    path = min(libs, key=lambda p: (not p.startswith(here), p))
    fn = getattr(ctypes.CDLL(path), "omp_pause_resource_all", None)           # GCC >= 9
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn


def release_openmp_team() -> bool:
    """Free the calling thread's OpenMP worker team, if it has one; True when libgomp took the
    call. Call it from threads other than the engine's after they are done with torch work."""
    fn = _pause()
    return fn is not None and fn(OMP_PAUSE_SOFT) == 0
