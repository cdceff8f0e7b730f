"""Export benchmark: export time and bundle size per target, and the latency of every ONNX
subgraph in ONNX Runtime against the same reference PyTorch module on the same inputs, in the
same run (prefill 512 tokens, decode batch 1 and batch 16 with 512 tokens of context).

    python bench/bench_export.py                       # mini, targets cpu l20 a10
    python bench/bench_export.py --choices             # + weight binding / op choices
    python bench/bench_export.py --choices-only --dims 7168 5120   # one real Step3 expert

Prints tables; asserts nothing (numbers go in README.md, export).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch and ORT share 2 cores: no spinning
import numpy as np  # noqa: E402
import torch  # noqa: E402

from step3_edge.config import Step3Config  # noqa: E402
from step3_edge.export.bundle import export_bundle  # noqa: E402
from step3_edge.export.onnx_runner import BundleGraphs  # noqa: E402
from step3_edge.export.subgraphs import REGISTRY, Instance  # noqa: E402
from step3_edge.manifest import load_manifest  # noqa: E402
from step3_edge.synth import write_checkpoint  # noqa: E402

DEVICES = {"cpu": 1, "l20": 8, "a10": 8}


def timed(fn, min_time: float = 0.5, min_reps: int = 5) -> float:
    """Best-of-N seconds of `fn()` after one warm-up call (the minimum is the estimate least
    disturbed by other processes on a shared machine)."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 50:
            break
    return min(times)


