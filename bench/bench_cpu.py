"""Decode speed and start-up on this CPU with the runtime's default options, in one run:

1. the host: CPU model, its SIMD flags, the native kernels' instruction set and the compute
   dtype the runtime picks (`dtype="auto"`) with its reason;
2. start-up on the `mini` bf16 bundle: seconds to read the bundle's files (from the page
   cache, best of 2), `Step3Runtime.load` with the default options, and the bandwidth / GEMM
   probe alone;
3. decode tokens/s at batch 1 and 16 after 32-token prompts against the roofline (weight and
   KV bytes a step reads / the copy bandwidth measured just before each rate), round robin
   over: the defaults with all experts resident, 25% resident with misses computed on the
   CPU, the native kernels off, float32 compute, the `mini` bundle quantized to
   fp8_per_channel (the l20 target's scheme, its weights read as stored), and the reference
   model (bf16);
4. with `--slice`, the same batch-1 row for a real-width slice of Step3 (hidden 7168, experts
   of 5120, vocabulary 128,815; 2 decoder layers, the second MoE with 8 experts; no vision),
   exported as fp8_per_channel (~3.5 GB; the synthetic checkpoint ~7 GB of bf16 on disk).

    python bench/bench_cpu.py [--work DIR] [--reps 3] [--new-tokens 32] [--slice]
                              [--out bench/results/cpu-<cpu>.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hostinfo import host, results_path  # noqa: E402
from bench_runtime import (bandwidth, bytes_per_step, decode_rate_reference,  # noqa: E402
                           decode_rate_runtime, mini_bundle, prompts)

from step3_edge.config import Step3Config  # noqa: E402
from step3_edge.export.bundle import export_bundle  # noqa: E402
from step3_edge.model import Step3ForConditionalGeneration  # noqa: E402
from step3_edge.presets import PRESETS  # noqa: E402
from step3_edge.runtime import Step3Runtime  # noqa: E402
from step3_edge.runtime.backends import make_backend  # noqa: E402
from step3_edge.runtime.cost_model import measure_bandwidths  # noqa: E402
from step3_edge.synth import write_checkpoint  # noqa: E402

def read_seconds(folder: Path) -> float:
    """Seconds to read every file of `folder` once (best of 2: the second from the cache)."""
    def once() -> float:
        t0 = time.perf_counter()
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(64 << 20):
                        pass
        return time.perf_counter() - t0
    return min(once(), once())


def startup(bundle: Path) -> dict:
    """Seconds to read the bundle, to load it (defaults), and of the probe alone; the
    process's anonymous memory (USS) the load added, against the bundle's bytes."""
    read = read_seconds(bundle)
    files = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    proc = psutil.Process()
    uss0 = proc.memory_full_info().uss
    t0 = time.perf_counter()
    rt = Step3Runtime.load(bundle, device="cpu")
    load = time.perf_counter() - t0
    uss = proc.memory_full_info().uss - uss0
    rt.close()
    be = make_backend("torch", "cpu")
    t0 = time.perf_counter()
    measure_bandwidths(torch.device("cpu"), be.dtype, backend=be)
    probe = time.perf_counter() - t0
    return {"read_files_s": read, "load_s": load, "load_beyond_reading_s": load - read,
            "probe_s": probe, "bundle_GB": files / 1e9, "load_uss_GB": uss / 1e9}


def slice_bundle(work: Path) -> Path:
    """A real-width slice of Step3 (bf16 checkpoint, fp8_per_channel bundle), made once."""
    ckpt, bundle = work / "slice-bf16", work / "slice-fp8-bundle"
    if not (bundle / "manifest.json").is_file():
        d = copy.deepcopy(PRESETS["full"])
        d["text_config"].update(num_hidden_layers=2, moe_layers_enum="1", moe_num_experts=8)
        d["vision_config"]["num_hidden_layers"] = 2
        if not (ckpt / "config.json").is_file():
            write_checkpoint(Step3Config.from_dict(d), ckpt, "bf16", seed=0, overwrite=True)
        export_bundle(ckpt, "cpu", 1, bundle, scheme="fp8_per_channel", kv_tokens=4096,
                      cpu_mem_bytes=16 << 30, onnx=False, overwrite=True)
    return bundle


def rate(rt: Step3Runtime | None, ref, batch: int, new: int) -> dict:
    bw = bandwidth(reps=2)
    if rt is None:
        row = decode_rate_reference(ref, batch, new)
    else:
        row = decode_rate_runtime(rt, batch, new)
        row["bytes_per_step"] = bytes_per_step(rt, row["experts_per_step"], batch, 32 + new // 2)
        roof = batch * bw / row["bytes_per_step"]
        row.update(roofline_tokens_per_s=roof, fraction_of_roofline=row["tokens_per_s"] / roof)
    row["bandwidth_GBps"] = bw / 1e9
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/step3-edge-bench"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--slice", action="store_true", help="also the real-width slice (minutes)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    res: dict = {"host": host()}
    print(json.dumps(res["host"], indent=1))
    ckpt, bundle = mini_bundle(args.work)
    fp8 = args.work / "mini-fp8-bundle"
    if not (fp8 / "manifest.json").is_file():
        export_bundle(ckpt, "cpu", 1, fp8, scheme="fp8_per_channel", kv_tokens=1 << 16,
                      cpu_mem_bytes=16 << 30, onnx=False, overwrite=True)
    res["startup"] = startup(bundle)
    print("start-up (mini bf16 bundle, default options): " +
          ", ".join(f"{k} {v:.2f}" for k, v in res["startup"].items()))
    modes = {"defaults, all resident": (bundle, {}),
             "defaults, 25% resident, misses on the CPU": (bundle, {"resident": 0.25,
                                                                    "miss": "cpu",
                                                                    "cache": "static"}),
             "native kernels off": (bundle, {"native_kernels": False}),
             "float32 compute": (bundle, {"dtype": "float32", "backend": "torch"}),
             "fp8_per_channel bundle": (fp8, {})}
    rts = {k: Step3Runtime.load(b, device="cpu", vision=False, **kw)
           for k, (b, kw) in modes.items()}
    ref = Step3ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.bfloat16)
    names = [*rts, "reference model (bf16)"]
    samples: dict[str, list[dict]] = {}
    for rt in rts.values():
        rt.generate(prompts(2), max_new_tokens=2)
    for rep in range(args.reps):
        for batch in (1, 16):
            for name in names:
                row = rate(rts.get(name), ref, batch, args.new_tokens)
                samples.setdefault(f"{name}, batch {batch}", []).append(row)
        print(f"rep {rep + 1}/{args.reps} done", flush=True)
    res["dtypes"] = {k: rt.stats()["backend"].get("dtype") for k, rt in rts.items()}
    for rt in rts.values():
        rt.close()
    del ref
    if args.slice:
        sb = slice_bundle(args.work)
        res["startup_slice"] = startup(sb)
        rt = Step3Runtime.load(sb, device="cpu", vision=False)
        rt.generate(prompts(1), max_new_tokens=2)
        samples["real-width slice (fp8_per_channel), batch 1"] = [
            rate(rt, None, 1, args.new_tokens) for _ in range(args.reps)]
        rt.close()
    res["decode"] = {}
    for key, rows in samples.items():
        by = "fraction_of_roofline" if "bytes_per_step" in rows[0] else "tokens_per_s"
        row = res["decode"][key] = sorted(rows, key=lambda r: r[by])[len(rows) // 2]
        extra = f" = {100 * row[by]:5.1f}% of roofline {row['roofline_tokens_per_s']:8.1f} " \
                f"({row['bytes_per_step'] / 1e6:.1f} MB/step)" if by != "tokens_per_s" else ""
        print(f"{key:>52}: {row['tokens_per_s']:8.1f} tok/s{extra} at "
              f"{row['bandwidth_GBps']:.1f} GB/s")
    for b in (1, 16):
        d = {k.removesuffix(f", batch {b}"): v["tokens_per_s"]
             for k, v in res["decode"].items() if k.endswith(f", batch {b}")}
        base = d["defaults, all resident"]
        res.setdefault("ratios", {})[f"batch {b}"] = r = {
            "defaults / native kernels off": base / d["native kernels off"],
            "defaults / reference model": base / d["reference model (bf16)"],
            "defaults / float32 compute": base / d["float32 compute"],
            "25% resident / all resident": d["defaults, 25% resident, misses on the CPU"] / base}
        print(f"batch {b}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()))
    out = args.out or results_path("cpu", res["host"])
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
