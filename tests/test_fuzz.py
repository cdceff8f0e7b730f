"""A bounded run of the seeded fuzzer (scripts/fuzz.py) on every input kind: each case must
end in a correct result or a Step3EdgeError; no traceback, hang or silent acceptance. The
seed is fresh on every run and printed on failure (rerun with `python scripts/fuzz.py --seed
SEED --cases N --kinds KIND`); STEP3_FUZZ_CASES sets the cases per kind."""

from __future__ import annotations

import importlib.util
import os
import random
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "step3_fuzz", Path(__file__).resolve().parents[1] / "scripts" / "fuzz.py")
fuzz = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = fuzz              # dataclasses look their module up there
_SPEC.loader.exec_module(fuzz)

CASES = int(os.environ.get("STEP3_FUZZ_CASES", "20"))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("kind", fuzz.KINDS)
def test_fuzzed_inputs_end_in_a_result_or_a_clean_error(work: Path, kind: str) -> None:
    seed = random.SystemRandom().randrange(2**32)
    report = fuzz.fuzz([kind], CASES, seed, work)
    bad = report.bad()
    assert not bad, (f"seed {seed}: " + "; ".join(f"case {o.case} {o.status}: {o.detail}"
                                                  for o in bad[:5]))
    counts = report.counts(kind)
    assert sum(counts.values()) == CASES and counts["clean"] > 0


def test_the_mutators_change_their_input() -> None:
    r = random.Random()
    base = {"a": [1, 2, {"b": "x"}], "c": 3.5}
    changed = sum(fuzz.mutate_json(__import__("copy").deepcopy(base), r) != base
                  for _ in range(50))
    assert changed > 40
    raw = bytes(r.randrange(256) for _ in range(100))
    assert sum(fuzz.corrupt_bytes(raw, r) != raw for _ in range(50)) > 40


def test_a_thread_count_no_thread_team_can_start_is_refused_before_loading() -> None:
    """threads=2**20 reached torch.set_num_threads and killed the process (SIGSEGV)."""
    from step3_edge.errors import ConfigError
    from step3_edge.runtime.options import MAX_THREADS, RuntimeOptions

    for key in ("threads", "ort_threads", "afd_threads"):
        with pytest.raises(ConfigError, match=f"give {key} as at most {MAX_THREADS}"):
            RuntimeOptions.from_kwargs(**{key: 2**20})
        RuntimeOptions.from_kwargs(**{key: 2})


def test_a_device_no_backend_runs_on_is_refused_before_loading() -> None:
    """device='meta' passed the check and reached the CUDA probe (an AssertionError)."""
    from step3_edge.errors import ConfigError
    from step3_edge.runtime.options import RuntimeOptions

    for dev in ("meta", "mps", "xpu:0"):
        with pytest.raises(ConfigError, match="give 'cpu', 'cuda' or 'cuda:N'"):
            RuntimeOptions.from_kwargs(device=dev)
    assert RuntimeOptions.from_kwargs(device="cuda:1").device == "cuda:1"
