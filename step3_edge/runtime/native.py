"""The decode-step kernels (`native/kernels.c`: a GEMV, SwiGLU MLPs and routed-expert sums, an
RMSNorm, a decode step's MFA attention, an fp8 KV gather, a greedy argmax): built on first use
with the system C compiler for this CPU's instruction set, cached per user, and called through
ctypes on the tensors' own memory.

Two builds of the same source exist, chosen from the CPU's flags (`isa()`): AVX512-BF16
(`native/isa_avx512.h`: VDPBF16PS dot products) and AVX2 + FMA (`native/isa_avx2.h`: bf16
widened to float32, exact, then FMA), so every x86-64 CPU of the last decade runs them. Both
compute the same bf16-rounded results; they differ only in the order of float32 sums.

The GEMV is used by the torch CPU backend for bf16 weights when a call has at most `MAX_ROWS`
rows (batch-1 and batch-2 decode, and the experts that one or two rows of a larger batch
chose): there oneDNN's per-call cost and its read rate of large weights dominate the step
(docs/runtime.md, "Decode speed"). Larger calls and prefill keep oneDNN's GEMM. For the same
calls a SwiGLU MLP runs in one call (`SwiGLU`), and so does a layer's routed experts with their
routing weights (`swiglu`), where torch spends ~6 ops per MLP and ~12 more to gather, weigh
and scatter the experts' rows. The RMSNorm replaces the reference's ~10 torch ops per norm
(`NativeRMSNorm`) under bf16 compute; a decode step's attention (RoPE, the KV write and one
query per head and sequence) replaces ~25 (`decode_mfa`); an fp8 pool's K/V rows are gathered
and decoded in one call elsewhere (`fp8_gather`, bit-exact) instead of an index_select and four
ops.

Nothing here is required: on a CPU with neither instruction set (or not x86-64), without a C
compiler, or with `STEP3_EDGE_NATIVE=0`, `kernel()` returns None, `unavailable_reason()` says
why in one line, and the backend stays on torch's kernels. The sources are the package's own
files; the ABI is written once, in `native/s3e.h`, whose prototypes type the ctypes calls
(`_entry_points`). The shared object is written aside and renamed into place, keyed by a hash
of the sources and the flags, under `$STEP3_EDGE_CACHE` (default `$XDG_CACHE_HOME/step3-edge`
or `~/.cache/step3-edge`); the builds of other sources and flags there are removed.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

NATIVE_DIR = Path(__file__).with_name("native")
SOURCE = NATIVE_DIR / "kernels.c"
HEADER = NATIVE_DIR / "s3e.h"
# no contraction of a * b + c into one FMA: products and sums round where the reference's do
COMMON_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-lm"]
# instruction set -> (the /proc/cpuinfo flags it needs, compiler flags), fastest first
ISAS = {
    "avx512_bf16": (("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16"),
                    ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl",
                     "-mavx512bf16"]),
    "avx2_fma": (("avx2", "fma", "f16c"), ["-mavx2", "-mfma", "-mf16c"]),
}
# Rows of x per call (the kernel takes up to 8). Each weight load feeds one VDPBF16PS per row,
# so from ~3 rows the kernel is compute-bound where oneDNN's blocked GEMM is not: on a 2-vCPU
# AMD EPYC (bench_native_kernels.py, one mini step's weights) native / oneDNN ms per step were
# 1 row 5.1-5.4 / 10.5-12.3, 2 rows 7.2-8.7 / 11.8-12.9, 3 rows 8.1-8.9 / 9.2-9.7,
# 4 rows 15.5 / 10.5-12.1, 16 rows 14.4-21.8 / 12.6-15.6.
MAX_ROWS = 2
# Rows of x the GEMV takes in one call (each weight row is read from memory once for all of
# them): where no blocked bf16 GEMM exists (a CPU without fast bf16 math), larger calls run it
# on 16 rows at a time (`backends.PackedBf16`)
GEMV_MAX_ROWS = 16
# Rows of x up to which a MoE layer's shared and routed experts run as one `swiglu` call
# (`expert_compute.NativeSum`; decode batches): each (row, expert) pair is a GEMV, so an expert
# two rows chose is read twice (the second time mostly from cache). Prefill chunks keep
# oneDNN's GEMM per expert.
EXPERT_MAX_ROWS = 16
# Sequences per `AttentionLayer` call (the kernel's limit; larger decode groups take several).
# A layer's attention weights are small (mini: 1.2 MB), so up to 8 rows the block is bound by
# per-call costs, not by its VDPBF16PS count: on a 2-vCPU AMD EPYC (AVX512-BF16), batch-16 decode
# went from 490 to 670 tok/s on 2 threads (two calls of 8 per layer instead of oneDNN and ~25
# torch ops), and AFD's attention side with 3 micro-batches from ~17.5 to ~7.5 ms per step.
BLOCK_MAX_ROWS = 8
# Below this many weight elements a call runs on the calling thread alone: waking the OpenMP
# team costs more than it saves (bench/bench_native_kernels.py measured the crossover).
THREADED_MIN_ELEMENTS = 1 << 20

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float


def cache_dir() -> Path:
    root = os.environ.get("STEP3_EDGE_CACHE") or \
        os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                     "step3-edge")
    return Path(root) / "native"


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (/proc/cpuinfo), empty where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def isa() -> str | None:
    """The fastest instruction set of `ISAS` this CPU has, or None (not x86-64, or neither)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    flags = cpu_flags()
    return next((name for name, (need, _) in ISAS.items() if flags.issuperset(need)), None)


