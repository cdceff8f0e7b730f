"""Which thread runs the decode step, and what it costs (CPU decode at batch 1).

`Step3Runtime` runs its engine on a scheduler thread. With GNU OpenMP, every thread that
starts parallel regions owns a team of threads; when another thread (the one that loaded the
weights, say) also keeps one, there are more OpenMP threads than cores and libgomp stops
spinning between regions, so each of the step's ~1,700 small parallel ops waits for its
workers to wake. The runtime therefore hands back every other thread's team
(`runtime/openmp.py`). This measures one decode step of the `mini` bundle (bf16, all experts
resident) driven directly through the engine, each case in a fresh process so that the teams
are as described:

- main:      loaded and stepped on the main thread (one team, the best case);
- runtime:   loaded on the main thread, stepped on a second thread, as the runtime does (the
             load hands the main thread's team back);
- main-team: the same, but the main thread opens a parallel region again after loading and so
             keeps a team (what the runtime did before runtime/openmp.py).

    python bench/bench_decode_thread.py [--work DIR] [--new-tokens 32] [--out JSON]

Prints ms per step, tokens/s, the fraction of the roofline (bench_runtime's definition) and
each case against `main-team`; writes bench/results/decode_thread-<machine>.json. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_runtime import bandwidth, bytes_per_step, mini_bundle  # noqa: E402
from hostinfo import host, results_path  # noqa: E402

CASES = ("main", "runtime", "main-team")


def step_time(rt, batch: int, new: int) -> tuple[float, float]:
    """Best of 3: seconds per decode step of `batch` sequences (32-token prompts), and the
    routed experts one step touched on average."""
    eng = rt.engine
    best, experts = float("inf"), 0.0
    with torch.inference_mode(), rt.scheduler.engine_lock:
        for _ in range(3):
            seqs = [eng.attn.kv.allocate(32 + new + 1) for _ in range(batch)]
            ids = [list(range(3 + b, 35 + b)) for b in range(batch)]
            for s, i in zip(seqs, ids):
                eng.run([(s, len(i))], eng.attn.embed_tokens(i))
            tok = [5] * batch
            a0 = eng.ffn.store.stats.accesses
            t0 = time.perf_counter()
            for _ in range(new):
                logits = eng.run([(s, 1) for s in seqs], eng.attn.embed_tokens(tok))
                tok = logits.argmax(-1).tolist()
            dt = (time.perf_counter() - t0) / new
            if dt < best:
                best, experts = dt, (eng.ffn.store.stats.accesses - a0) / new
            for s in seqs:
                eng.attn.kv.release(s)
    return best, experts


def run_case(case: str, bundle: Path, new: int) -> dict:
    from step3_edge.runtime import Step3Runtime

    rt = Step3Runtime.load(bundle, device="cpu", dtype="bfloat16", vision=False)
    out: dict = {}

    def measure() -> None:
        for batch in (1, 16):
            s, experts = step_time(rt, batch, new)
            out[batch] = {"ms_per_step": 1e3 * s, "tokens_per_s": batch / s,
                          "bytes_per_step": bytes_per_step(rt, experts, batch, 32 + new // 2)}

    if case == "main":
        measure()
    else:
        if case == "main-team":
            torch.randn(1 << 22).add_(1.0)          # a parallel op: the main thread's team again
        t = threading.Thread(target=measure)
        t.start()
        t.join()
    rt.close()
    return {str(b): out[b] for b in (1, 16)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/step3-edge-bench-runtime")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)   # one case, this process
    p.add_argument("--out", type=Path,
                   help="JSON results (default bench/results/decode_thread-<machine>.json)")
    args = p.parse_args(argv)
    _, bundle = mini_bundle(Path(args.work))
    if args.case:
        print(json.dumps(run_case(args.case, bundle, args.new_tokens)))
        return 0
    bw = bandwidth()
    res: dict = {"host": host(), "threads": torch.get_num_threads(), "cores": os.cpu_count(),
                 "bandwidth_GBps": bw / 1e9, "new_tokens": args.new_tokens, "cases": {}}
    for case in CASES:          # each in a fresh process: OpenMP teams live as long as it
        cmd = [sys.executable, __file__, "--case", case, "--work", args.work,
               "--new-tokens", str(args.new_tokens)]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        res["cases"][case] = json.loads(line.strip().splitlines()[-1])
    print(f"bandwidth {bw / 1e9:.1f} GB/s (512 MiB copy), {res['threads']} torch threads")
    for batch in ("1", "16"):
        base = res["cases"]["main-team"][batch]["ms_per_step"]
        for case in CASES:
            r = res["cases"][case][batch]
            r["roofline_fraction"] = r["bytes_per_step"] / bw / (r["ms_per_step"] / 1e3)
            r["speedup_vs_main_team"] = base / r["ms_per_step"]
            print(f"batch {batch:>2}  {case:<9} {r['ms_per_step']:6.2f} ms/step "
                  f"{r['tokens_per_s']:7.1f} tok/s  {100 * r['roofline_fraction']:5.1f}% of "
                  f"roofline  {r['speedup_vs_main_team']:.2f}x vs main-team")
    out = args.out or results_path("decode_thread", res["host"])
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
