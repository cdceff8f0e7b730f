"""The native decode kernels (runtime/native.py): the GEMV's products against float64, against
oneDNN, its float32 output; the SwiGLU MLP and routed sums, the RMSNorm and the decode step's
attention (RoPE and KV write bit for bit) against the reference's ops; the fp8 gather; the
greedy argmax; the build cache, the refusals, and the runtime's logits with them on against
torch / oneDNN's. Skipped where they cannot build (no AVX512-BF16 or no C compiler), except
the refusals."""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

import pytest
import torch
from runtime_helpers import FIXED_BW

from step3_edge.config import Step3Config
from step3_edge.errors import ConfigError
from step3_edge.model import RMSNorm, mfa_attention
from step3_edge.runtime import Step3Runtime, backends, native
from step3_edge.runtime.backends import PackedBf16, TorchBackend
from step3_edge.runtime.ops import NativeRMSNorm
from step3_edge.runtime.kv import plan_step
from step3_edge.synth import write_checkpoint

needs_native = pytest.mark.skipif(native.kernel() is None,
                                  reason=f"native GEMV unavailable: {native.unavailable_reason()}")


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))


def _check_product(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y (bf16 or float32) = x @ w.T up to one bf16 rounding of a float32 sum: |y - exact| <=
    2^-8 |exact| (the rounding, with slack) + K 2^-23 sum|x w| (float32 accumulation)."""
    exact = x.double() @ w.double().T
    bound = exact.abs() * 2 ** -8 + x.shape[1] * 2 ** -23 * (x.double().abs() @ w.double().abs().T)
    assert y.shape == exact.shape
    assert ((y.double() - exact).abs() <= bound).all()


@needs_native
@pytest.mark.parametrize("k", [32, 80, 128, 200, 512])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 12, 16])
def test_native_kernels_against_float64(k: int, m: int) -> None:
    """Random shapes, K with and without a 32-element tail, 1-3 row segments (a fused q|k|v),
    and the threaded split (a weight above THREADED_MIN_ELEMENTS)."""
    g = _gen()
    for rows in ([7], [64, 16, 16], [3, 250]):
        ws = [torch.randn(r, k, generator=g).bfloat16() for r in rows]
        x = torch.randn(m, k, generator=g).bfloat16()
        nw = native.Weights(ws)
        for threaded in (False, True):
            nw._threaded = threaded
            _check_product(nw.matmul(x), x, torch.cat(ws))


@needs_native
@pytest.mark.parametrize("scheme", ["int8_per_channel", "fp8_per_channel", "int8_block",
                                    "block_fp8"])
@pytest.mark.parametrize("k", [96, 200, 300])
def test_quantized_gemv_against_float64(scheme: str, k: int) -> None:
    """`QuantWeights` (int8 / fp8 bytes with their scales, as stored) against float64 of the
    dequantized weight, up to one bf16 rounding: K with a tail of 16 and a partial last group
    of 128, rows not a multiple of 128 (block_fp8's partial row block), 1-2 segments, 1-16
    rows (two blocks of 8 above 8), threaded or not, bf16 or float32 output (the bf16 value)."""
    from step3_edge.quantize.schemes import get_scheme

    g, sch = _gen(), get_scheme(scheme)
    key, row_block, group = backends.NATIVE_QUANT[scheme]
    for rows in ([70], [200, 130]):
        parts = [sch.quantize(torch.randn(r, k, generator=g) / k ** 0.5) for r in rows]
        w = torch.cat([sch.dequantize(p, (r, k)) for p, r in zip(parts, rows)])
        qw = native.QuantWeights([(p[""], p[key].float().reshape(-(-r // row_block), -1)
                                   .contiguous()) for p, r in zip(parts, rows)],
                                 group or k, row_block)
        for m in (1, 3, 5, 8, 13, 16):
            x = torch.randn(m, k, generator=g).bfloat16()
            for threaded in (False, True):
                qw._threaded = threaded
                y = qw.matmul(x)
                _check_product(y, x, w)
                y32 = qw.matmul(x, torch.empty(m, qw.rows))
                assert torch.equal(y32, y.float())


def test_instruction_set_follows_the_cpu_flags(monkeypatch) -> None:
    """AVX512-BF16 where the CPU has it, else AVX2 + FMA, else none (with the reason said)."""
    avx2 = {"avx", "avx2", "fma", "f16c", "sse4_2"}
    cases = [(avx2 | {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}, "avx512_bf16"),
             (avx2 | {"avx512f", "avx512bw", "avx512vl"}, "avx2_fma"), (avx2, "avx2_fma"),
             ({"avx", "sse4_2"}, None)]
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    for flags, want in cases:
        monkeypatch.setattr(native, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert native.isa() == want
    monkeypatch.setattr(native.platform, "machine", lambda: "aarch64")
    assert native.isa() is None


def test_the_abi_is_read_from_the_header() -> None:
    """Every entry point the Python side calls has a prototype in s3e.h, typed argument by
    argument (a pointer, int64_t, int or float)."""
    types = native._entry_points()
    assert set(native._SYMBOLS.values()) <= set(types)
    assert types["s3e_gemv_bf16"] == [native._P, native._I, native._I, native._P, native._P,
                                      native._I, native._P, native._I, ctypes.c_int,
                                      ctypes.c_int]
    assert len(types["s3e_decode_mfa"]) == 24 and types["s3e_decode_mfa"][18] == native._F


@needs_native
def test_native_float32_output_is_the_bf16_value() -> None:
    """Into a float32 buffer (the logits) the kernel writes the bf16-rounded sum, as
    `bf16 result .float()` would, and leaves columns past its rows alone."""
    g = _gen()
    w, x = torch.randn(300, 96, generator=g).bfloat16(), torch.randn(3, 96, generator=g).bfloat16()
    nw = native.Weights([w])
    out = torch.full((3, 310), 7.0)
    nw.matmul(x, out[:, :300])
    assert torch.equal(out[:, :300], nw.matmul(x).float())
    assert (out[:, 300:] == 7.0).all()


@needs_native
@pytest.mark.parametrize("m", [1, 4, 8, 9])
def test_packed_bf16_native_against_onednn(m: int) -> None:
    """PackedBf16 takes the native kernel up to MAX_ROWS rows and oneDNN's prepacked GEMM above
    where this CPU has fast bf16 math (elsewhere the native kernel 8 rows at a time, against
    torch's bf16 GEMM without it); both round a
    float32 sum, so they differ by at most one bf16 step (plus the two summation orders'
    float32 rounding) and agree almost everywhere."""
    g = _gen()
    ws = [torch.randn(r, 512, generator=g).bfloat16() for r in (256, 64)]
    x = torch.randn(m, 512, generator=g).bfloat16()
    prepack = bool(TorchBackend("cpu").caps.fast_bf16_gemm)
    on, off = PackedBf16(ws, True, prepack), PackedBf16(ws, False, prepack)
    a, b = on(x), off(x)
    w = torch.cat(ws)
    tol = 2.0 ** (torch.floor(torch.log2(b.float().abs().clamp(min=1e-30))) - 7) + \
        512 * 2 ** -23 * (x.float().abs() @ w.float().abs().T)     # + float32 summation order
    assert ((a.float() - b.float()).abs() <= tol).all()
    assert (a == b).float().mean() > 0.95
    if m > native.MAX_ROWS and prepack:
        assert torch.equal(a, b)                                    # oneDNN both times
    assert torch.equal(on(x.view(m, 1, 512)), a.view(m, 1, -1))       # [..., K] inputs


@needs_native
@pytest.mark.parametrize("shape", [(1, 512), (3, 96), (2, 5, 100), (1, 1, 7)])
def test_native_rms_norm_against_the_reference(shape: tuple[int, ...]) -> None:
    """bf16 rows (contiguous, and strided like the q slice of a fused q|k|v output): within one
    bf16 rounding of the reference module's float32 result, and equal to its bf16 output
    almost everywhere."""
    g = _gen()
    n = shape[-1]
    ref = RMSNorm(n, 1e-5)
    ref.weight.data = torch.rand(n, generator=g) + 0.5
    wide = torch.randn(*shape[:-1], n + 40, generator=g).bfloat16()
    for x in (wide[..., :n].contiguous(), wide[..., :n]):
        got = native.rms_norm(x, ref.weight.data, 1e-5)
        exact = torch.nn.functional.rms_norm(x.double(), (n,), ref.weight.data.double(), 1e-5)
        assert got.shape == x.shape and got.dtype == torch.bfloat16
        assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()
        assert (got == ref(x)).float().mean() > 0.95


def _raw(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, for bit-for-bit comparisons."""
    return t.contiguous().view(torch.uint8)


@needs_native
@pytest.mark.parametrize("kind", [torch.float8_e4m3fn, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b,n,s,d", [(1, 8, 1, 64), (1, 8, 57, 64), (3, 4, 200, 32),
                                     (2, 2, 384, 256), (1, 8, 3000, 64)])
def test_decode_mfa_against_the_reference(kind: torch.dtype, b: int, n: int, s: int, d: int,
                                          monkeypatch) -> None:
    """A decode step of b sequences of random lengths up to s over a pool of `kind`, on one
    thread and over the team: the queries rotated in place and the pool written bit for bit
    as `apply_rope` and `GroupCache.update` do, and each sequence's attention within a bf16
    step (plus float32 rounding) of `mfa_attention` over its own keys."""
    from step3_edge.model import apply_rope, rope_cos_sin
    from step3_edge.quantize.schemes import cast_fp8, fp8_to_float

    g = _gen()
    slots, sq = s * b + 64, 3 * d                  # y: [q part | k | v | 5 more]
    lengths = torch.randint(1, s + 1, (b,), generator=g)
    lengths[0] = s
    perm = torch.randperm(slots, generator=g)
    write = perm[:b].clone()                       # own new slots; the keys before may share
    gather = perm[b:][torch.randint(0, slots - b, (b, s), generator=g)]
    gather[torch.arange(b), lengths - 1] = write
    cos, sin = rope_cos_sin((lengths - 1)[:, None], d, 500000.0)           # [b, 1, d]
    y = torch.randn(b, sq + 2 * d + 5, generator=g).bfloat16()
    q0 = torch.randn(b, n * d, generator=g).bfloat16()
    init = torch.randn(2, slots, d, generator=g) * 2
    init = cast_fp8(init) if kind == torch.float8_e4m3fn else init.to(kind)

    qr = apply_rope(q0.view(b, 1, n, d).transpose(1, 2), cos, sin)         # [b, n, 1, d]
    k = apply_rope(y[:, None, None, sq:sq + d], cos, sin)[:, 0, 0]
    new = torch.stack([k, y[:, sq + d:sq + 2 * d]])                        # [2, b, d]
    want_pool = init.clone()
    want_pool[:, write] = cast_fp8(new.float()) if kind == torch.float8_e4m3fn else new.to(kind)
    for threaded in (1 << 62, 0):
        monkeypatch.setattr(native, "TEAM_MIN_ELEMENTS", threaded)
        pool, q = init.clone(), q0.clone()
        got = native.decode_mfa(y, sq, q, n, cos[:, 0], sin[:, 0], pool, write, gather,
                                lengths, d ** -0.5)
        assert torch.equal(_raw(q), _raw(qr.transpose(1, 2).reshape(b, n * d)))
        assert torch.equal(_raw(pool), _raw(want_pool))
        for i in range(b):
            rows = pool[:, gather[i, :lengths[i]]]
            kv = fp8_to_float(rows) if kind == torch.float8_e4m3fn else rows.float()
            want = mfa_attention(qr[i:i + 1], kv[0][None], kv[1][None], None, d ** -0.5)
            # one bf16 step of the result, plus float32 rounding of scores, exp and sums (an
            # output near 0 is a cancelling sum of values up to max|v|)
            tol = 2.0 ** (torch.floor(torch.log2(want.float().abs().clamp(min=1e-30))) - 7) + \
                2 ** -14 * kv[1].abs().max()
            assert ((got[i:i + 1].float() - want.float()).abs() <= tol).all()


@needs_native
def test_decode_mfa_writes_fp8_as_cast_fp8() -> None:
    """Every bf16 bit pattern (NaN, infinities, subnormals, past +-448) as a value written to
    an fp8 pool: the bytes `cast_fp8` gives."""
    from step3_edge.quantize.schemes import cast_fp8

    d = 64
    v = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    b = v.numel() // d
    y = torch.cat([torch.randn(b, d).bfloat16(), v.view(b, d)], 1)       # [k | v]
    pool = torch.zeros(2, b + 16, d, dtype=torch.float8_e4m3fn)
    write = torch.arange(b)
    ones = torch.ones(b, d)
    native.decode_mfa(y, 0, torch.randn(b, d).bfloat16(), 1, ones, ones * 0, pool, write,
                      write[:, None].clone(), torch.ones(b, dtype=torch.long), 0.125)
    assert torch.equal(_raw(pool[1, :b]), _raw(cast_fp8(v.float()).view(b, d)))


@needs_native
@pytest.mark.parametrize("m", [1, 2, 12, 20])
def test_swiglu_against_the_composition(m: int, monkeypatch) -> None:
    """One MLP (weight 1, bf16 out), routed experts' weighted sums (float32 out, pairs in
    order, a row without pairs) and those plus a shared expert (bf16 out; with 20 rows, its 21
    pairs are groups of 16 and 5), on one thread and over the team, against the same math as
    torch ops around the native GEMV (gate|up, silu * up, down; `y.float() * w` accumulated in
    pair order): equal but for silu's exp (libm's against torch's), which may move a bf16
    rounding of an activation."""
    g = _gen()
    k = 256

    def mlp(inter: int) -> native.SwiGLU:
        gate, up, down = (torch.randn(*shape, generator=g).bfloat16() / 8
                          for shape in ((inter, k), (inter, k), (k, inter)))
        return native.SwiGLU(gate, up, down)

    def composed(e: native.SwiGLU, x: torch.Tensor) -> torch.Tensor:      # row by row
        gate, up, down = e.weights
        gu = torch.cat([native.Weights([gate, up]).matmul(r[None]) for r in x])
        a = torch.nn.functional.silu(gu[:, :e.m]) * gu[:, e.m:]
        return torch.cat([native.Weights([down]).matmul(r[None]) for r in a])

    experts = [mlp(96), mlp(160), mlp(96)]
    x = torch.randn(m + 1, k, generator=g).bfloat16()
    pairs = sorted((int(torch.randint(0, 3, (), generator=g)), r,
                    float(torch.rand((), generator=g))) for r in range(m) for _ in range(2))
    want = torch.zeros(m + 1, k)
    for i, r, c in pairs:
        want[r] += composed(experts[i], x[r:r + 1])[0].float() * c
    for threaded in (1 << 62, 0):
        monkeypatch.setattr(native, "THREADED_MIN_ELEMENTS", threaded)
        one = experts[1](x[:m])
        close = composed(experts[1], x[:m])
        assert one.dtype == torch.bfloat16 and (one == close).float().mean() > 0.97
        assert ((one.float() - close.float()).abs() <= 0.05 * close.float().abs().max()).all()
        got = native.swiglu(x, experts, pairs, torch.float32)
        assert got.dtype == torch.float32 and (got[m] == 0).all()
        assert (got == want).float().mean() > 0.97
        assert ((got - want).abs() <= 0.05 * want.abs().max()).all()
        # a shared expert (experts[1], on every row) summed apart: shared(x) + routed.to(bf16)
        shared = [(0, r, 1.0) for r in range(m + 1)]
        got = native.swiglu(x, experts[1:2] + experts, shared + [(i + 1, r, c) for i, r, c in
                                                                 pairs], torch.bfloat16, m + 1)
        want_b = composed(experts[1], x) + want.bfloat16()
        assert got.dtype == torch.bfloat16 and (got == want_b).float().mean() > 0.97
        assert ((got.float() - want_b.float()).abs() <= 0.05 * want_b.float().abs().max()).all()


@needs_native
@pytest.mark.parametrize("n", [1, 37, 5000])
def test_fp8_gather_is_bit_exact(n: int, monkeypatch) -> None:
    """Random rows of a pool holding every fp8 byte (NaN bytes included), gathered and decoded
    on one thread and over the team: the bits of `fp8_to_float(index_select(...))`."""
    from step3_edge.quantize.schemes import fp8_to_float

    g = _gen()
    pool = torch.randint(0, 256, (2, 600, 64), generator=g, dtype=torch.uint8)
    pool[0, :4] = torch.arange(256, dtype=torch.uint8).view(4, 64)
    idx = torch.randint(0, 600, (n,), generator=g)
    idx[0] = 1
    want = fp8_to_float(pool.index_select(1, idx))
    for threaded in (1 << 62, 0):
        monkeypatch.setattr(native, "TEAM_MIN_ELEMENTS", threaded)
        got = native.fp8_gather(pool.view(torch.float8_e4m3fn), idx)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@needs_native
@pytest.mark.parametrize("v", [1, 7, 16, 17, 33, 5000])
def test_argmax_is_greedy(v: int, monkeypatch) -> None:
    """`native.argmax` against `sampling.greedy` (torch's first index of the maximum) on rows
    with ties, a NaN (it wins, the first one), all -inf, +inf last and random values, with
    contiguous and strided rows, on one thread and over the team."""
    from step3_edge.sampling import greedy

    g = _gen()
    x = torch.randn(8, v + 3, generator=g)
    x[1] = (torch.rand(v + 3, generator=g) * 3).floor()               # many ties
    x[2, int(torch.randint(0, v, (), generator=g))] = float("nan")
    x[2, v - 1] = float("nan")
    x[3] = float("-inf")
    x[4, v - 1] = float("inf")
    x[5] = x[5].round()
    for rows in (x[:, :v].contiguous(), x[:, :v], x[::2, :v]):
        for team in (1 << 62, 0):
            monkeypatch.setattr(native, "TEAM_MIN_ELEMENTS", team)
            assert torch.equal(native.argmax(rows), greedy(rows))


@needs_native
def test_decode_group_beside_a_prefill_chunk(bundle: Path, monkeypatch) -> None:
    """A step of 3 decode sequences and a 9-token prefill chunk (continuous batching): the
    decode group through the native block, the chunk through the reference's ops, rows in
    the step's order, equal bit for bit (residual, FFN input, KV pool) to each part run as a
    step of its own (the decode part through the separate kernels), with the same routing."""
    g = _gen()
    calls: list[int] = []
    block = native.AttentionLayer.__call__
    monkeypatch.setattr(native.AttentionLayer, "__call__",
                        lambda self, h, *a: calls.append(h.shape[0]) or block(self, h, *a))
    with Step3Runtime.load(bundle, dtype="bfloat16", device="cpu", bandwidths=FIXED_BW,
                           vision=False, native_kernels=True) as rt, \
            torch.inference_mode(), rt.scheduler.engine_lock:
        attn = rt.engine.attn
        hidden = attn.cfg.text_config.hidden_size
        seqs = []
        for _ in range(3):
            n = int(torch.randint(3, 30, (), generator=g))
            seqs.append(attn.kv.allocate(n + 2))
            rt.engine.run([(seqs[-1], n)], attn.embed_tokens(
                torch.randint(3, 250, (n,), generator=g).tolist()))
        new = attn.kv.allocate(12)
        mixed = plan_step(attn.kv, [(s, 1) for s in seqs] + [(new, 9)])
        alone = [plan_step(attn.kv, [(s, 1) for s in seqs]), plan_step(attn.kv, [(new, 9)])]
        assert len(mixed.groups) == 2 and mixed.groups[0].t == 1
        pool = attn.kv.kv.clone()
        for L in range(len(attn.layers)):
            calls.clear()
            _layer_equals_parts(attn, L, torch.randn(12, hidden, generator=g).bfloat16(),
                                mixed, [(slice(0, 3), alone[0]), (slice(3, 12), alone[1])],
                                3, pool, monkeypatch)
            assert calls == [3]                          # the decode group, in the block


@needs_native
def test_build_is_cached_and_written_aside(tmp_path: Path, monkeypatch) -> None:
    """A build into a cache holding another version's build leaves one shared object (no
    temporary files, the stale build removed) that loads; a second build finds it instead of
    compiling."""
    monkeypatch.setenv("STEP3_EDGE_CACHE", str(tmp_path))
    (tmp_path / "native").mkdir()
    (tmp_path / "native" / f"{native.SOURCE.stem}-0123456789abcdef.so").write_bytes(b"old")
    cc = shutil.which("cc") or shutil.which("gcc")
    lib = native._build(cc, native.isa())
    assert [p.name for p in (tmp_path / "native").iterdir()] == [lib.name]
    native.Kernels(ctypes.CDLL(str(lib)))                   # both entry points are there
    mtime = os.stat(lib).st_mtime_ns
    assert native._build(cc, native.isa()) == lib and os.stat(lib).st_mtime_ns == mtime


def test_unavailable_native_kernels_falls_back_or_refuses(monkeypatch) -> None:
    """Where the kernel cannot run, the backend says why and stays on oneDNN; asking for it
    is refused with the reason."""
    monkeypatch.setattr(native, "_load", lambda: (None, "this CPU has no AVX512-BF16"))
    be = TorchBackend("cpu", torch.bfloat16)
    assert not be.caps.native and be.caps.native_applies
    assert be.describe()["native_unavailable"] == "this CPU has no AVX512-BF16"
    lin = be.linear("bf16", {"": torch.randn(64, 128).bfloat16()}, (64, 128))
    assert lin.packed is None or lin.packed.native is None
    with pytest.raises(ConfigError, match="no AVX512-BF16"):
        TorchBackend("cpu", torch.bfloat16, native_kernels=True)
    fp32 = TorchBackend("cpu", torch.float32).caps                  # fp32: never used
    assert not fp32.native_applies and "native_kernels" not in fp32.as_dict()


def test_native_kernels_option_is_checked(bundle: Path) -> None:
    with pytest.raises(ConfigError, match="native_kernels"):
        Step3Runtime.load(bundle, native_kernels="yes")


@needs_native
def test_runtime_logits_with_native_kernels_match_onednn(bundle: Path, monkeypatch) -> None:
    """bf16 tiny bundle, a prompt and 4 greedy decode steps fed the same tokens: logits with
    the native kernels within 2% of their range of torch / oneDNN's (bf16 rounding
    differences carried through 4 layers; a wrong row or segment would be off by the whole
    range), the same greedy token wherever oneDNN's top two are further apart than that, and
    the decode linears, norms, MLPs, experts, attention and KV reads served by the native
    kernels."""
    counted: dict[str, list] = {}
    for name in ("fp8_gather", "swiglu"):
        fn = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _f=fn, _n=name:
                            counted.setdefault(_n, []).append(a) or _f(*a))
    block = native.AttentionLayer.__call__
    monkeypatch.setattr(native.AttentionLayer, "__call__", lambda *a: counted.setdefault(
        "block", []).append(1) or block(*a))
    g = _gen()
    prompt = torch.randint(3, 250, (int(torch.randint(5, 30, (), generator=g)),), generator=g)
    steps: dict[bool, list[torch.Tensor]] = {}
    toks = torch.randint(3, 250, (4,), generator=g).tolist()
    for on in (True, False):
        with Step3Runtime.load(bundle, dtype="bfloat16", device="cpu", bandwidths=FIXED_BW,
                               vision=False, native_kernels=on) as rt, torch.inference_mode(), \
                rt.scheduler.engine_lock:
            eng = rt.engine
            kernels = " ".join(eng.attn.backend.describe()["kernels"])
            assert ("native GEMV" in kernels) == on
            assert isinstance(eng.attn.norm, NativeRMSNorm) == on
            assert (rt.scheduler.greedy is native.argmax) == on          # the greedy picks
            seq = eng.attn.kv.allocate(len(prompt) + 8)
            out = [eng.run([(seq, len(prompt))], eng.attn.embed_tokens(prompt.tolist())).clone()]
            for t in toks:
                out.append(eng.run([(seq, 1)], eng.attn.embed_tokens([t])).clone())
            steps[on] = out
            eng.attn.kv.release(seq)
    assert len(counted["block"]) == 4 * 4                       # 4 decode steps x 4 layers
    assert counted["fp8_gather"]                # the prompt's attention read the fp8 pool
    # each MoE layer's shared and routed experts in one call (`base`: the shared rows), and
    # the dense layers' MLPs in one call each
    assert any(len(a) == 5 and a[4] == 1 for a in counted["swiglu"])
    assert any(len(a) == 4 and len(a[1]) == 1 for a in counted["swiglu"])
    for a, b in zip(steps[True], steps[False]):
        span = (b.max() - b.min()).item()
        assert (a - b).abs().max() <= 0.02 * span
        top2 = b.topk(2, -1).values[0]
        if top2[0] - top2[1] > 0.04 * span:
            assert a.argmax() == b.argmax()


@needs_native
@pytest.mark.parametrize("scheme", ["fp8_per_channel", "int8_per_channel"])
def test_quantized_bundle_reads_its_weights_as_stored(tmp_path: Path, scheme: str) -> None:
    """An l20-style fp8 / a6000-style int8 bundle under bf16 compute: with the native kernels
    every quantized linear keeps the stored bytes (no dequantized copy) and serves decode
    rows through the quantized GEMV (q|k|v in one call over their parts). Logits of a prompt (GEMM on dequantized row blocks) and
    of 4 decode steps, with the kernels and without (the weights dequantized to bf16 at load),
    match the float32 reference on the bundle's own weights: RMS within 2% of the logits'
    range and max within 10% (bf16 compute rounded through 4 layers: max 1.2-2.0% on both
    paths; a router near a tie may flip an expert under bf16, which took one draw's max to
    6.8%; a wrong row, segment or scale is off by the whole range)."""
    from step3_edge.export.bundle import export_bundle
    from step3_edge.model import Step3ForConditionalGeneration

    g = _gen()
    ckpt = write_checkpoint(Step3Config.preset("tiny"), tmp_path / "ckpt", "bf16",
                            seed=int(torch.randint(0, 1000, (), generator=g)), progress=False)
    bundle = export_bundle(ckpt, "cpu", 1, tmp_path / "b", scheme=scheme, kv_tokens=4096,
                           cpu_mem_bytes=8 << 30, onnx=False, progress=False)
    ids = torch.randint(3, 250, (int(torch.randint(5, 30, (), generator=g)) + 4,),
                        generator=g).tolist()
    n = len(ids) - 4
    ref = Step3ForConditionalGeneration.from_pretrained(bundle, dtype=torch.float32)
    with torch.inference_mode():
        want = [ref(torch.tensor([ids[:t]]))[0, -1] for t in range(n, len(ids) + 1)]
    for on in (True, False):
        with Step3Runtime.load(bundle, dtype="bfloat16", device="cpu", bandwidths=FIXED_BW,
                               vision=False, native_kernels=on) as rt, torch.inference_mode(), \
                rt.scheduler.engine_lock:
            eng = rt.engine
            q = eng.attn.layers[1].self_attn.q_proj
            assert isinstance(q, backends.NativeQuant) == on
            assert isinstance(eng.attn.qkv[1], backends.FusedQuant) == on       # q|k|v
            if on:
                assert q.q.data_ptr() == q.parts[""].data_ptr()             # as stored
                assert any("native int8/fp8 GEMV" in k
                           for k in eng.attn.backend.describe()["kernels"])
            seq = eng.attn.kv.allocate(len(ids) + 4)
            got = [eng.run([(seq, n)], eng.attn.embed_tokens(ids[:n]))[0].clone()]
            got += [eng.run([(seq, 1)], eng.attn.embed_tokens([t]))[0].clone() for t in ids[n:]]
            eng.attn.kv.release(seq)
        for a, b in zip(got, want):
            err, span = a.float() - b, b.max() - b.min()
            assert err.abs().max() <= 0.1 * span and err.pow(2).mean().sqrt() <= 0.02 * span


def _same_routing(probs: torch.Tensor, got: tuple, want: tuple) -> None:
    """The native router's (ids, weights) against the reference's `route` (whose softmax gave
    probs [N, E]): the same experts in the same order, weights within float32 rounding
    (libm's exp against torch's), except where bf16 logits tie (frequent: tiny has 8 experts,
    mini 48): the native top-k takes the lower index first, torch.topk's order among equal
    values is its own; there each expert chosen must have the probability of the expert in
    its place (another probability, a wrong expert, fails)."""
    (ids, w), (ref_ids, ref_w) = got, want
    assert torch.allclose(w, ref_w, rtol=1e-5, atol=1e-7)
    same = (ids == ref_ids).all(-1)
    for r in (~same).nonzero().flatten().tolist():
        assert torch.equal(probs[r, ids[r]], probs[r, ref_ids[r]])


def _layer_equals_parts(attn, L: int, h: torch.Tensor, batch, parts: list, rows: int,
                        pool: torch.Tensor, monkeypatch) -> None:
    """`attn.layer(L, h, batch)` with the native blocks against the same rows run as the
    steps `parts` ([(rows of h, StepBatch)]) without them (the separate kernels, their GEMV
    taking up to `rows` rows), each from the KV state `pool`: the residual, the normed FFN
    input and the KV pool bit for bit, and the reference's routing (`_same_routing`)."""
    blocks = attn.blocks
    attn.kv.kv.copy_(pool)
    got = attn.layer(L, h, batch)
    got_pool, attn.blocks = attn.kv.kv.clone(), {}
    attn.kv.kv.copy_(pool)
    try:
        with monkeypatch.context() as m:
            m.setattr(native, "MAX_ROWS", rows)
            outs = [attn.layer(L, h[r], b) for r, b in parts]
            moe = attn.layers[L].moe if attn.layers[L].is_moe else None
            probs = None if moe is None else torch.cat(
                [torch.softmax(moe.gate(o[1]).float(), -1) for o in outs])
    finally:
        attn.blocks = blocks
    want = [None if f[0] is None else torch.cat(f) for f in zip(*outs)]
    assert torch.equal(_raw(got_pool), _raw(attn.kv.kv))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    if want[2] is None:
        assert got[2] is None and got[3] is None
        return
    _same_routing(probs, got[2:], want[2:])


@needs_native
@pytest.mark.parametrize("kv_dtype", ["float8_e4m3fn", "bfloat16"])
@pytest.mark.parametrize("b", [2, 11])
def test_attention_block_equals_the_separate_kernels(bundle: Path, kv_dtype: str, b: int,
                                                     monkeypatch) -> None:
    """Each layer's attention side of a decode step of b sequences of different lengths in
    native calls of at most `BLOCK_MAX_ROWS` sequences (`AttentionLayer`; 11 = 8 + 3) against
    the same layer through the separate kernels (their GEMV taking up to 8 rows, one call per
    chunk of sequences) and the reference router, on the same KV state: the residual, the
    normed FFN input and the KV pool bit for bit, and the reference's routing
    (`_same_routing`)."""
    g = _gen()
    with Step3Runtime.load(bundle, dtype="bfloat16", device="cpu", bandwidths=FIXED_BW,
                           vision=False, native_kernels=True, kv_dtype=kv_dtype) as rt, \
            torch.inference_mode(), rt.scheduler.engine_lock:
        attn = rt.engine.attn
        assert len(attn.blocks) == len(attn.layers)
        seqs = []
        for _ in range(b):
            n = int(torch.randint(3, 40, (), generator=g))
            seqs.append(attn.kv.allocate(n + 2))
            prompt = torch.randint(3, 250, (n,), generator=g).tolist()
            rt.engine.run([(seqs[-1], n)], attn.embed_tokens(prompt))
        step = native.BLOCK_MAX_ROWS
        batch = plan_step(attn.kv, [(s, 1) for s in seqs])
        chunks = [plan_step(attn.kv, [(s, 1) for s in seqs[i:i + step]])
                  for i in range(0, b, step)]
        pool = attn.kv.kv.clone()
        for L in range(len(attn.layers)):
            h = torch.randn(b, attn.cfg.text_config.hidden_size, generator=g).bfloat16()
            parts = [(slice(i * step, (i + 1) * step), c) for i, c in enumerate(chunks)]
            _layer_equals_parts(attn, L, h, batch, parts, step, pool, monkeypatch)
