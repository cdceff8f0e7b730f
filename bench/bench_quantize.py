"""Benchmark `step3-edge quantize`: throughput and peak memory, mini vs a model twice its size.

    .venv/bin/python bench/bench_quantize.py [--targets a10 l20 cpu] [--workdir DIR]

Writes the `mini` block-fp8 checkpoint and `mini-2x` (16 layers, 96 experts: twice the layers
and experts, ~2x the bytes, stacked expert tensors twice as large), then converts each in a
fresh subprocess while a thread samples memory every 5 ms:
- rss:  resident set. It counts the pages of the memory-mapped source shards the process has
        touched (safetensors reads through mmap), so it grows with what was read even though
        the kernel can drop those clean pages at any time; it is not what bounds the run.
- anon: rss - shared = RssAnon, the process's own heap (tensors, Python). This is the number
        that must not grow with model size.
- uss:  unique set size (psutil memory_full_info, sampled every 100 ms); it includes private
        clean file pages too, so it sits between anon and rss.
Peaks are reported above the baseline measured just before the conversion starts. The source
shards were just written, so they are in the page cache: the throughput is CPU-bound, not
disk-bound. The projection divides the real step3-fp8 size (~326 GB) by the measured GB/s.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from hostinfo import host, results_path


REAL_STEP3_FP8_GB = 326.0


def _mini_2x() -> dict:
    from step3_edge.presets import PRESETS

    d = copy.deepcopy(PRESETS["mini"])
    t = d["text_config"]
    t["num_hidden_layers"] = 16
    t["moe_layers_enum"] = ",".join(str(i) for i in range(1, 15))
    t["moe_num_experts"] = 96
    return d


def _real_shape_layer() -> dict:
    """One decoder layer of the real Step3 (hidden 7168, MFA, 5120-wide experts; 4 experts
    instead of 48), small vocab and mini's vision tower: real matrix shapes, ~0.8 GB."""
    from step3_edge.presets import PRESETS

    d = copy.deepcopy(PRESETS["full"])
    d["text_config"].update(num_hidden_layers=1, moe_layers_enum="0", moe_num_experts=4,
                            vocab_size=4096)
    d["image_token_id"] = 4000
    d["vision_config"] = copy.deepcopy(PRESETS["mini"]["vision_config"])
    return d


def _config(name: str) -> dict:
    from step3_edge.presets import PRESETS

    return {"mini": lambda: PRESETS["mini"], "mini-2x": _mini_2x,
            "real-layer": _real_shape_layer}[name]()


def _real_composition() -> tuple[float, float]:
    """GB of the real step3-fp8 that are requantized (block-fp8 linears) and copied (bf16)."""
    from step3_edge.config import Step3Config
    from step3_edge.layout import expected_weights
    from step3_edge.quantize.schemes import BF16, BlockFP8

    specs = expected_weights(Step3Config.preset("full")).values()
    fp8 = sum(BlockFP8().nbytes(s.shape) for s in specs if s.is_linear) / 1e9
    bf16 = sum(BF16().nbytes(s.shape) for s in specs if not s.is_linear) / 1e9
    return fp8, bf16


