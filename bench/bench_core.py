"""Core benchmarks: write and load the `mini` checkpoint, reference decode speed.

Each phase runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own. Prints a table
and writes bench/results/core-<machine>.json.

    python bench/bench_core.py [--preset mini] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hostinfo import host, results_path

PHASES = {
    "write bf16": """
from step3_edge.config import Step3Config; from step3_edge.synth import write_checkpoint
write_checkpoint(Step3Config.preset('{preset}'), '{d}/bf16', 'bf16', progress=False)""",
    "write block-fp8": """
from step3_edge.config import Step3Config; from step3_edge.synth import write_checkpoint
write_checkpoint(Step3Config.preset('{preset}'), '{d}/fp8', 'block-fp8', progress=False)""",
    "check (headers only)": """
from step3_edge.checkpoint import CheckpointReader; CheckpointReader('{d}/fp8').check()""",
    "load bf16 -> fp32": """
import torch; from step3_edge.model import Step3ForConditionalGeneration
Step3ForConditionalGeneration.from_pretrained('{d}/bf16', torch.float32)""",
    "load block-fp8 -> bf16": """
import torch; from step3_edge.model import Step3ForConditionalGeneration
Step3ForConditionalGeneration.from_pretrained('{d}/fp8', torch.bfloat16)""",
}

DECODE = """
import json, time, torch
from step3_edge.model import Step3ForConditionalGeneration
torch.manual_seed(0)
m = Step3ForConditionalGeneration.from_pretrained('{d}/bf16', torch.{dtype})
ids = torch.randint(3, 128000, (1, 16))
m.generate(ids, max_new_tokens=2)                   # warm-up
t = time.perf_counter(); out = m.generate(ids, max_new_tokens={tokens})
dt = time.perf_counter() - t
print(json.dumps({{"tokens_per_s": ({tokens} - 1) / dt, "seconds": dt}}))
"""


def _run(code: str) -> tuple[float, float, str]:
    wrapper = ("import resource, time, sys\nt0 = time.perf_counter()\n" + code +
               "\nprint('__S__', time.perf_counter() - t0, "
               "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
    p = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True,
                       check=True)
    line = [x for x in p.stderr.splitlines() if x.startswith("__S__")][-1].split()
    return float(line[1]), int(line[2]) / 2**10, p.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        for name, code in PHASES.items():
            secs, rss, _ = _run(code.format(d=d, preset=args.preset))
            size = sum(f.stat().st_size for f in Path(d, "fp8" if "fp8" in name else "bf16")
                       .glob("*.safetensors")) / 2**20 if name.startswith("write") else None
            results[name] = {"seconds": round(secs, 2), "peak_rss_mib": round(rss),
                             **({"size_mib": round(size)} if size else {})}
        for dtype in ("float32", "bfloat16"):
            secs, rss, out = _run(DECODE.format(d=d, dtype=dtype, tokens=args.tokens))
            results[f"decode b=1 {dtype}"] = {**json.loads(out), "peak_rss_mib": round(rss)}
    machine = host()
    print(f"{args.preset} preset on {machine['cpu']} ({', '.join(machine['simd_flags'])})")
    print(f"{'phase':28} {'seconds':>8} {'peak RSS MiB':>13} {'size MiB':>9} {'tok/s':>7}")
    for name, r in results.items():
        print(f"{name:28} {r.get('seconds', 0):8.2f} {r['peak_rss_mib']:13} "
              f"{r.get('size_mib', ''):>9} {r.get('tokens_per_s', 0):7.1f}")
    out = results_path("core", machine)
    out.write_text(json.dumps({"host": machine, "preset": args.preset, "time": time.ctime(),
                               "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
