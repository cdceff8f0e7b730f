"""Runtime benchmark on the `mini` preset (bf16 weights, bf16 compute), all in one run:

1. memory bandwidth of this machine (a large tensor copy, read + write bytes / s);
2. decode tokens/s at batch 1 and 16 with all experts resident, against the roofline
   (weight + KV bytes read per decode step / bandwidth), with and without the native decode
   kernels (runtime/native.py), and the reference PyTorch model;
   also batch 1 after a 4,000-token prompt (where attention and the KV cache weigh in);
3. the same with 50% and 25% of the experts resident: misses computed on the CPU, or copied
   into the device cache (LFU, the default policy) (on a CPU-only machine both are the same
   memory: "CPU compute" is plain compute plus bookkeeping, "copy" adds a real memcpy of each
   missed expert);
4. hit rates of LRU, LFU, frequency-pinned and each with prefetch, replayed on routing traces
   recorded at batch 1 and at batch 16;
5. AFD: throughput at batch 16 of attention and FFN in two processes (1 intra-op thread each,
   so each has a core) with 1, 2 and 3 micro-batches, against one worker at 2 threads and at
   1 thread, side by side (round robin); also 1 attention + 2 FFN processes, and 2
   attention ranks (data-parallel attention) + 1 FFN process;
6. backends on the same weights exported with ONNX subgraphs: torch bf16, torch float32 and
   ONNX Runtime (float32 graphs) at batch 1 and 16 (what `backend="auto"` is decided from);
7. the prefix cache: time to the first token of each turn of a 4-turn chat about one image,
   with the cache on (the default) and off, side by side.

    python bench/bench_runtime.py [--work DIR] [--new-tokens 32]
                                  [--only decode,afd,backends,prefix]
                                  [--out bench/results/runtime-<machine>.json]
    python bench/bench_runtime.py --device cuda ...   (the GPU benchmark: bench_runtime_cuda.py)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import psutil
import torch

from hostinfo import host, results_path
from step3_edge.config import Step3Config
from step3_edge.export.bundle import export_bundle
from step3_edge.model import KVCache, Step3ForConditionalGeneration
from step3_edge.runtime import Step3Runtime
from step3_edge.runtime.expert_cache import replay, top_experts, trace_counts
from step3_edge.synth import write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PROMPT = 32             # tokens before the decode rows
LONG_PROMPT = 4000      # tokens before the long-context decode rows
LONG_SEED = 100         # + the repetition: long prompts no other section uses
SECTIONS = ("decode", "afd", "backends", "prefix")


def mini_bundle(work: Path) -> tuple[Path, Path]:
    """The `mini` bf16 checkpoint and its cpu bf16 bundle in `work` (made once)."""
    ckpt = work / "mini-bf16"
    if not (ckpt / "config.json").is_file():
        write_checkpoint(Step3Config.preset("mini"), ckpt, "bf16", seed=0, overwrite=True)
    bundle = work / "mini-bundle"
    if not (bundle / "manifest.json").is_file():
        export_bundle(ckpt, "cpu", 1, bundle, scheme="bf16", kv_tokens=1 << 16,
                      cpu_mem_bytes=16 << 30, onnx=False, overwrite=True)
    return ckpt, bundle


def bandwidth(nbytes: int = 512 << 20, reps: int = 5) -> float:
    """Bytes read + written per second by a large copy (best of `reps`)."""
    a = torch.ones(nbytes, dtype=torch.uint8)
    b = torch.empty_like(a)
    b.copy_(a)
    best = min(_time(lambda: b.copy_(a)) for _ in range(reps))
    return 2 * nbytes / best


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def prompts(batch: int, length: int = PROMPT, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (length,), generator=g).tolist() for _ in range(batch)]


def _cpu(procs: list) -> list[float]:
    return [sum(p.cpu_times()[:2]) for p in procs]


def decode_rate_runtime(rt: Step3Runtime, batch: int, new: int) -> dict:
    """Decode tokens/s: the sum of the requests' own rates after their first token
    (`Generation.decode_tokens_per_s`; a request that stops early counts what it decoded);
    CPU seconds per process (this one, then any AFD worker) per decode step, the difference of
    a `new` + 1 and a 1-token call; and the routed experts one decode step touched on
    average (the prefill step left out)."""
    ps = prompts(batch)
    procs = [psutil.Process()] + [psutil.Process(p.pid) for p in getattr(rt.engine, "procs", [])]
    rt.reset_stats()
    c0 = _cpu(procs)
    rt.generate(ps, max_new_tokens=1)
    c1 = _cpu(procs)
    pre = rt.stats()
    rt.reset_stats()
    c2 = _cpu(procs)
    full = rt.generate(ps, max_new_tokens=new + 1)
    c3 = _cpu(procs)
    cpu_ms = [1e3 * ((d - c) - (b - a)) / new for a, b, c, d in zip(c0, c1, c2, c3)]
    st = rt.stats()
    e, p = st["experts"], pre["experts"]
    steps = st["time"]["steps"] - pre["time"]["steps"]
    # each request's own rate after its first token (the batch decodes in lockstep): the
    # difference of two generate calls' times took any hiccup of the short one as speed
    return {"tokens_per_s": sum(g.decode_tokens_per_s for g in full),
            "experts_per_step": (e["accesses"] - p["accesses"]) / max(steps, 1),
            "hit_rate": e["hit_rate"], "cpu_computed": e["cpu_computed"],
            "copied": e["copied"], "bytes_copied": e["bytes_copied"],
            "attention_s": sum(st["time"]["attention_s"]), "ffn_s": sum(st["time"]["ffn_s"]),
            "cpu_ms_per_step": cpu_ms}


def decode_rate_reference(model, batch: int, new: int) -> dict:
    ids = torch.tensor(prompts(batch))
    with torch.inference_mode():
        t1 = _time(lambda: model.generate(ids, 1))
        tn = _time(lambda: model.generate(ids, new + 1))
    return {"tokens_per_s": batch * new / max(tn - t1, 1e-9)}


def long_prompt_rate_runtime(rt: Step3Runtime, new: int, length: int, seed: int) -> dict:
    """Batch 1 decode tokens/s after a `length`-token prompt: the request's own rate after its
    first token (`Generation.decode_tokens_per_s`). A long prefill's run-to-run noise would
    swamp the difference of two generate calls. A new `seed` per call: a prompt seen before
    would come from the prefix cache, and its first token after a one-token prefill."""
    t = rt.engine.attn.cfg.text_config
    rt.reset_stats()
    g = rt.generate(prompts(1, length, seed)[0], max_new_tokens=new + 1)
    e = rt.stats()["experts"]
    return {"tokens_per_s": g.decode_tokens_per_s, "first_token_s": g.time_to_first_token_s,
            "experts_per_step": t.moe_top_k * len(t.moe_layers),   # batch 1: top-k per layer
            **{k: e[k] for k in ("hit_rate", "cpu_computed", "copied", "bytes_copied")}}


def long_prompt_rate_reference(model, new: int, length: int, seed: int) -> dict:
    """The same for the reference model: prefill, then `new` timed greedy decode steps."""
    ids = torch.tensor(prompts(1, length, seed))
    cache = KVCache(model.config.text_config, 1, length + new, model.dtype)
    valid = torch.ones(1, length + new, dtype=torch.bool)
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = model(ids, cache=cache, key_valid=valid[:, :length])[:, -1]
        t1 = time.perf_counter()
        for i in range(new):
            nxt = logits.argmax(-1, keepdim=True)
            logits = model(nxt, cache=cache, key_valid=valid[:, :length + i + 1])[:, -1]
        return {"tokens_per_s": new / (time.perf_counter() - t1), "first_token_s": t1 - t0}


def _first(row: dict) -> str:
    """The long-prompt rows' time to the first token (prefill), when measured."""
    return f"; first token after {row['first_token_s']:.2f} s" if "first_token_s" in row else ""


