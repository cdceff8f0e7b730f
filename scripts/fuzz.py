"""Seeded fuzzing of every input step3-edge reads: config.json, the safetensors index, the
checkpoint's shards, an exported bundle (manifest, artifacts, tokenizer files), images, chat
templates, the runtime's load options, prompts and sampling, and a bundle with ONNX graphs.
Each case mutates a pristine tiny synthetic input, runs what the CLI and runtime run on it
(`runtime` and `onnx`: `Step3Runtime.load` and one short generation), and is sorted into:

    ok      accepted, and the result passes the kind's correctness check
    clean   refused with a Step3EdgeError
    crash   any other exception (a traceback a user would see)
    hang    past the per-case time limit
    silent  accepted although the input was damaged in a way that must be refused

    python scripts/fuzz.py --cases 1000 --seed 1 [--kinds config,index,...] [--onnx]

The test suite (tests/test_fuzz.py) runs a few dozen cases per kind on every CI run.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import io
import os
import random
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fuzz_inputs import Silent, corrupt_bytes, mutate_json  # noqa: E402
from fuzz_runtime import Fuzzer  # noqa: E402

__all__ = ["KINDS", "Fuzzer", "Report", "corrupt_bytes", "fuzz", "mutate_json", "run_case"]

KINDS = ("config", "index", "checkpoint", "bundle", "image", "template", "runtime", "onnx")
LIMIT_S = {"config": 20, "index": 20, "checkpoint": 60, "bundle": 60, "image": 60,
           "template": 20, "runtime": 60, "onnx": 90}
STATUSES = ("ok", "clean", "crash", "hang", "silent")
class _Hang(BaseException):
    pass


@dataclass
class Outcome:
    kind: str
    case: int
    status: str
    detail: str = ""


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)

    def counts(self, kind: str) -> Counter:
        return Counter(o.status for o in self.outcomes if o.kind == kind)

    def bad(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status in ("crash", "hang", "silent")]

    def table(self) -> str:
        head = f"{'kind':<11}{'cases':>7}" + "".join(f"{s:>8}" for s in STATUSES)
        rows = [head, "-" * len(head)]
        for kind in dict.fromkeys(o.kind for o in self.outcomes):
            c = self.counts(kind)
            rows.append(f"{kind:<11}{sum(c.values()):>7}" + "".join(f"{c[s]:>8}"
                                                                    for s in STATUSES))
        return "\n".join(rows)


# ---------------------------------------------------------------------------- running
@contextlib.contextmanager
def _time_limit(seconds: float):
    def fire(*_):
        raise _Hang()
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_case(kind: str, case: int, fn: Callable[[], None]) -> Outcome:
    from step3_edge.errors import Step3EdgeError

    t0 = time.monotonic()
    try:
        with _time_limit(LIMIT_S[kind]), contextlib.redirect_stdout(io.StringIO()):
            fn()
        status, detail = "ok", ""
    except Step3EdgeError as e:
        status, detail = "clean", str(e).splitlines()[0][:160]
    except Silent as e:
        status, detail = "silent", str(e)[:300]
    except _Hang:
        status, detail = "hang", f"over {LIMIT_S[kind]} s"
    except KeyboardInterrupt:
        raise
    except BaseException as e:                      # noqa: BLE001 - the point is to catch all
        tb = traceback.extract_tb(e.__traceback__)[-1]
        status = "crash"
        detail = f"{type(e).__name__}: {str(e)[:160]} at {Path(tb.filename).name}:{tb.lineno}"
    if status != "hang" and time.monotonic() - t0 > LIMIT_S[kind]:
        status, detail = "hang", f"{time.monotonic() - t0:.0f} s"
    return Outcome(kind, case, status, detail)


def fuzz(kinds: list[str], cases: int, seed: int, work: Path, onnx: bool = False,
         progress: bool = False, log: Any = None) -> Report:
    """`cases` cases of each kind, reproducible from `seed` (`log`: a file each case's kind
    and number are written to before it runs)."""
    fz = Fuzzer(work, onnx)
    report = Report()
    for kind in kinds:
        make = fz.make(kind)
        for i in range(cases):
            r = random.Random(f"{seed}:{kind}:{i}")
            try:
                fn = make(r)
            except Exception as e:                       # noqa: BLE001 - a mutator bug
                report.outcomes.append(Outcome(kind, i, "crash", f"mutator: {e!r}"))
                continue
            if log is not None:                  # a case that kills the process is named
                log.write(f"{kind} {i}\n")
                log.flush()
            report.outcomes.append(run_case(kind, i, fn))
            if progress and (i + 1) % 100 == 0:
                print(f"  {kind}: {i + 1}/{cases}", file=sys.stderr, flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cases", type=int, default=1000, help="cases per input kind")
    p.add_argument("--seed", type=int, default=0, help="the seed every case derives from")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated input kinds")
    p.add_argument("--work", default=None, help="folder for the pristine inputs (kept)")
    p.add_argument("--onnx", action="store_true",
                   help="the bundle kind fuzzes a bundle with ONNX graphs (the onnx kind "
                   "always does)")
    p.add_argument("--max-mem-gib", type=float, default=8.0,
                   help="address-space limit of this process (an allocation past it is a "
                   "MemoryError, reported as a crash; 0: none)")
    args = p.parse_args(argv)
    if args.max_mem_gib:
        import resource

        limit = int(args.max_mem_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="step3-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    faulthandler.enable()                       # a segfault prints where it happened
    with open(work / "cases.log", "w") as log:
        report = fuzz(args.kinds.split(","), args.cases, args.seed, work, args.onnx, True,
                      log)
    print(report.table())
    print(f"\n{len(report.outcomes)} cases in {time.monotonic() - t0:.0f} s (seed {args.seed})")
    shown = Counter((o.kind, o.status, o.detail.split(" at ")[-1]) for o in report.bad())
    for (kind, status, _), n in shown.most_common(20):
        first = next(o for o in report.bad() if o.kind == kind and o.status == status)
        print(f"{status:<7}{kind:<11} x{n:<5} case {first.case}: {first.detail}")
    return 1 if report.bad() else 0


if __name__ == "__main__":
    sys.exit(main())
