"""Runtime benchmark on a CUDA GPU: the torch CUDA backend on
the `mini` preset, all in one run:

1. bandwidths measured at start-up: device memory (a large device copy, read + write bytes / s,
   the roofline's denominator), host -> device over PCIe from pinned and from pageable memory,
   device -> host, and what the runtime's own start-up probe (`measure_bandwidths`) feeds its
   cost model;
2. decode tokens/s at batch 1 and 16 with all experts on the GPU (bf16 bundle; also the fp8 and
   int8 bundles through `_scaled_mm` / `_int_mm`), as a fraction of the roofline (weight + KV
   bytes a decode step reads / device bandwidth), and the reference PyTorch model on the same
   GPU;
3. the same with 50% and 25% of the experts on the GPU: misses computed on the CPU (activations
   cross PCIe), copied over PCIe from pinned memory into an LRU cache (no prefetch) or the
   default LFU cache with prefetch, and chosen per miss by the cost model (`miss="auto"`);
4. one cold expert, PCIe copy + GPU compute against CPU compute (+ activations both ways), for
   1..1024 tokens, mini's expert and a real Step3 expert (h 7168, m 5120; bf16 and fp8),
   measured against the cost model's prediction;
5. prefill attention of one layer (`mfa_attention`, T = S = 4,096, bf16) at Step3's shape
   (64 query heads, one K/V head, d 256) and mini's: a boolean causal mask against the
   maskless causal path a prompt without padding takes;
6. batch 1 after a 4,000-token prompt: the runtime's time to the first token and decode rate.

    python bench/bench_runtime_cuda.py [--work DIR] [--new-tokens 32] [--reps 3]
                                       [--only decode,miss,attention,long]
                                       [--out bench/results/runtime_cuda.json]
    python bench/bench_runtime.py --device cuda ...          (the same)
    python bench/bench_runtime_cuda.py --device cpu --preset tiny --reps 1 --new-tokens 4 \
        --out /tmp/smoke.json                                 (a smoke check of the code path)

Without CUDA (and `--device cuda`, the default) it says so and exits 0 without writing.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from hostinfo import host, results_path
from bench_runtime import (LONG_PROMPT, LONG_SEED, bytes_per_step, decode_rate_runtime,
                           long_prompt_rate_runtime, prompts)
from step3_edge.config import Step3Config
from step3_edge.export.bundle import export_bundle
from step3_edge.model import (KVCache, Step3ForConditionalGeneration, attention_mask,
                              mfa_attention, rope_cos_sin)
from step3_edge.quantize.schemes import get_scheme
from step3_edge.runtime import Step3Runtime
from step3_edge.runtime.backends import TorchBackend
from step3_edge.runtime.cost_model import Bandwidths, CostModel, measure_bandwidths
from step3_edge.runtime.mlp import make_mlp
from step3_edge.synth import write_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _best(fn, dev: torch.device, reps: int) -> float:
    """Best wall seconds of `reps` calls of fn (after one warm-up), synchronized."""
    fn()
    _sync(dev)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best


def bandwidths(dev: torch.device, dtype: torch.dtype) -> dict:
    """Device copy (read + write), H2D pinned / pageable, D2H pinned, in bytes/s, and the
    runtime's start-up probe."""
    n = (1 << 30) if dev.type == "cuda" else (256 << 20)
    a = torch.ones(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    out = {"device_copy_bytes": n,
           "device_memory": 2 * n / _best(lambda: b.copy_(a), dev, 10)}
    del a, b
    if dev.type == "cuda":
        m = 256 << 20
        host = torch.ones(m, dtype=torch.uint8)
        pinned = host.pin_memory()
        d = torch.empty(m, dtype=torch.uint8, device=dev)
        out.update(h2d_copy_bytes=m,
                   h2d_pinned=m / _best(lambda: d.copy_(pinned, non_blocking=True), dev, 5),
                   h2d_pageable=m / _best(lambda: d.copy_(host), dev, 5),
                   d2h_pinned=m / _best(lambda: pinned.copy_(d, non_blocking=True), dev, 5))
        del d, pinned
    t0 = time.perf_counter()
    probe = measure_bandwidths(dev, dtype)
    out["runtime_probe"] = {**vars(probe), "seconds": time.perf_counter() - t0}
    return out


def reference_rate(model: Step3ForConditionalGeneration, batch: int, new: int,
                   dev: torch.device) -> dict:
    """Greedy decode tokens/s of the reference model on `dev`: its own layers, norm and lm_head
    in the loop of `Step3ForConditionalGeneration.generate` (whose helpers build positions and
    masks on the CPU; here they are built there and moved, as the runtime does)."""
    tc = model.config.text_config
    ids = torch.tensor(prompts(batch), device=dev)

    def run(steps: int) -> None:
        cache = KVCache(tc, batch, ids.shape[1] + steps + 1, model.dtype, dev)
        valid = torch.ones(batch, ids.shape[1], dtype=torch.bool)
        x = ids
        for _ in range(steps):
            past = cache.length
            pos = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            cos, sin = rope_cos_sin(pos, tc.head_dim, tc.rope_theta, tc.rope_factor)
            mask = attention_mask(pos, valid, past)
            mask = None if mask is None else mask.to(dev)
            cos, sin = cos.to(dev), sin.to(dev)
            h = model.model.embed_tokens(x)       # text only (a sampled <im_patch> is a token)
            for layer in model.model.layers:
                h = layer(h, cos, sin, mask, cache)
            cache.length += x.shape[1]
            x = model.lm_head(model.model.norm(h))[:, -1].float().argmax(-1)[:, None]
            valid = torch.cat([valid, torch.ones(batch, 1, dtype=torch.bool)], dim=1)
        _sync(dev)

    with torch.inference_mode():
        t1 = _best(lambda: run(1), dev, 1)
        tn = _best(lambda: run(new + 1), dev, 1)
    return {"tokens_per_s": batch * new / max(tn - t1, 1e-9)}


def decode_section(args: argparse.Namespace, ckpt: Path, bundles: dict[str, Path],
                   dev: torch.device, bw: float, res: dict, save) -> None:
    """Sections 2-3: every mode at batch 1 and 16, round robin, best of `reps`."""
    common = dict(device=str(dev), dtype="bfloat16", vision=False)
    modes: dict[str, tuple[Path, dict]] = {"all resident": (bundles["bf16"], {})}
    for s in ("fp8_per_channel", "int8_per_channel"):
        if s in bundles:
            modes[f"all resident, {s} weights"] = (bundles[s], {})
    for frac in (0.5, 0.25):
        p = f"{int(frac * 100)}%"
        modes.update({
            f"{p} cpu-compute": (bundles["bf16"], dict(resident=frac, miss="cpu",
                                                       cache="static")),
            f"{p} copy-lru": (bundles["bf16"], dict(resident=frac, miss="copy", cache="lru",
                                                    prefetch=False)),
            f"{p} copy-lfu+prefetch": (bundles["bf16"], dict(resident=frac, miss="copy",
                                                             cache="lfu", prefetch=True)),
            f"{p} auto (cost model), lfu+prefetch": (bundles["bf16"], dict(
                resident=frac, miss="auto", cache="lfu", prefetch=True))})
    rts = {}
    for name, (bundle, kw) in modes.items():
        t0 = time.perf_counter()
        rts[name] = Step3Runtime.load(bundle, **common, **kw)
        print(f"loaded {name!r} in {time.perf_counter() - t0:.1f} s", flush=True)
    ref = Step3ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.bfloat16).to(dev)
    for rt in rts.values():                                                  # warm up
        rt.generate(prompts(16), max_new_tokens=2)
    reference_rate(ref, 2, 1, dev)
    res["backend"] = {n: rt.stats()["backend"] for n, rt in rts.items()
                      if n.startswith("all resident")}
    best: dict[str, dict] = {}
    for rep in range(args.reps):        # round robin; each row printed as it is measured
        for batch in (1, 16):
            for name, rt in [*rts.items(), ("reference model", None)]:
                key = f"{name}, batch {batch}"
                if rt is None:
                    row = reference_rate(ref, batch, args.new_tokens, dev)
                else:
                    row = decode_rate_runtime(rt, batch, args.new_tokens)
                    row["bytes_per_step"] = bytes_per_step(rt, row["experts_per_step"], batch,
                                                           32 + args.new_tokens // 2)
                    row["miss_choices"] = rt.stats()["experts"]["miss_choices"]
                row["batch"] = batch
                print(f"  rep {rep + 1} {key}: {row['tokens_per_s']:.1f} tok/s", flush=True)
                if key not in best or row["tokens_per_s"] > best[key]["tokens_per_s"]:
                    best[key] = row
        decode_table(best, bw, res, args.new_tokens)
        save()
        print(f"rep {rep + 1}/{args.reps} done", flush=True)
    for rt in rts.values():
        rt.close()


def decode_table(best: dict[str, dict], bw: float, res: dict, new: int) -> None:
    """Roofline fractions of the best rows so far into res["decode"], printed."""
    res["decode"] = {}
    h2d = res["bandwidths"].get("h2d_pinned")
    for key in sorted(best, key=lambda k: (best[k]["batch"], list(best).index(k))):
        row = res["decode"][key] = best[key]
        if "bytes_per_step" not in row:
            run = best[f"all resident, batch {row['batch']}"]["tokens_per_s"]
            print(f"{key:>48}: {row['tokens_per_s']:8.1f} tok/s (all-resident runtime / "
                  f"reference = {run / row['tokens_per_s']:.2f}x)")
            continue
        roof = row["batch"] * bw / row["bytes_per_step"]
        row.update(roofline_tokens_per_s=roof, fraction_of_roofline=row["tokens_per_s"] / roof,
                   ms_per_step=1e3 * row["batch"] / max(row["tokens_per_s"], 1e-9))
        extra = ""
        if h2d and row["copied"]:                  # bytes over PCIe per step bound the rate
            pcie_s = row["bytes_copied"] / (new + 1) / h2d
            row["pcie_bound_tokens_per_s"] = row["batch"] / (pcie_s + row["batch"] / roof)
            extra = f", PCIe bound {row['pcie_bound_tokens_per_s']:.0f}"
        print(f"{key:>48}: {row['tokens_per_s']:8.1f} tok/s = "
              f"{100 * row['fraction_of_roofline']:6.2f}% of roofline {roof:9.1f} "
              f"({row['bytes_per_step'] / 1e6:6.1f} MB/step, {row['ms_per_step']:.2f} ms/step, "
              f"host CPU {row['cpu_ms_per_step'][0]:.2f} ms/step); hit {row['hit_rate']:.2f}, "
              f"CPU-computed {row['cpu_computed']}, copied {row['copied']} "
              f"({row['bytes_copied'] / 1e6:.1f} MB){extra}", flush=True)

def miss_section(args: argparse.Namespace, dev: torch.device, res: dict) -> None:
    """Section 4: one cold expert, CPU compute vs PCIe copy + device compute, measured and as
    the cost model (fed by the runtime's start-up probe) predicts."""
    dtype = torch.bfloat16
    probe = Bandwidths(**{k: v for k, v in res["bandwidths"]["runtime_probe"].items()
                          if k != "seconds"})
    host, devb = TorchBackend("cpu", dtype), TorchBackend(dev, dtype)
    shapes = {"mini (h 512, m 256)": (512, 256), "Step3 (h 7168, m 5120)": (7168, 5120)}
    if args.preset == "tiny":
        shapes = {"tiny (h 128, m 96)": (128, 96)}
    res["cold_expert"] = {"threads": torch.get_num_threads(), "probe": vars(probe), "rows": []}
    print(f"one cold expert: CPU compute ({torch.get_num_threads()} threads) vs copy over PCIe "
          f"+ GPU compute (ms; measured / cost model)")
    for label, (h, m) in shapes.items():
        g = torch.Generator().manual_seed(0)
        ws = [torch.randn(m, h, generator=g) * h ** -0.5, torch.randn(m, h, generator=g) *
              h ** -0.5, torch.randn(h, m, generator=g) * m ** -0.5]
        for scheme in ("bf16", "fp8_per_channel"):
            sch = get_scheme(scheme)
            lins = [host.linear(sch, sch.quantize(w), tuple(w.shape)) for w in ws]
            if dev.type == "cuda":
                lins = [lin.pin() for lin in lins]
            on_host = make_mlp(*lins)
            nbytes = sum(lin.nbytes for lin in lins)
            host_bytes = sum(lin.compute_nbytes for lin in lins)
            cost = CostModel(probe, h, dtype.itemsize, dev.type == "cpu")
            for n in (1, 16, 128, 1024):
                x = torch.randn(n, h, device=dev, dtype=dtype)
                flops = 6.0 * n * h * m
                pred = {"cpu": cost.cpu_seconds(n, nbytes, flops, host_bytes),
                        "copy": cost.copy_seconds(n, nbytes, flops)}

                def cpu() -> torch.Tensor:
                    return on_host(x.to("cpu")).to(dev, non_blocking=True)

                def copy() -> torch.Tensor:
                    return make_mlp(*(lin.remake(devb, non_blocking=True) for lin in lins))(x)

                t_cpu = None if pred["cpu"] > 3.0 else \
                    _best(cpu, dev, 3 if pred["cpu"] < 0.3 else 1)
                t_copy = _best(copy, dev, 3)
                faster = "copy" if t_cpu is None or t_copy < t_cpu else "cpu"
                row = {"expert": label, "scheme": scheme, "expert_bytes": nbytes, "tokens": n,
                       "cpu_s": t_cpu, "copy_s": t_copy, "predicted_cpu_s": pred["cpu"],
                       "predicted_copy_s": pred["copy"], "faster": faster,
                       "cost_model_choice": cost.choose(n, nbytes, flops, host_bytes)}
                res["cold_expert"]["rows"].append(row)
                tc = "skipped" if t_cpu is None else f"{1e3 * t_cpu:8.2f}"
                print(f"  {label:>22} {scheme:>15} {nbytes / 1e6:7.1f} MB, {n:5d} tokens: "
                      f"CPU {tc} / {1e3 * pred['cpu']:8.2f}, copy {1e3 * t_copy:8.2f} / "
                      f"{1e3 * pred['copy']:8.2f}; faster {faster}, model picks "
                      f"{row['cost_model_choice']}", flush=True)
            del lins, on_host


def attention_section(args: argparse.Namespace, dev: torch.device, res: dict) -> None:
    """Section 5: one layer's prefill attention, boolean causal mask vs maskless causal."""
    t = 4096 if dev.type == "cuda" else 256          # the CPU smoke check stays small
    causal = torch.ones(t, t, dtype=torch.bool).tril()[None, None].to(dev)
    out: dict = {"tokens": t}
    for name, (n, d) in {"Step3 (64 heads, d 256)": (64, 256),
                         f"{args.preset} (8 heads, d 64)": (8, 64)}.items():
        q = torch.randn(1, n, t, d, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(1, t, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
        with torch.inference_mode():
            masked = _best(lambda: mfa_attention(q, k, v, causal, d ** -0.5), dev, args.reps)
            plain = _best(lambda: mfa_attention(q, k, v, None, d ** -0.5), dev, args.reps)
        out[name] = {"masked_ms": 1e3 * masked, "maskless_ms": 1e3 * plain,
                     "speedup": masked / plain}
        print(f"prefill attention, {name}, T = S = {t}: mask {1e3 * masked:.2f} ms, maskless "
              f"{1e3 * plain:.2f} ms ({masked / plain:.2f}x)", flush=True)
    res["prefill_attention"] = out


def long_section(args: argparse.Namespace, bundle: Path, dev: torch.device, res: dict) -> None:
    """Section 6: batch 1 after a long prompt (all experts resident), best of `reps`."""
    length = LONG_PROMPT if args.preset == "mini" else 256
    with Step3Runtime.load(bundle, device=str(dev), dtype="bfloat16", vision=False) as rt:
        rt.generate(prompts(1)[0], max_new_tokens=2)                          # warm up
        rows = [long_prompt_rate_runtime(rt, args.new_tokens, length, LONG_SEED + i)
                for i in range(args.reps)]
    row = res["long_prompt"] = {"prompt_tokens": length,
                                **max(rows, key=lambda r: r["tokens_per_s"])}
    print(f"batch 1 after a {length}-token prompt: first token after {row['first_token_s']:.3f} "
          f"s, {row['tokens_per_s']:.1f} tok/s", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="mini", choices=("mini", "tiny"))
    ap.add_argument("--work", default="/tmp/step3-edge-bench-runtime-cuda")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default="decode,miss,attention,long", help="sections to run")
    ap.add_argument("--out", help="JSON results (default bench/results/"
                    "runtime_cuda-<gpu>.json)")
    args, _ = ap.parse_known_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: nothing measured (run it on a GPU machine)")
        return 0
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    work = Path(args.work)
    ckpt = work / f"{args.preset}-bf16"
    if not (ckpt / "config.json").is_file():
        write_checkpoint(Step3Config.preset(args.preset), ckpt, "bf16", seed=0, overwrite=True,
                         progress=False)
    bundles = {}
    for scheme in ("bf16", "fp8_per_channel", "int8_per_channel"):
        bundle = bundles[scheme] = work / f"{args.preset}-{scheme}-bundle"
        if not (bundle / "manifest.json").is_file():
            export_bundle(ckpt, "cpu", 1, bundle, scheme=scheme, kv_tokens=1 << 16,
                          cpu_mem_bytes=16 << 30, onnx=False, overwrite=True, progress=False)
    env = {"torch": torch.__version__, "device": str(dev), "python": platform.python_version(),
           "cpu_threads": torch.get_num_threads(), "preset": args.preset,
           "new_tokens": args.new_tokens, "reps": args.reps, "dtype": "bfloat16"}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env.update(gpu=p.name, capability=list(torch.cuda.get_device_capability(dev)),
                   sms=p.multi_processor_count, gpu_memory_bytes=p.total_memory,
                   cuda=torch.version.cuda)
    res: dict = {"environment": env, "bandwidths": bandwidths(dev, torch.bfloat16)}
    b = res["bandwidths"]
    print(json.dumps(env))
    print("bandwidths (GB/s): " + ", ".join(
        f"{k} {v / 1e9:.1f}" for k, v in b.items() if isinstance(v, float)) +
        "; runtime probe: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in
                                        b["runtime_probe"].items() if isinstance(v, float)
                                        and k != "seconds"), flush=True)
    only = set(args.only.split(","))
    machine = host()
    res["host"] = machine
    out = Path(args.out) if args.out else results_path("runtime_cuda", machine)
    every = {"decode", "miss", "attention", "long"}
    old = json.loads(out.read_text()) if out.is_file() and only != every else {}

    def save() -> None:             # after each section / rep; a partial run merges
        out.write_text(json.dumps({**old, **res}, indent=1, default=str) + "\n")
        print(f"wrote {out.name}", flush=True)

    if "miss" in only:
        miss_section(args, dev, res)
        save()
    if "attention" in only:
        attention_section(args, dev, res)
        save()
    if "long" in only:
        long_section(args, bundles["bf16"], dev, res)
        save()
    if "decode" in only:
        decode_section(args, ckpt, bundles, dev, b["device_memory"], res, save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