def bytes_per_step(rt: Step3Runtime, experts_per_step: float, batch: int, ctx: int) -> float:
    """Bytes a decode step reads: every non-expert linear, lm_head, the routed experts the
    batch touched, and the KV cache."""
    attn, ffn = rt.engine.attn, rt.engine.ffn
    lin = sum(getattr(L.self_attn, n).nbytes for L in attn.layers
              for n in ("q_proj", "k_proj", "v_proj", "wq", "o_proj"))
    lin += sum(L.moe.gate.nbytes for L in attn.layers if L.is_moe) + attn.lm_head.nbytes
    lin += sum(m.gate_proj.nbytes + m.up_proj.nbytes + m.down_proj.nbytes
               for m in ffn.mlps.values())
    experts = experts_per_step * ffn.store.expert_bytes
    return lin + experts + batch * ctx * attn.kv.bytes_per_token()


def decode_section(args: argparse.Namespace, ckpt: Path, bundle: Path, res: dict) -> None:
    """Sections 1-4: roofline fractions per expert mode, the reference, trace hit rates.

    This VM's copy bandwidth moves between ~35 and ~70 GB/s from one minute to the next, so
    each rate is paired with a bandwidth measured just before it, and each row reports the
    median over `reps` of the fraction of roofline of its pairs."""
    modes = {"all resident": {}, "no native kernels": {"native_kernels": False},
             "50% cpu-compute": {"resident": 0.5, "miss": "cpu",
                                                     "cache": "static"},
             "50% copy-lfu": {"resident": 0.5, "miss": "copy", "cache": "lfu"},
             "25% cpu-compute": {"resident": 0.25, "miss": "cpu", "cache": "static"},
             "25% copy-lfu": {"resident": 0.25, "miss": "copy", "cache": "lfu"}}
    rts = {name: Step3Runtime.load(bundle, device="cpu", dtype="bfloat16", vision=False, **kw)
           for name, kw in modes.items()}
    ref = Step3ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.bfloat16)
    for rt in rts.values():                                     # warm up
        rt.generate(prompts(2), max_new_tokens=2)
    decode_rate_reference(ref, 2, 1)
    samples: dict[str, list[dict]] = {}
    # (batch, prompt tokens, modes): every mode at 32-token prompts, and the all-resident
    # runtime and the reference once more at batch 1 after a long prompt (attention and KV)
    runs = [(1, PROMPT, [*rts]), (16, PROMPT, [*rts]), (1, LONG_PROMPT, ["all resident"])]
    for rep in range(args.reps):        # round robin: every mode sees the same machine load
        for batch, length, names in runs:
            for name in [*names, "reference model"]:
                rt = rts.get(name)
                bw = bandwidth(reps=2)
                long = length == LONG_PROMPT
                if rt is None:
                    row = long_prompt_rate_reference(ref, args.new_tokens, length,
                                                     LONG_SEED + rep) if long \
                        else decode_rate_reference(ref, batch, args.new_tokens)
                else:
                    row = long_prompt_rate_runtime(rt, args.new_tokens, length,
                                                   LONG_SEED + rep) if long \
                        else decode_rate_runtime(rt, batch, args.new_tokens)
                    row["bytes_per_step"] = bytes_per_step(rt, row["experts_per_step"], batch,
                                                           length + args.new_tokens // 2)
                    roof = batch * bw / row["bytes_per_step"]
                    row.update(roofline_tokens_per_s=roof,
                               fraction_of_roofline=row["tokens_per_s"] / roof)
                row.update(batch=batch, prompt_tokens=length, bandwidth_GBps=bw / 1e9)
                key = f"{name}, batch {batch}" + (f", {length}-token prompt" if long else "")
                samples.setdefault(key, []).append(row)
        print(f"rep {rep + 1}/{args.reps} done", flush=True)
    bws = [r["bandwidth_GBps"] for rows in samples.values() for r in rows]
    res["bandwidth_GBps"] = {"min": min(bws), "median": sorted(bws)[len(bws) // 2],
                             "max": max(bws)}
    print(f"memory bandwidth (512 MiB copy, read + write, before each rate): "
          f"{min(bws):.1f}-{max(bws):.1f} GB/s; torch threads {torch.get_num_threads()}; "
          f"median of {args.reps}, {args.new_tokens} new tokens after {PROMPT}-token prompts")
    res["decode"] = {}
    for key, rows in sorted(samples.items(),
                            key=lambda kv: (kv[1][0]["prompt_tokens"], kv[1][0]["batch"])):
        by = "fraction_of_roofline" if "bytes_per_step" in rows[0] else "tokens_per_s"
        row = res["decode"][key] = sorted(rows, key=lambda r: r[by])[len(rows) // 2]
        if by == "tokens_per_s":
            run = res["decode"][key.replace("reference model", "all resident")]["tokens_per_s"]
            print(f"{key:>26}: {row['tokens_per_s']:8.1f} tok/s (all-resident runtime / "
                  f"reference = {run / row['tokens_per_s']:.2f}x)" + _first(row))
            continue
        print(f"{key:>26}: {row['tokens_per_s']:8.1f} tok/s = "
              f"{100 * row['fraction_of_roofline']:5.1f}% of roofline "
              f"{row['roofline_tokens_per_s']:8.1f} at {row['bandwidth_GBps']:.1f} GB/s "
              f"({row['bytes_per_step'] / 1e6:6.1f} MB/step, "
              f"{row['experts_per_step']:.1f} experts/step); hit {row['hit_rate']:.2f}, "
              f"CPU-computed {row['cpu_computed']}, copied {row['copied']} "
              f"({row['bytes_copied'] / 1e6:.1f} MB)" + _first(row))
    for b in (1, 16):
        on, off = (res["decode"].get(f"{m}, batch {b}") for m in ("all resident",
                                                                  "no native kernels"))
        if on and off:
            x = res.setdefault("native_speedup", {})[f"batch {b}"] = \
                on["tokens_per_s"] / off["tokens_per_s"]
            print(f"all resident, batch {b}: with the native kernels {x:.2f}x without "
                  f"(oneDNN and torch ops; stacked experts at batch 16)")
    rt = rts["all resident"]                # a profile, then a trace on other prompts
    rt.reset_stats()
    for p in prompts(8, seed=2):
        rt.generate(p, max_new_tokens=args.new_tokens)
    profile = rt.expert_counts()
    traces = {}
    rt.record_trace(True)
    for p in prompts(8, seed=1):
        rt.generate(p, max_new_tokens=args.new_tokens)
    traces[1] = rt.record_trace(False)
    rt.record_trace(True)
    rt.generate(prompts(16, seed=3), max_new_tokens=args.new_tokens)
    traces[16] = rt.record_trace(False)
    res["backend"] = rt.stats()["backend"]
    for r in rts.values():
        r.close()
    del ref
    cfg = Step3Config.from_pretrained(ckpt).text_config
    n_exp = len(cfg.moe_layers) * cfg.moe_num_experts
    counts = profile
    res["trace_counts"] = trace_counts(traces[1], cfg.moe_num_experts)
    res["hit_rates"] = {}
    for (batch, trace), frac in itertools.product(traces.items(), (0.5, 0.25)):
        cap = round(frac * n_exp)
        rates = {f"{pol}{'+prefetch' if pre else ''}":
                 replay(trace, cap, pol, prefetch=pre)["hit_rate"]
                 for pre in (False, True) for pol in ("lru", "lfu")}
        rates["frequency-pinned (profile of other prompts)"] = replay(
            trace, 0, "static", pinned=top_experts(counts, cap))["hit_rate"]
        res["hit_rates"][f"{int(frac * 100)}% resident, batch {batch}"] = rates
        print(f"hit rate at {int(frac * 100)}% resident ({cap} of {n_exp} experts, "
              f"{len(trace)} steps, batch {batch}): " +
              ", ".join(f"{k} {v:.3f}" for k, v in rates.items()))


def _best_rates(configs: dict[str, tuple], batches: tuple[int, ...], reps: int, new: int
                ) -> dict[str, dict]:
    """Round robin over `configs` (name -> (runtime, micro-batches or None)), best tokens/s
    of `reps` per config and batch."""
    best: dict[str, dict] = {}
    for _ in range(reps):
        for batch in batches:
            for name, (rt, micro) in configs.items():
                if micro is not None:
                    rt.engine.micro_batches = micro
                row = decode_rate_runtime(rt, batch, new)
                key = f"{name}, batch {batch}"
                if key not in best or row["tokens_per_s"] > best[key]["tokens_per_s"]:
                    best[key] = {**row, "batch": batch, "threads": rt.scheduler.threads}
    return best


def afd_section(args: argparse.Namespace, bundle: Path, res: dict) -> None:
    """Section 5: the 2-process AFD pipeline against one worker at batch 16 on two cores."""
    common = dict(device="cpu", dtype="bfloat16", vision=False)
    one = {t: Step3Runtime.load(bundle, **common, threads=t) for t in (2, 1)}
    afd = Step3Runtime.load(bundle, **common, afd=True, ffn_ranks=1, afd_threads=1, threads=1)
    for rt in (*one.values(), afd):
        rt.generate(prompts(16), max_new_tokens=2)
    load0 = os.getloadavg()[0]
    configs = {"one worker, 2 threads": (one[2], None), "one worker, 1 thread": (one[1], None),
               **{f"AFD 1A+1F, {m} micro-batch{'es' * (m > 1)}": (afd, m) for m in (1, 2, 3)}}
    best = _best_rates(configs, (16,), args.reps, args.new_tokens)
    afd.close()
    for name, ranks, micro in (("AFD 1A+2F (3 processes), 3 micro-batches",
                                {"ffn_ranks": 2}, 3),
                               ("AFD 2A+1F (3 processes, data-parallel attention), 1 "
                                "micro-batch", {"ffn_ranks": 1, "attention_ranks": 2}, 1)):
        rt = Step3Runtime.load(bundle, **common, afd=True, afd_threads=1, threads=1, **ranks)
        rt.generate(prompts(16), max_new_tokens=2)
        best.update(_best_rates({name: (rt, micro)}, (16,), args.reps, args.new_tokens))
        rt.close()
    for rt in one.values():
        rt.close()
    base = {t: best[f"one worker, {t} thread{'s' * (t > 1)}, batch 16"]["tokens_per_s"]
            for t in (1, 2)}
    res["afd"] = {"cpu_count": os.cpu_count(), "loadavg_before_after": [load0,
                                                                        os.getloadavg()[0]],
                  "rows": best}
    print(f"AFD at batch 16 on {os.cpu_count()} cores (load average {load0:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after; best of {args.reps}):")
    for key, row in best.items():
        row.update(vs_one_worker_2_threads=row["tokens_per_s"] / base[2],
                   vs_one_worker_1_thread=row["tokens_per_s"] / base[1])
        print(f"  {key:>72}: {row['tokens_per_s']:7.1f} tok/s = "
              f"{row['vs_one_worker_2_threads']:.2f}x one worker at 2 threads, "
              f"{row['vs_one_worker_1_thread']:.2f}x at 1 thread; CPU ms per step per process "
              f"{[round(c, 1) for c in row['cpu_ms_per_step']]}")


def backends_section(args: argparse.Namespace, ckpt: Path, res: dict) -> None:
    """Section 6: torch bf16 / torch float32 / ONNX Runtime on one bundle with subgraphs."""
    bundle = Path(args.work) / "mini-onnx-bundle"
    if not (bundle / "manifest.json").is_file():
        export_bundle(ckpt, "cpu", 1, bundle, scheme="bf16", kv_tokens=1 << 16,
                      cpu_mem_bytes=16 << 30, onnx=True, validate=False, trt=False,
                      overwrite=True)
    threads = args.threads or torch.get_num_threads()
    common = dict(device="cpu", vision=False)
    rts = {"torch bf16": Step3Runtime.load(bundle, **common, backend="torch"),
           "torch float32": Step3Runtime.load(bundle, **common, backend="torch",
                                              dtype="float32"),
           "onnxruntime float32": Step3Runtime.load(bundle, **common, backend="onnxruntime",
                                                    ort_threads=threads)}
    for rt in rts.values():
        rt.generate(prompts(16), max_new_tokens=2)
    best = _best_rates({n: (rt, None) for n, rt in rts.items()}, (1, 16), args.reps,
                       args.new_tokens)
    for rt in rts.values():
        rt.close()
    res["backends"] = {"threads": threads, "rows": best}
    print(f"backends on the mini bundle with ONNX subgraphs ({threads} threads):")
    for key, row in best.items():
        print(f"  {key:>32}: {row['tokens_per_s']:7.1f} tok/s")


def prefix_section(args: argparse.Namespace, bundle: Path, res: dict) -> None:
    """Section 7: time to the first token of each turn of a chat about one image (crops
    included), prefix cache on and off, round robin. The assistant turns are fixed text, so
    both runtimes see the same prompts; each repetition uses an image of its own colour (no
    hits across repetitions)."""
    from PIL import Image

    rts = {on: Step3Runtime.load(bundle, device="cpu", dtype="bfloat16", prefix_cache=on)
           for on in (False, True)}
    questions = ["Describe this picture.", "What colours are in it?",
                 "Is there any text in it?", "Summarise our conversation."]
    best: dict[tuple[bool, int], dict] = {}
    for rep in range(args.reps):
        image = Image.new("RGB", (1200, 800), (40 + 50 * rep, 120, 200))
        for on, rt in rts.items():
            msgs: list[dict] = []
            for turn, q in enumerate(questions):
                content = [{"type": "image", "image": image}] if turn == 0 else []
                msgs.append({"role": "user", "content": content + [{"type": "text",
                                                                    "text": q}]})
                ids, views = rt.processor.apply_chat(msgs)
                rt.reset_stats()
                g = rt.generate(ids, views, max_new_tokens=8)
                pc = rt.stats()["scheduler"]["prefix_cache"]
                row = {"prompt_tokens": len(ids), "first_token_s": g.time_to_first_token_s,
                       "hit_tokens": pc["hit_tokens"]}
                if (on, turn) not in best or row["first_token_s"] < best[on, turn][
                        "first_token_s"]:
                    best[on, turn] = row
                msgs.append({"role": "assistant", "content": "A picture with shapes and "
                             f"colours, as you asked (turn {turn + 1})."})
    for rt in rts.values():
        rt.close()
    rows = []
    print(f"prefix cache: a 4-turn chat about one 1200x800 image (best of {args.reps}):")
    for turn in range(len(questions)):
        off, on = best[False, turn], best[True, turn]
        rows.append({"turn": turn + 1, "prompt_tokens": on["prompt_tokens"],
                     "hit_tokens": on["hit_tokens"], "first_token_s_off": off["first_token_s"],
                     "first_token_s_on": on["first_token_s"],
                     "speedup": off["first_token_s"] / on["first_token_s"]})
        print(f"  turn {turn + 1}: {on['prompt_tokens']:5d} prompt tokens, {on['hit_tokens']:5d} "
              f"cached; first token after {off['first_token_s']:.3f} s (cache off) / "
              f"{on['first_token_s']:.3f} s (on) = {rows[-1]['speedup']:.1f}x")
    res["prefix_cache"] = rows


def main() -> int:
    if "--device" in sys.argv[1:-1] and sys.argv[sys.argv.index("--device") + 1] != "cpu":
        from bench_runtime_cuda import main as cuda_main     # GPU: its own sections and file

        return cuda_main(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu (this file) or cuda "
                    "(bench_runtime_cuda.py)")
    ap.add_argument("--work", default="/tmp/step3-edge-bench-runtime")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3, help="best of N (the machine is shared)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--only", default=",".join(SECTIONS), help="sections to run")
    ap.add_argument("--out", help="JSON results (default bench/results/runtime-<machine>.json)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt, bundle = mini_bundle(Path(args.work))
    threads = torch.get_num_threads()
    res: dict = {"host": host(), "threads": threads, "new_tokens": args.new_tokens}
    only = set(args.only.split(","))
    if "decode" in only:
        decode_section(args, ckpt, bundle, res)
    if "afd" in only:
        afd_section(args, bundle, res)
    if "backends" in only:
        backends_section(args, ckpt, res)
    if "prefix" in only:
        prefix_section(args, bundle, res)
    out = Path(args.out) if args.out else results_path("runtime", res["host"])
    if out.is_file() and only != set(SECTIONS):                   # a partial run: merge
        res = {**json.loads(out.read_text()), **res}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