def cases(kind: str, cfg: Step3Config) -> dict[str, dict[str, int] | None]:
    """Input sizes per case. Experts see top_k/E of the tokens; lm_head runs on the last
    position only (as the runner does); vision has no decode."""
    t = cfg.text_config
    per_expert = max(1, 512 * t.moe_top_k // t.moe_num_experts)
    if kind.startswith("vision"):
        return {"prefill 512": {"batch": 1}, "decode b1": None, "decode b16": None}
    if kind == "expert":
        return {"prefill 512": {"tokens": per_expert}, "decode b1": {"tokens": 1},
                "decode b16": {"tokens": max(1, 16 * t.moe_top_k // t.moe_num_experts)}}
    seq = 1 if kind == "lm_head" else 512
    return {"prefill 512": {"batch": 1, "seq": seq, "past": 0, "tokens": 512},
            "decode b1": {"batch": 1, "seq": 1, "past": 512, "tokens": 1},
            "decode b16": {"batch": 16, "seq": 1, "past": 512, "tokens": 16}}


def bench_latency(bundle: Path, threads: int) -> None:
    torch.set_num_threads(threads)
    graphs = BundleGraphs(bundle, threads=threads, spin=False)
    cfg, reader = graphs.cfg, graphs.reader
    m = graphs.manifest
    print(f"\nlatency, bundle {bundle.name} (target {m.target.name}), ORT {threads} thread(s) vs "
          f"torch {threads} thread(s), best-of-N ms, no thread spinning")
    print(f"{'subgraph':<14} {'prec':<5} {'case':<12} {'ORT':>9} {'torch':>9} {'ORT/torch':>9}")
    gen = torch.Generator().manual_seed(0)
    for name, sg in m.subgraphs.items():
        decl = REGISTRY[sg.kind]
        inst = Instance(*sg.instances[0])
        sess = graphs.session(sg.kind, inst.layer, inst.expert)
        ref = decl.reference(cfg, reader, inst)
        for case, dims in cases(sg.kind, cfg).items():
            if dims is None:
                continue
            x = decl.sample(cfg, {"batch": 1, "seq": 1, "past": 0, "tokens": 1, **dims}, gen)
            feeds = {k: v.numpy() for k, v in x.items()}
            t_ort = timed(lambda: sess.run(feeds))
            with torch.inference_mode():
                t_ref = timed(lambda: ref(**x))
            print(f"{name:<14} {sg.precision:<5} {case:<12} {t_ort * 1e3:9.3f} "
                  f"{t_ref * 1e3:9.3f} {t_ort / t_ref:9.2f}")


def bench_export(ckpt: Path, work: Path, targets: list[str], fp32: bool) -> dict[str, Path]:
    print(f"\nexport of {ckpt.name} (validation on, first and last instance of every graph)")
    print(f"{'target':<8} {'devices':>7} {'seconds':>8} {'bundle MB':>10} {'weights MB':>11} "
          f"{'onnx KB':>8} {'files':>6}")
    out: dict[str, Path] = {}
    runs = [(t, None) for t in targets] + ([("cpu", "bf16")] if fp32 else [])
    for target, scheme in runs:
        name = target + ("-fp32" if scheme else "")
        dst = work / f"bundle-{name}"
        t0 = time.perf_counter()
        export_bundle(ckpt, target, DEVICES[target], dst, scheme=scheme, overwrite=True,
                      progress=False, cpu_mem_bytes=64 << 30)
        dt = time.perf_counter() - t0
        arts = load_manifest(dst).artifacts
        size = {k: sum(a.bytes for a in arts if a.kind == k) for k in ("weights", "onnx")}
        print(f"{name:<8} {DEVICES[target]:>7} {dt:8.1f} {sum(a.bytes for a in arts) / 1e6:10.1f}"
              f" {size['weights'] / 1e6:11.1f} {size['onnx'] / 1e3:8.1f} {len(arts):>6}",
              flush=True)
        out[name] = dst
    return out


# ---------------------------------------------------------------------------- op choices
def _swiglu_graph(h: int, m: int, mode: str, rng: np.random.Generator):
    """A SwiGLU expert as ONNX in one weight form; returns (model bytes, weights, as_inputs)."""
    from onnx import TensorProto as TP
    from onnx import helper as oh

    from step3_edge.export.binding import BOUND
    from step3_edge.quantize.schemes import get_scheme, to_matmul_nbits

    mats = {"gate": (m, h), "up": (m, h), "down": (h, m)}
    w = {k: (rng.standard_normal(s) / np.sqrt(s[1])).astype(np.float32) for k, s in mats.items()}
    inputs = [oh.make_tensor_value_info("x", TP.FLOAT, ["n", h])]
    inits, nodes, values = [], [], {}
    as_inputs = mode.endswith("inputs")

    def add(name: str, arr: np.ndarray, typ: int) -> None:
        values[name] = (arr, typ)
        if as_inputs:
            inputs.append(oh.make_tensor_value_info(name, typ, list(arr.shape)))
        else:
            t = TP(name=name, data_type=typ, dims=list(arr.shape))
            t.data_location = TP.EXTERNAL
            t.external_data.add(key="location", value=BOUND)
            inits.append(t)

    def lin(x: str, k: str, out: str) -> None:
        n, kk = w[k].shape
        if mode.startswith("fp32"):
            add(k, np.ascontiguousarray(w[k].T), TP.FLOAT)
            nodes.append(oh.make_node("MatMul", [x, k], [out]))
        elif mode.startswith("nbits"):
            bits = 4 if mode.startswith("nbits4") else 8
            scheme = get_scheme("int4_block" if bits == 4 else "int8_block")
            b, s, _ = to_matmul_nbits(scheme, scheme.quantize(torch.from_numpy(w[k])), (n, kk))
            add(k + "_q", b.numpy(), TP.UINT8)
            add(k + "_scale", s.numpy(), TP.FLOAT)
            acc = 0 if "acc0" in mode else 4
            nodes.append(oh.make_node("MatMulNBits", [x, k + "_q", k + "_scale"], [out],
                                      domain="com.microsoft", K=kk, N=n, bits=bits,
                                      block_size=128, accuracy_level=acc))
        else:                                            # dq8 (blocked int8) / dqfp8 (row)
            fp8 = mode.startswith("dqfp8")
            scheme = get_scheme("fp8_per_channel" if fp8 else "int8_block")
            p = scheme.quantize(torch.from_numpy(w[k]))
            q = p[""].T.contiguous()
            if fp8:
                add(k + "_q", q.view(torch.uint8).numpy(), TP.FLOAT8E4M3FN)
                add(k + "_scale", p["_scale"].reshape(-1).numpy(), TP.FLOAT)
                kw = {"axis": 1}
            else:
                add(k + "_q", q.numpy(), TP.INT8)
                add(k + "_scale", p["_scale"].T.contiguous().numpy(), TP.FLOAT)
                kw = {"axis": 0, "block_size": 128}
            nodes.append(oh.make_node("DequantizeLinear", [k + "_q", k + "_scale"], [k + "_w"],
                                      **kw))
            nodes.append(oh.make_node("MatMul", [x, k + "_w"], [out]))

    lin("x", "gate", "g")
    lin("x", "up", "u")
    nodes += [oh.make_node("Sigmoid", ["g"], ["sg"]), oh.make_node("Mul", ["g", "sg"], ["a"]),
              oh.make_node("Mul", ["a", "u"], ["hh"])]
    lin("hh", "down", "y")
    g = oh.make_graph(nodes, "swiglu", inputs, [oh.make_tensor_value_info("y", TP.FLOAT,
                                                                           ["n", h])], inits)
    model = oh.make_model(g, opset_imports=[oh.make_opsetid("", 21),
                                            oh.make_opsetid("com.microsoft", 1)], ir_version=10)
    ref = lambda x: (((x @ w["gate"].T) / (1 + np.exp(-(x @ w["gate"].T)))) *  # noqa: E731
                     (x @ w["up"].T)) @ w["down"].T
    return model.SerializeToString(), values, as_inputs, ref


def bench_choices(h: int, m: int, threads: int) -> None:
    import onnxruntime as ort

    print(f"\nweight binding and op choice: one SwiGLU expert h={h}, inter={m}; ORT "
          f"{threads} thread(s), best-of-N ms; err = max|y - y_fp32| / max|y_fp32|")
    print(f"{'form':<24} {'session ms':>10} {'n=1':>9} {'n=16':>9} {'n=512':>9} {'err n=16':>9}")
    rng = np.random.default_rng(0)
    for mode in ("fp32 bound", "fp32 as inputs", "nbits8 acc4 bound", "nbits8 acc4 inputs",
                 "nbits8 acc0 bound", "nbits4 acc4 bound", "dq8 blocked bound",
                 "dqfp8 per-row bound"):
        blob, values, as_inputs, ref = _swiglu_graph(h, m, mode, rng)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        ov = {k: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(a, t) for k, (a, t) in
              values.items()}
        t0 = time.perf_counter()
        if not as_inputs:
            so.add_external_initializers(list(ov), list(ov.values()))
        sess = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
        t_sess = time.perf_counter() - t0
        row, err = [], 0.0
        for n in (1, 16, 512):
            x = rng.standard_normal((n, h)).astype(np.float32)
            if as_inputs:                         # weights passed as OrtValues on every call
                feeds = {**ov, "x": ort.OrtValue.ortvalue_from_numpy(x)}
                run = lambda: sess.run_with_ort_values(None, feeds)[0].numpy()  # noqa: E731
            else:
                run = lambda: sess.run(None, {"x": x})[0]  # noqa: E731
            row.append(timed(run, min_time=0.3))
            if n == 16:
                r = ref(x)
                err = float(np.abs(run() - r).max() / np.abs(r).max())
        print(f"{mode:<24} {t_sess * 1e3:10.1f} {row[0] * 1e3:9.3f} {row[1] * 1e3:9.3f} "
              f"{row[2] * 1e3:9.2f} {err:9.1e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mini", choices=["tiny", "mini"])
    ap.add_argument("--targets", default="cpu,l20,a10")
    ap.add_argument("--work", default=None, help="folder for checkpoint and bundles")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-fp32", action="store_true", help="skip the fp32 (bf16-weights) bundle")
    ap.add_argument("--choices", action="store_true", help="also bench the op / binding forms")
    ap.add_argument("--choices-only", action="store_true")
    ap.add_argument("--dims", type=int, nargs=2, default=None,
                    help="h inter for --choices (default: the preset's expert)")
    args = ap.parse_args()
    cfg = Step3Config.preset(args.preset)
    if args.choices or args.choices_only:
        h, m = args.dims or (cfg.text_config.hidden_size, cfg.text_config.moe_intermediate_size)
        bench_choices(h, m, args.threads)
        if args.choices_only:
            return
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-export-"))
    ckpt = work / f"ckpt-{args.preset}"
    if not (ckpt / "config.json").is_file():
        t0 = time.perf_counter()
        write_checkpoint(cfg, ckpt, "bf16", seed=0, progress=False, overwrite=True)
        print(f"synthetic {args.preset} bf16 checkpoint: {time.perf_counter() - t0:.1f} s")
    bundles = bench_export(ckpt, work, args.targets.split(","), not args.no_fp32)
    for name in ("cpu-fp32", "cpu"):
        if name in bundles:
            bench_latency(bundles[name], args.threads)


if __name__ == "__main__":
    main()