def _build(cc: str, name: str) -> Path:
    flags = [*COMMON_FLAGS, *ISAS[name][1]]
    src = b"".join(p.read_bytes() for p in sorted(NATIVE_DIR.glob("*.[ch]")))
    key = hashlib.sha256(src + " ".join([cc, *flags]).encode()).hexdigest()[:16]
    stem = f"{SOURCE.stem}-{name}"
    lib = cache_dir() / f"{stem}-{key}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}-", suffix=".so", dir=lib.parent)
        os.close(fd)
        try:
            subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], check=True,
                           capture_output=True, text=True, timeout=120)
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    for old in lib.parent.glob(f"{SOURCE.stem}-*.so"):     # builds of other sources / flags
        if old != lib:
            old.unlink(missing_ok=True)     # a process that loaded it keeps its mapping
    return lib


# attribute -> C symbol; each returns void and is typed from its prototype in s3e.h
_SYMBOLS = {"gemv": "s3e_gemv_bf16", "gemv_q8": "s3e_gemv_q8", "rmsnorm": "s3e_rmsnorm_bf16",
            "decode_mfa": "s3e_decode_mfa", "fp8_gather": "s3e_fp8_gather",
            "argmax": "s3e_argmax_f32",
            "swiglu": "s3e_swiglu_bf16", "attention_block": "s3e_attention_block"}
_C_TYPES = {"int64_t": _I, "int": ctypes.c_int, "float": _F}


@cache
def _entry_points() -> dict[str, list]:
    """C symbol -> ctypes argument types, read from the prototypes in s3e.h (a pointer of any
    type is a c_void_p; int64_t, int and float are themselves)."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    out = {}
    for name, args in re.findall(r"\bvoid\s+(s3e_\w+)\s*\(([^)]*)\)\s*;", text):
        types = []
        for arg in args.split(","):
            ctype = arg.strip().rsplit(None, 1)[0].replace("const", "").strip()
            types.append(_P if "*" in arg else _C_TYPES[ctype])
        out[name] = types
    return out


class Kernels:
    """The loaded shared object's entry points, typed from s3e.h, and its instruction set."""

    def __init__(self, so: ctypes.CDLL) -> None:
        types = _entry_points()
        for name, symbol in _SYMBOLS.items():
            fn = getattr(so, symbol)
            fn.restype, fn.argtypes = None, types[symbol]
            setattr(self, name, fn)
        so.s3e_isa.restype = ctypes.c_char_p
        self.isa: str = so.s3e_isa().decode()


