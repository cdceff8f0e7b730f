"""The native decode kernels (`runtime/native.py`) against what they replace, side by side:

1. each of `mini`'s decode weight shapes alone, weights in cache (the per-call cost), 1 row of x;
2. one decode step's worth of `mini` weights in the order a step reads them (8 layers' ~82
   GEMVs, 38 MB, then the 132 MB lm_head), so that each layer's weights come from DRAM as they
   do in the engine; with the native kernel threaded above several element counts (what
   `native.THREADED_MIN_ELEMENTS` was chosen from);
3. the lm_head alone (132 MB), GB/s of each;
4. RMSNorm of one [1, 512] bf16 row: native against the reference module;
5. one decode step's attention (8 heads of 64, one query) at S keys: native on one thread and
   on the team against `mfa_attention`;
6. an fp8 KV pool's gather and decode at S keys: native against
   `fp8_to_float(index_select(...))`.

    python bench/bench_native_kernels.py [--reps 5] [--rows 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from step3_edge.model import RMSNorm, mfa_attention
from step3_edge.quantize.schemes import fp8_to_float
from step3_edge.runtime import native

# mini's decode weights per layer, in the order the engine reads them (dense first / last layer)
DENSE = [(384, 512), (512, 256), (512, 512), (3072, 512), (512, 1536)]
MOE = [(384, 512), (512, 256), (512, 512), (48, 512)] + [(512, 512), (512, 256)] * 4
LM_HEAD = (128815, 512)


def _time(fn, n: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=1, help="rows of x (decode batch)")
    a = ap.parse_args()
    if native.kernel() is None:
        raise SystemExit(f"native kernel unavailable: {native.unavailable_reason()}")
    torch.manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}, rows of x {a.rows}")

    def onednn(w: torch.Tensor):
        p = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        x = torch.randn(a.rows, w.shape[1]).bfloat16()
        return lambda: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")

    def nat(w: torch.Tensor, threaded: bool | None = None):
        nw = native.Weights([w])
        if threaded is not None:
            nw._threaded = threaded
        x = torch.randn(a.rows, w.shape[1]).bfloat16()
        return lambda: nw.matmul(x)

    print("\n1. one call, weights in cache (us): shape  oneDNN  native(1 thread)  native(team)")
    for shape in sorted(set(DENSE + MOE)):
        w = torch.randn(shape).bfloat16()
        r = [_time(f, 2000) * 1e6 for f in (onednn(w), nat(w, False), nat(w, True))]
        print(f"   {str(shape):>12}  {r[0]:6.1f}  {r[1]:6.1f}  {r[2]:6.1f}")

    ws = [torch.randn(s).bfloat16() for s in DENSE] + \
        [torch.randn(s).bfloat16() for _ in range(6) for s in MOE] + \
        [torch.randn(s).bfloat16() for s in DENSE] + [torch.randn(LM_HEAD).bfloat16()]
    mb = sum(w.numel() * 2 for w in ws) / 1e6
    print(f"\n2. one decode step of mini ({len(ws)} GEMVs, {mb:.0f} MB), ms per step")
    variants = {"oneDNN": [onednn(w) for w in ws]}
    for thr in (1 << 16, 1 << 18, 1 << 20, 1 << 30):
        native.THREADED_MIN_ELEMENTS = thr
        variants[f"native, team above {thr:>10} elements"] = [nat(w) for w in ws]
    for rep in range(a.reps):
        for name, fns in variants.items():
            dt = _time(lambda fns=fns: [f() for f in fns], 5)
            print(f"   rep {rep}  {name:<38} {dt * 1e3:6.2f} ms  ({mb / 1e3 / dt:5.1f} GB/s)")

    print("\n3. lm_head alone (GB/s)")
    lm = ws[-1]
    for rep in range(a.reps):
        o = _time(onednn(lm), 5)
        n = _time(nat(lm, True), 5)
        print(f"   rep {rep}  oneDNN {lm.numel() * 2 / o / 1e9:5.1f}   native "
              f"{lm.numel() * 2 / n / 1e9:5.1f}")

    norm = RMSNorm(512, 1e-5)
    norm.weight.data = torch.rand(512) + 0.5
    x = torch.randn(1, 512).bfloat16()
    print("\n4. RMSNorm [1, 512] (us): reference module {:.1f}, native {:.1f}".format(
        _time(lambda: norm(x), 3000) * 1e6,
        _time(lambda: native.rms_norm(x, norm.weight.data, 1e-5), 3000) * 1e6))

    print("\n5. decode attention, 8 heads of 64 (us): S  mfa_attention  native(1 thread)  "
          "native(team)")
    team = native.TEAM_MIN_ELEMENTS
    for s in (64, 512, 4096):
        q = torch.randn(1, 9, 1, 64).bfloat16()[:, :8]
        kv = torch.randn(2, 1, s, 64)
        r = [_time(lambda: mfa_attention(q, kv[0], kv[1], None, 0.125), 300)]
        for native.TEAM_MIN_ELEMENTS in (1 << 62, 0):
            r.append(_time(lambda: native.decode_attention(q, kv[0], kv[1], 0.125), 300))
        native.TEAM_MIN_ELEMENTS = team
        print(f"   {s:>5}  {r[0] * 1e6:6.1f}  {r[1] * 1e6:6.1f}  {r[2] * 1e6:6.1f}")

    print("\n6. fp8 KV gather + decode of S rows of K and V, d = 64 (us): S  torch  native")
    pool = torch.randint(0, 256, (2, 8192, 64), dtype=torch.uint8)
    for s in (64, 4096):
        idx = torch.randperm(8192)[:s]
        t = _time(lambda: fp8_to_float(pool.index_select(1, idx)), 300)
        n = _time(lambda: native.fp8_gather(pool, idx), 300)
        print(f"   {s:>5}  {t * 1e6:6.1f}  {n * 1e6:6.1f}")


if __name__ == "__main__":
    main()