def _ensure_source(work: Path, name: str) -> Path:
    from step3_edge.config import Step3Config
    from step3_edge.synth import write_checkpoint

    out = work / f"{name}-fp8"
    if (out / "config.json").is_file():
        return out
    cfg = Step3Config.from_dict(_config(name))
    t0 = time.perf_counter()
    write_checkpoint(cfg, out, "block-fp8", seed=0, overwrite=True, progress=False)
    print(f"  synth {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return out


class _Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process()
        self.peak = {"rss": 0, "anon": 0, "uss": 0}
        self.stop = threading.Event()

    def sample(self, full: bool) -> None:
        m = self.proc.memory_info()
        self.peak["rss"] = max(self.peak["rss"], m.rss)
        self.peak["anon"] = max(self.peak["anon"], m.rss - m.shared)
        if full:
            self.peak["uss"] = max(self.peak["uss"], self.proc.memory_full_info().uss)

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            self.sample(i % 20 == 0)
            i += 1
            time.sleep(0.005)


def child(src: str, out: str, target: str, threads: int) -> None:
    """One conversion in this (fresh) process; prints a JSON line."""
    import torch

    from step3_edge.quantize.convert import convert_checkpoint

    torch.set_num_threads(threads)
    proc = psutil.Process()
    m, full = proc.memory_info(), proc.memory_full_info()
    base = {"rss": m.rss, "anon": m.rss - m.shared, "uss": full.uss}
    sampler = _Sampler()
    sampler.start()
    t0 = time.perf_counter()
    res = convert_checkpoint(src, out, target, overwrite=True, progress=False)
    secs = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    sampler.sample(True)
    summary = {r["scheme"]: r["rel_fro"] for r in res.report.summary()}
    split = {k: {"bytes": sum(t.source_bytes for t in res.report.tensors if t.copied == c),
                 "seconds": sum(t.seconds for t in res.report.tensors if t.copied == c)}
             for k, c in (("requantized", False), ("copied", True))}
    print(json.dumps({"target": target, "seconds": secs, "source_bytes": res.source_bytes,
                      "output_bytes": res.output_bytes, "base": base, "peak": sampler.peak,
                      "rel_fro": summary, "split": split}))
    shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", nargs="+", default=["a10", "l20", "cpu"])
    ap.add_argument("--models", nargs="+", default=["mini", "mini-2x", "real-layer"])
    ap.add_argument("--workdir", default="/tmp/step3-edge-bench")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the conversion "
                    "(1 default: on a shared 2-core machine, 2 threads spin against other "
                    "jobs and ran 2-6x slower)")
    ap.add_argument("--child", nargs=3, metavar=("SRC", "OUT", "TARGET"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, args.threads)
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        src = _ensure_source(work, name)
        for target in args.targets:
            p = subprocess.run([sys.executable, __file__, "--child", str(src),
                                str(work / f"{name}-{target}"), target,
                                "--threads", str(args.threads)],
                               capture_output=True, text=True, check=True)
            r = json.loads(p.stdout.strip().splitlines()[-1])
            r["model"] = name
            rows.append(r)
            _print_row(r)
    _print_summary(rows, args.threads)
    out = results_path("quantize")
    out.write_text(json.dumps({"host": host(), "rows": rows}, indent=2) + "\n")
    print(f"\nraw numbers: {os.path.relpath(out)}")


def _mb(x: float) -> str:
    return f"{x / 2**20:7.1f}"


def _print_row(r: dict) -> None:
    if not getattr(_print_row, "done", False):
        print(f"{'model':<8}{'target':<7}{'src GB':>8}{'out GB':>8}{'s':>7}{'GB/s':>7}"
              f"{'rssMiB':>9}{'anonMiB':>9}{'ussMiB':>9}   (peak above baseline)  rel fro")
        _print_row.done = True
    d = {k: r["peak"][k] - r["base"][k] for k in ("rss", "anon", "uss")}
    q = {k: v for k, v in r["rel_fro"].items() if k != "bf16"}
    print(f"{r['model']:<8}{r['target']:<7}{r['source_bytes'] / 1e9:8.3f}"
          f"{r['output_bytes'] / 1e9:8.3f}{r['seconds']:7.2f}"
          f"{r['source_bytes'] / 1e9 / r['seconds']:7.3f} {_mb(d['rss'])}  {_mb(d['anon'])}  "
          f"{_mb(d['uss'])}   {'':22}{json.dumps(q)}", flush=True)


def _rate(rows: list[dict], kind: str) -> float:
    b = sum(r["split"][kind]["bytes"] for r in rows)
    t = sum(r["split"][kind]["seconds"] for r in rows)
    return b / 1e9 / t if t else float("nan")


def _print_summary(rows: list[dict], threads: int) -> None:
    fp8_gb, bf16_gb = _real_composition()
    print(f"\nreal step3-fp8 (its published layout): {fp8_gb:.1f} GB block-fp8 linears to "
          f"requantize + {bf16_gb:.1f} GB bf16 to copy = {fp8_gb + bf16_gb:.1f} GB")
    for target in dict.fromkeys(r["target"] for r in rows):
        mine = {r["model"]: r for r in rows if r["target"] == target}
        if "mini" in mine and "mini-2x" in mine:
            a, b = mine["mini"], mine["mini-2x"]
            da, db = (r["peak"]["anon"] - r["base"]["anon"] for r in (a, b))
            print(f"{target}: mini -> mini-2x: source x{b['source_bytes'] / a['source_bytes']:.2f}"
                  f", peak anon {da / 2**20:.1f} -> {db / 2**20:.1f} MiB")
        # the projection uses the real-shape layer when measured (its chunks are the real
        # model's), else mini + mini-2x; requantized and copied bytes at their own rates
        basis = [mine["real-layer"]] if "real-layer" in mine else list(mine.values())
        rq, cp = _rate(basis, "requantized"), _rate(basis, "copied")
        hours = (fp8_gb / rq + bf16_gb / cp) / 3600
        print(f"{target}: requantize {rq:.3f} GB/s, copy {cp:.3f} GB/s (measured on "
              f"{'+'.join(r['model'] for r in basis)}) -> real step3-fp8 "
              f"(~{REAL_STEP3_FP8_GB:.0f} GB) in ~{hours:.2f} h on this machine "
              f"({os.cpu_count()} cores, {threads} torch thread(s)), source in page cache")


if __name__ == "__main__":
    main()