@cache
def _load() -> tuple[Kernels | None, str]:
    if os.environ.get("STEP3_EDGE_NATIVE", "1") == "0":
        return None, "disabled by STEP3_EDGE_NATIVE=0"
    name = isa()
    if name is None:
        return None, (f"this CPU ({platform.machine()}) has neither AVX512-BF16 nor AVX2 + FMA"
                      " + F16C")
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler (cc / gcc) on PATH"
    try:
        k = Kernels(ctypes.CDLL(str(_build(cc, name))))
    except subprocess.CalledProcessError as e:
        return None, f"building {SOURCE.name} failed: {e.stderr.strip()[-300:]}"
    except (OSError, AttributeError, subprocess.TimeoutExpired) as e:
        return None, f"building or loading {SOURCE.name} failed: {e}"
    if not _self_test(k):
        return None, f"{SOURCE.name} gave wrong results on a self-test"
    return k, ""


def kernel() -> Kernels | None:
    """The loaded kernels, or None where they cannot run here (`unavailable_reason`)."""
    return _load()[0]


def unavailable_reason() -> str:
    return _load()[1]


class Weights:
    """One or more bf16 [rows, K] weights used as one [sum(rows), K] matrix (a fused q|k|v or
    gate|up), held by reference: no copy is made."""

    def __init__(self, parts: list[torch.Tensor]) -> None:
        assert all(p.dtype == torch.bfloat16 and p.dim() == 2 and p.is_contiguous()
                   and p.shape[1] == parts[0].shape[1] for p in parts)
        self.parts = parts                               # kept alive: the kernel reads them
        self.k = parts[0].shape[1]
        self.rows = sum(p.shape[0] for p in parts)
        self._ptrs = (ctypes.c_void_p * len(parts))(*[p.data_ptr() for p in parts])
        self._rows = (ctypes.c_int64 * len(parts))(*[p.shape[0] for p in parts])
        self._threaded = self.rows * self.k >= THREADED_MIN_ELEMENTS
        self._gemv = kernel().gemv                       # looked up once, not per call

    def matmul(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x bf16 [M <= 16, K] -> bf16 [M, rows], or into `out` ([M, >= rows] float32
        or bf16, rows contiguous; float32 receives the bf16-rounded value)."""
        m = x.shape[0]
        assert x.dtype == torch.bfloat16 and 0 < m <= GEMV_MAX_ROWS
        x = x.contiguous()
        if out is None:
            out = torch.empty(m, self.rows, dtype=torch.bfloat16)
        threads = torch.get_num_threads() if self._threaded else 1
        self._gemv(x.data_ptr(), m, self.k, self._ptrs, self._rows, len(self.parts),
                   out.data_ptr(), out.stride(0), out.dtype == torch.float32, threads)
        return out


# stored weight dtypes `QuantWeights` takes -> the kernel's code for each
Q8_KINDS = {torch.int8: 0, torch.float8_e4m3fn: 1}
# rows of x per `QuantWeights` call (the kernel's limit; each weight row is read once for all)
Q8_MAX_ROWS = 16


class QuantWeights:
    """One or more int8 / fp8 e4m3fn weights [rows_i, K] with float32 scales, used as one
    [sum(rows_i), K] matrix, held by reference (no copy, no dequantized weight): each scale
    covers a block of `row_block` rows and `group` inputs (scales_i float32 [ceil(rows_i /
    row_block), ceil(K / group)]): per channel (1, K), `int8_block` (1, 128), `block_fp8`
    (128, 128)."""

    def __init__(self, parts: list[tuple[torch.Tensor, torch.Tensor]], group: int,
                 row_block: int = 1) -> None:
        kind = parts[0][0].dtype
        assert kind in Q8_KINDS and all(q.dtype == kind and q.dim() == 2 and q.is_contiguous()
                                        and q.shape[1] == parts[0][0].shape[1] and
                                        s.dtype == torch.float32 and s.is_contiguous()
                                        for q, s in parts)
        self.parts = parts                               # kept alive: the kernel reads them
        self.k = parts[0][0].shape[1]
        self.rows = sum(q.shape[0] for q, _ in parts)
        self.fmt, self.group, self.row_block = Q8_KINDS[kind], group, row_block
        self._ptrs = (ctypes.c_void_p * len(parts))(*[q.data_ptr() for q, _ in parts])
        self._scales = (ctypes.c_void_p * len(parts))(*[s.data_ptr() for _, s in parts])
        self._rows = (ctypes.c_int64 * len(parts))(*[q.shape[0] for q, _ in parts])
        self._threaded = self.rows * self.k >= THREADED_MIN_ELEMENTS
        self._gemv = kernel().gemv_q8

    def matmul(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [M <= 16, K] (bf16 or float32) -> bf16 [M, rows], or into `out` ([M, >= rows]
        float32 or bf16, rows contiguous; float32 receives the bf16-rounded value)."""
        m = x.shape[0]
        assert 0 < m <= Q8_MAX_ROWS and x.shape[1] == self.k
        xf = x.float().contiguous()
        if out is None:
            out = torch.empty(m, self.rows, dtype=torch.bfloat16)
        threads = torch.get_num_threads() if self._threaded else 1
        self._gemv(xf.data_ptr(), m, self.k, self._ptrs, self._scales, self._rows,
                   len(self.parts), self.fmt, self.group, self.row_block, out.data_ptr(),
                   out.stride(0), out.dtype == torch.float32, threads)
        return out


class SwiGLU:
    """A SwiGLU MLP's bf16 gate, up [m, K] and down [K, m] weights for `swiglu` (held by
    reference: no copy is made). Called on x [M <= 16, K] it is the reference's `Step3MLP`."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        m, k = gate.shape
        assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in (gate, up, down))
        assert up.shape == (m, k) and down.shape == (k, m)
        self.weights = (gate, up, down)                  # kept alive: the kernel reads them
        self.m, self.k = m, k
        self.entry = (gate.data_ptr(), up.data_ptr(), down.data_ptr(), m)
        self.elements = 3 * m * k

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x bf16 [M, K] -> bf16 [M, K]."""
        return swiglu(x, [self], [(0, r, 1.0) for r in range(x.shape[0])], torch.bfloat16)


def swiglu(x: torch.Tensor, mlps: list[SwiGLU], pairs: list[tuple[int, int, float]],
           dtype: torch.dtype, base: int = 0) -> torch.Tensor:
    """sum over `pairs` (mlp index, row of x, weight), in their order, of weight * mlp(x[row])
    for x bf16 [M, K] -> [M, K] float32 sums (dtype=torch.float32) or those rounded to
    bf16: a routed-expert layer's `index_put_` of weighted expert outputs, or one MLP with
    weight 1. With `base` (bf16 only), the first `base` pairs (a shared expert: one per row,
    weight 1) are summed apart and added to the bf16 sum of the rest, as `shared(x) +
    routed.to(torch.bfloat16)`. Rows without pairs are 0."""
    m, k = x.shape
    assert x.dtype == torch.bfloat16 and m > 0 and all(e.k == k for e in mlps)
    assert not base or dtype == torch.bfloat16
    x = x.contiguous()
    n = len(pairs)
    entries = (ctypes.c_int64 * (4 * len(mlps)))(*[v for e in mlps for v in e.entry])
    rows = (ctypes.c_int64 * (2 * n))(*[v for i, r, _ in pairs for v in (i, r)])
    coef = (ctypes.c_float * n)(*[c for _, _, c in pairs])
    widest = max(e.m for e in mlps)
    xg = torch.empty(n * k)                         # float32-sized: the rows in the kernel's form
    act = torch.empty(n * widest)
    out = torch.empty(m, k, dtype=dtype)
    acc = out if dtype == torch.float32 else torch.empty(2, m, k)
    work = sum(mlps[i].elements for i, _, _ in pairs)
    threads = torch.get_num_threads() if work >= THREADED_MIN_ELEMENTS else 1
    kernel().swiglu(x.data_ptr(), m, k, entries, rows, coef, n, base, out.data_ptr(),
                    dtype == torch.float32, xg.data_ptr(), act.data_ptr(), widest,
                    acc.data_ptr(), threads)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference RMSNorm of bf16 x [..., n] (last dim contiguous; rows may be strided)
    with a float32 weight [n] -> bf16 [..., n]."""
    k = kernel()
    assert k is not None and x.dtype == torch.bfloat16 and weight.dtype == torch.float32
    n = x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, n)        # a view where the rows allow it
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    k.rmsnorm(x2.data_ptr(), x2.stride(0) if x2.shape[0] > 1 else n, weight.data_ptr(),
              y.data_ptr(), x2.shape[0], n, eps)
    return y


# `decode_mfa` (keys x head_dim x heads) and `fp8_gather` (values out) split their work over
# the OpenMP team from this size. A decode step's attention, 8 heads of 64, fp8 KV, on
# a 2-vCPU AMD EPYC (AVX512-BF16): S = 64 / 512 / 4,096 took 32 / 60 / 276 us on one thread,
# 41 / 71 / 206 on two (torch's ops: 316 / 478 / 1,665; bench_native_kernels.py).
TEAM_MIN_ELEMENTS = 1 << 16
# KV pool dtypes `decode_mfa` reads and writes -> the kernel's code for each
KV_KINDS = {torch.float8_e4m3fn: 0, torch.bfloat16: 1, torch.float32: 2}


def decode_mfa(y: torch.Tensor, koff: int, q: torch.Tensor, heads: int, cos: torch.Tensor,
               sin: torch.Tensor, pool: torch.Tensor, write: torch.Tensor,
               gather: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """One decode step's attention for B sequences after the projections, in one call: RoPE
    of the query heads (q bf16 [B, heads * d], rotated in place) and of the key (y bf16
    [B, >= koff + 2d]: the key at koff, the value after it), both written to the KV pool
    (`pool` [2, slots, d] of a `KV_KINDS` dtype, contiguous) at slots `write` [B], then each
    head against the first lengths[b] keys of `gather` [B, S] -> bf16 [B, heads, 1, d].
    cos, sin: float32 [B, d]; index tensors int64, contiguous, valid slots; d % 16 == 0,
    d <= 512. What `apply_rope`, `GroupCache.update` and `mfa_attention` compute: the pool
    receives the same bytes, the attention sums in another order (float32 throughout)."""
    b, s = gather.shape
    d = pool.shape[-1]
    assert y.dtype == q.dtype == torch.bfloat16 and y.stride(-1) == q.stride(-1) == 1
    assert pool.is_contiguous() and d % 16 == 0 and d <= 512 and q.shape[-1] == heads * d
    out = torch.empty(b, heads, 1, d, dtype=torch.bfloat16)
    threads, chunks, floats = _attention_split(b, heads, s, d)
    scratch = torch.empty(floats)
    kernel().decode_mfa(y.data_ptr(), y.stride(0), koff, koff + d, q.data_ptr(), q.stride(0),
                        cos.data_ptr(), sin.data_ptr(), pool.data_ptr(), KV_KINDS[pool.dtype],
                        pool.shape[1], write.data_ptr(), gather.data_ptr(), s,
                        lengths.data_ptr(), b, heads, d, scale, out.data_ptr(),
                        scratch.data_ptr(), scratch[b * heads * s:].data_ptr(), chunks, threads)
    return out


def _attention_split(b: int, heads: int, s: int, d: int) -> tuple[int, int, int]:
    """(threads, key chunks per sequence, float32 scratch elements) for a decode step's
    attention (`s3e_decode_mfa`'s scores and part): the team from `TEAM_MIN_ELEMENTS`, and
    each sequence's keys split so that b sequences give every thread a chunk (at most 64)."""
    threads, chunks = 1, 1
    if b * heads * s * d >= TEAM_MIN_ELEMENTS:
        threads = torch.get_num_threads()
        chunks = min(64, max(1, threads // b))
    return threads, chunks, b * (heads * s + chunks * (heads * (2 * d + 2) + 16 * d))


class _Layer(ctypes.Structure):
    """`s3e_layer` in decode_bf16.c (field for field)."""

    _fields_ = [("hidden", _I), ("sq", _I), ("heads", _I), ("head_dim", _I), ("experts", _I),
                ("top_k", _I), ("norm_topk", _I), ("in_norm", _P), ("inter_norm", _P),
                ("post_norm", _P), ("qkv", _P * 3), ("qkv_rows", _I * 3), ("qkv_nseg", _I),
                ("wq", _P), ("wo", _P), ("router", _P), ("threaded_qkv", _I),
                ("threaded_wq", _I), ("threaded_wo", _I), ("eps", _F), ("scale", _F)]


class AttentionLayer:
    """One layer's attention side for decode groups of at most 8 sequences, in one native call
    (`s3e_attention_block`): what `engine._attention_side` and the router compute through the
    separate kernels (`rms_norm`, the GEMV, `decode_mfa`), with the same bits, and the router's
    softmax and top-k (libm's exp: within float32 rounding of torch's). Holds the weights by
    reference: norms float32 [hidden] / [sq]; `qkv` the fused q|k|v, `wq`, `wo`, `router` (None
    on dense layers) as `Weights`."""

    def __init__(self, norms: tuple[torch.Tensor, torch.Tensor, torch.Tensor], eps: float,
                 qkv: Weights, wq: Weights, wo: Weights, router: Weights | None, heads: int,
                 top_k: int, norm_topk: bool) -> None:
        assert len(qkv.parts) <= 3 and all(n.dtype == torch.float32 and n.is_contiguous()
                                           for n in norms)
        self.keep = (norms, qkv, wq, wo, router)         # kept alive: the kernel reads them
        hidden, sq = qkv.k, wq.k
        d = (qkv.rows - sq) // 2
        assert wq.rows == heads * d and wo.k == heads * d and wo.rows == hidden
        self.hidden, self.sq, self.heads, self.d = hidden, sq, heads, d
        self.experts, self.top_k = (router.rows, top_k) if router is not None else (0, 0)
        c = self.c = _Layer(hidden, sq, heads, d, self.experts, self.top_k, int(norm_topk),
                            *(n.data_ptr() for n in norms))
        for i, part in enumerate(qkv.parts):
            c.qkv[i], c.qkv_rows[i] = part.data_ptr(), part.shape[0]
        c.qkv_nseg = len(qkv.parts)
        c.wq, c.wo = wq.parts[0].data_ptr(), wo.parts[0].data_ptr()
        c.router = router.parts[0].data_ptr() if router is not None else None
        c.threaded_qkv, c.threaded_wq, c.threaded_wo = qkv._threaded, wq._threaded, wo._threaded
        c.eps, c.scale = eps, d ** -0.5
        self._block = kernel().attention_block

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 pool: torch.Tensor, write: torch.Tensor, gather: torch.Tensor,
                 lengths: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Residual rows h bf16 [B <= 8, hidden] of a decode group (`decode_mfa`'s cos ..
        lengths) -> (h + attention, its post-attention norm, top-k ids int64 / weights float32
        [B, k] or None on dense layers)."""
        b, s = gather.shape
        assert h.dtype == torch.bfloat16 and h.is_contiguous() and 0 < b <= 8 and \
            h.shape == (b, self.hidden) and pool.is_contiguous()
        d, heads, e = self.d, self.heads, self.experts
        h_out, x_out = torch.empty(2, b, self.hidden, dtype=torch.bfloat16)
        ids = torch.empty(b, self.top_k, dtype=torch.long)
        w = torch.empty(b, self.top_k)
        bs = torch.empty(b * (2 * self.hidden + 2 * self.sq + 2 * d + 2 * heads * d + e),
                         dtype=torch.bfloat16)
        threads, chunks, floats = _attention_split(b, heads, s, d)
        fs = torch.empty(floats + e)
        self._block(ctypes.byref(self.c), h.data_ptr(), b, cos.data_ptr(), sin.data_ptr(),
                    pool.data_ptr(), KV_KINDS[pool.dtype], pool.shape[1], write.data_ptr(),
                    gather.data_ptr(), s, lengths.data_ptr(), h_out.data_ptr(), x_out.data_ptr(),
                    ids.data_ptr(), w.data_ptr(), bs.data_ptr(), fs.data_ptr(), chunks, threads,
                    torch.get_num_threads())
        return (h_out, x_out) + ((ids, w) if e else (None, None))


def fp8_gather(pool: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` [N] (int64) of an fp8 KV pool's raw bytes [2, slots, d] (uint8 or
    float8_e4m3fn, contiguous, d % 16 == 0) -> float32 [2, N, d], bit for bit
    `fp8_to_float(pool.index_select(1, idx))`. The indices must be valid slots."""
    _, slots, d = pool.shape
    n = idx.numel()
    out = torch.empty(2, n, d)
    threads = torch.get_num_threads() if 2 * n * d >= TEAM_MIN_ELEMENTS else 1
    kernel().fp8_gather(pool.data_ptr(), slots, d, idx.data_ptr(), n, out.data_ptr(), threads)
    return out


def argmax(x: torch.Tensor) -> torch.Tensor:
    """`sampling.greedy` of float32 logits x [B, V] (rows contiguous): the first index of each
    row's maximum, a NaN counting as the maximum, as int64 [B]. torch's `max(dim)` reads
    [16, 128K] logits at ~4.5 GB/s on one thread and does not split the rows over threads
    (~1.8 ms, 6% of a batch-16 step); this reads at memory speed, rows over the team."""
    b, v = x.shape
    assert x.dtype == torch.float32 and x.stride(1) == 1 and 0 < v < 1 << 31
    out = torch.empty(b, dtype=torch.long)
    threads = min(b, torch.get_num_threads()) if b * v >= TEAM_MIN_ELEMENTS else 1
    kernel().argmax(x.data_ptr(), b, v, x.stride(0), out.data_ptr(), threads)
    return out


def _self_test(k: Kernels) -> bool:
    """A random product (with a tail of K and two segments) against float64, and a random
    RMSNorm against torch's."""
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(5, 80, generator=g).bfloat16(), torch.randn(7, 80, generator=g).bfloat16()]
    x = torch.randn(3, 80, generator=g).bfloat16()
    ptrs = (ctypes.c_void_p * 2)(*[t.data_ptr() for t in w])
    rows = (ctypes.c_int64 * 2)(5, 7)
    y = torch.empty(3, 12)
    k.gemv(x.data_ptr(), 3, 80, ptrs, rows, 2, y.data_ptr(), 12, 1, 1)
    ref = x.double() @ torch.cat(w).double().T
    nw = torch.rand(80, generator=g) + 0.5
    yn = torch.empty(3, 80, dtype=torch.bfloat16)
    k.rmsnorm(x.data_ptr(), 80, nw.data_ptr(), yn.data_ptr(), 3, 80, 1e-5)
    want = torch.nn.functional.rms_norm(x.float(), (80,), nw, 1e-5)
    return bool(torch.allclose(y.double(), ref, rtol=2 ** -7, atol=1e-3)) and \
        bool(torch.allclose(yn.float(), want, rtol=2 ** -7, atol=1e-6))
