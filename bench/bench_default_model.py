"""The default model through every deployment variant: accuracy table and bundle sizes.

    python bench/bench_default_model.py                    # embedded default model, n = 500
    python bench/bench_default_model.py --model CKPT --n 100 --only int4-ort,fp8-r25-copy

Same as `step3-edge eval --variants` (step3_edge/variants.py), with its defaults: the
first 500 held-out examples, results in bench/results/default_model_variants-<machine>.json
(with every answer that differs from the reference's). Variants: reference model, cpu int8 and int4
bundles through ONNX Runtime, the l20 fp8 bundle in the torch runtime with all experts
resident, and with 25% resident (misses computed on the CPU / copied into the cache).
Prints a table; asserts nothing (the CI version is tests/test_default_model_variants.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch and ORT share the cores: no spinning

from hostinfo import host, results_path  # noqa: E402
from step3_edge.defaults import default_model  # noqa: E402
from step3_edge.tasks import EVAL_SEED  # noqa: E402
from step3_edge.variants import VARIANTS, parse_only, run_variants  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def portable(text: str) -> str:
    """`text` without this machine's paths: the repository relative, the home folder as ~."""
    return text.replace(f"{REPO}/", "").replace(str(Path.home()), "~")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="checkpoint (default: the embedded default model)")
    p.add_argument("--n", type=int, default=500, help="held-out examples (default 500)")
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--only", help="comma list of: " + ", ".join(VARIANTS))
    p.add_argument("--work", type=Path, help="bundle folder (default: the cache)")
    p.add_argument("--rebuild", action="store_true", help="export the bundles again")
    p.add_argument("--runtime-dtype", choices=["bfloat16", "float32"])
    p.add_argument("--out", type=Path, help="JSON results (default "
                   "bench/results/default_model_variants-<machine>.json)")
    args = p.parse_args(argv)

    model = args.model or default_model()
    t0 = time.perf_counter()
    report = run_variants(model, args.n, seed=args.seed, only=parse_only(args.only),
                          work=args.work, rebuild=args.rebuild,
                          runtime_dtype=args.runtime_dtype, progress=sys.stderr.isatty())
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"model {model}  n={args.n}  seed {args.seed}  ({time.perf_counter() - t0:.0f} s, "
          f"{os.cpu_count()} cores, load average {load and round(load[0], 2)})")
    print(report.table())
    machine = host()
    data = {**report.to_json(), "host": {**machine, "load_average": load,
                                         "platform": platform.platform()},
            "total_s": round(time.perf_counter() - t0, 1)}
    out = args.out or results_path("default_model_variants", machine)
    out.write_text(portable(json.dumps(data, indent=2)) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
