"""The native decode kernels (`runtime/native.py`) against what they replace, side by side:

1. each of `mini`'s decode weight shapes alone, weights in cache (the per-call cost), 1 row of x;
2. one decode step's worth of `mini` weights in the order a step reads them (8 layers' ~82
   GEMVs, 38 MB, then the 132 MB lm_head), so that each layer's weights come from DRAM as they
   do in the engine; with the native kernel threaded above several element counts (what
   `native.THREADED_MIN_ELEMENTS` was chosen from);
3. the lm_head alone (132 MB), GB/s of each;
4. RMSNorm of one [1, 512] bf16 row: native against the reference module;
5. one decode step's attention after the projections (RoPE, the fp8 KV write, 8 heads of 64
   against S keys): `decode_mfa` on one thread and on the team against the torch ops;
6. an fp8 KV pool's gather and decode at S keys: native against
   `fp8_to_float(index_select(...))`;
7. one MoE layer's FFN at one row (a shared and 3 routed experts of `mini`): one `swiglu` call
   against torch ops around oneDNN's prepacked GEMMs;
8. the greedy pick of float32 logits [B, 128815] at B = 1 and 16: `native.argmax` against
   `sampling.greedy` (torch's `max(dim)`).

    python bench/bench_native_kernels.py [--reps 5] [--rows 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from step3_edge.model import RMSNorm, apply_rope, mfa_attention, rope_cos_sin
from step3_edge.quantize.schemes import cast_fp8, fp8_to_float
from step3_edge.runtime import native
from step3_edge.runtime.backends import PackedBf16
from step3_edge.sampling import greedy

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

    print("\n5. a decode step's attention after the projections, 8 heads of 64, fp8 KV (us): "
          "S  torch ops (RoPE, KV write, gather, mfa_attention)  native(1 thread)  "
          "native(team)")
    team = native.TEAM_MIN_ELEMENTS
    for s in (64, 512, 4096):
        pool = cast_fp8(torch.randn(2, s + 16, 64))
        gather, write = torch.randperm(s + 16)[None, :s], torch.tensor([s - 1])
        gather[0, -1] = write
        y, q = torch.randn(1, 128).bfloat16(), torch.randn(1, 512).bfloat16()
        cos, sin = (t[:, 0] for t in rope_cos_sin(torch.tensor([[s - 1]]), 64, 5e5))

        def reference() -> torch.Tensor:
            qk = apply_rope(torch.cat([q.view(1, 8, 1, 64), y[:, None, None, :64]], 1),
                            cos[:, None], sin[:, None])
            raw = pool.view(torch.uint8)
            new = torch.stack([qk[:, 8], y[:, None, 64:]]).reshape(2, -1, 64)
            raw.index_copy_(1, write, cast_fp8(new.float()).view(torch.uint8))
            kv = fp8_to_float(raw.index_select(1, gather.reshape(-1)))
            return mfa_attention(qk[:, :8], kv[:1], kv[1:], None, 0.125)

        r = [_time(reference, 300)]
        for native.TEAM_MIN_ELEMENTS in (1 << 62, 0):
            r.append(_time(lambda: native.decode_mfa(y, 0, q, 8, cos, sin, pool, write, gather,
                                                     torch.tensor([s]), 0.125), 300))
        native.TEAM_MIN_ELEMENTS = team
        print(f"   {s:>5}  {r[0] * 1e6:6.1f}  {r[1] * 1e6:6.1f}  {r[2] * 1e6:6.1f}")

    print("\n6. fp8 KV gather + decode of S rows of K and V, d = 64 (us): S  torch  native")
    pool = torch.randint(0, 256, (2, 8192, 64), dtype=torch.uint8)
    for s in (64, 4096):
        idx = torch.randperm(8192)[:s]
        t = _time(lambda: fp8_to_float(pool.index_select(1, idx)), 300)
        n = _time(lambda: native.fp8_gather(pool, idx), 300)
        print(f"   {s:>5}  {t * 1e6:6.1f}  {n * 1e6:6.1f}")

    print("\n7. one MoE layer's FFN at 1 row, weights in cache (us): a shared expert and 3 routed"
          " experts of mini (SwiGLU 512 -> 256 -> 512): torch ops around oneDNN  native (1 call)")
    mlps = [[torch.randn(256, 512).bfloat16() / 16 for _ in range(2)] +
            [torch.randn(512, 256).bfloat16() / 16] for _ in range(4)]
    packed = [(PackedBf16(m[:2], False), PackedBf16(m[2:], False)) for m in mlps]
    handles = [native.SwiGLU(*m) for m in mlps]
    x, w = torch.randn(1, 512).bfloat16(), torch.rand(3)
    rows = torch.zeros(3, dtype=torch.long)

    def reference_ffn() -> torch.Tensor:
        ys = []
        for gu, down in packed:
            a = gu(x)
            ys.append(down(torch.nn.functional.silu(a[:, :256]) * a[:, 256:]))
        routed = torch.zeros(1, 512).index_put_((rows,), torch.cat(ys[1:]).float() * w[:, None],
                                                 accumulate=True)
        return ys[0] + routed.to(torch.bfloat16)

    terms = [(0, 0, 1.0)] + [(i + 1, 0, float(w[i])) for i in range(3)]
    for rep in range(a.reps):
        t = _time(lambda: native.swiglu(x, handles, terms, torch.bfloat16, 1), 1000)
        print(f"   rep {rep}  {_time(reference_ffn, 1000) * 1e6:6.1f}  {t * 1e6:6.1f}")

    print("\n8. greedy pick of float32 logits [B, 128815] (us): B  sampling.greedy  native")
    for b in (1, 16):
        logits = torch.randn(b, LM_HEAD[0])
        for rep in range(a.reps):
            print(f"   {b:>2}  rep {rep}  {_time(lambda: greedy(logits), 50) * 1e6:7.1f}  "
                  f"{_time(lambda: native.argmax(logits), 50) * 1e6:7.1f}")


if __name__ == "__main__":
    main()
