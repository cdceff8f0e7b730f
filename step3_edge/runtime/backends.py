"""Compute backends: one small interface that turns a stored weight (the bundle's quantized form,
`CheckpointReader.read_parts`) into a callable linear layer on one device.

A backend answers `linear(scheme, parts, shape) -> Linear`. The torch backend picks a kernel per
scheme and device (`KERNELS` below says which); a `Linear` keeps the stored parts so that it can
be re-made on another device (`Linear.to`), which is how the expert store copies a cold expert
into the device cache. Weights stay in their stored form wherever a fast kernel exists; where
none exists the weight is dequantized once at load into the compute dtype, and `describe()` /
`Linear.kernel` say so.

The graph backends work on whole subgraphs rather than linears (`ort_backend.GraphBackend`):
`make_backend("onnxruntime", manifest=...)` returns the ONNX Runtime one (`ort_backend.py`),
`make_backend("tensorrt", ...)` the one that runs the bundle's TensorRT engines
(`trt_backend.py`). `builders.py` builds the model's two sides on either kind.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from step3_edge.errors import ConfigError
from step3_edge.manifest import Manifest
from step3_edge.quantize.schemes import Scheme, get_scheme
from step3_edge.runtime import native
from step3_edge.runtime.kernels import KernelCaps, fast_bf16_gemm

if TYPE_CHECKING:        # ort_backend imports this module (through engine.py)
    from step3_edge.runtime.ort_backend import GraphBackend

FP8 = torch.float8_e4m3fn
# (scheme, device type) -> kernel; "dequantized" means upcast once at load (no fast kernel).
KERNELS: dict[tuple[str, str], str] = {
    ("bf16", "cpu"): "oneDNN prepacked bf16 linear (reordered once at load) where the CPU has "
                     "fast bf16 math, else float32 GEMMs on blocks of the stored rows; F.linear "
                     "on the upcast weight for fp32 compute; the native GEMV (AVX512-BF16 or "
                     "AVX2) for calls of up to 2 rows where a C compiler allows (native.py)",
    ("bf16", "cuda"): "F.linear (bf16 as stored; upcast at load for fp32 compute)",
    ("int8_per_channel", "cpu"): "torch._weight_int8pack_mm (weight-only int8)",
    ("int8_per_channel", "cuda"): "torch._int_mm (dynamic per-row int8 activations)",
    ("int4_block", "cpu"): "torch._weight_int4pack_mm_for_cpu (group 128)",
    ("fp8_per_channel", "cuda"): "torch._scaled_mm (fp8 e4m3, per-row scales; sm89+)",
}


class Linear(nn.Module, ABC):
    """y = x W^T for one stored weight; `parts` is the stored form (kept for `to`)."""

    kernel = "dequantized"

    def __init__(self, scheme: Scheme, parts: dict[str, torch.Tensor], shape: tuple[int, int],
                 backend: TorchBackend) -> None:
        super().__init__()
        self.scheme, self.parts, self.shape, self.backend = scheme, parts, tuple(shape), backend

    @property
    def nbytes(self) -> int:
        """Bytes of the stored form (what a copy to another device moves)."""
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    @property
    def compute_nbytes(self) -> int:
        """Bytes the kernel reads per call: the stored form, or the weight dequantized at load
        where one was made (fp8 on the CPU: twice the stored bytes)."""
        return self.nbytes

    @property
    def gemv(self) -> native.Weights | None:
        """This weight's native bf16 GEMV (what the fused native blocks are built from), or
        None where it has none (the backend's `caps.native` off, or not a bf16 weight)."""
        return None

    def remake(self, backend: TorchBackend, non_blocking: bool = False) -> Linear:
        """The same weight, re-made by `backend` (copying the stored parts to its device)."""
        parts = {k: v.to(backend.device, non_blocking=non_blocking) for k, v in self.parts.items()}
        return backend.linear(self.scheme, parts, self.shape)

    def pin(self) -> Linear:
        """Page-lock the stored parts (CPU copies that will be copied to a GPU). Attributes
        that held a part itself (a bf16 `weight`, an int8 `q`) move to the pinned copy, so
        the pageable one is freed rather than kept beside it."""
        old, self.parts = self.parts, {k: v.pin_memory() for k, v in self.parts.items()}
        moved = {id(v): self.parts[k] for k, v in old.items()}
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor) and id(value) in moved:
                setattr(self, name, moved[id(value)])
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if x.dim() == 2:
            return self.matmul(x)
        lead = x.shape[:-1]
        return self.matmul(x.reshape(-1, x.shape[-1])).view(*lead, self.shape[0])

    @abstractmethod
    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # [M, in] -> [M, out]
        """The kernel: x [M, in] times the stored weight."""

    def matmul_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x [M, in] times the weight, written into `out` [M, out] (any float dtype)."""
        return out.copy_(self.matmul(x))


class PackedBf16:
    """bf16 weights [rows_i, K] used as one [sum(rows_i), K] matrix (one linear, or a fused
    q|k|v or gate|up). Where oneDNN has a fast bf16 GEMM (`prepack`: AVX512-BF16, AMX or
    AVX-NE-CONVERT), its prepacked GEMM (reordered once at load; bit-identical to `F.linear`);
    elsewhere the weight as stored, multiplied in float32 a block of rows at a time
    (`_upcast_linear`: the same float32 sums rounded once to bf16, at 4-5x the speed of torch's
    bf16 GEMM on an AVX2 CPU). For calls of at most `native.MAX_ROWS` rows the native GEMV
    (`native.py`) on the weights as stored, where the backend has it (bf16 rounding of a
    float32 sum like oneDNN's, not bit-identical: docs/runtime.md, "Decode speed")."""

    def __init__(self, weights: list[torch.Tensor], use_native: bool, prepack: bool = True
                 ) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(
            weights[0] if len(weights) == 1 else torch.cat(weights), 1) if prepack else None
        self.weights = None if prepack else [t.contiguous() for t in weights]  # no copy made
        self.native = native.Weights([t.contiguous() for t in weights]) if use_native else None

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, K] -> [M, rows] bf16, or written into `out` ([M, rows], any float dtype)."""
        if x.dim() != 2 and out is None:
            return self(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)
        m = x.shape[0]
        if self.native is not None and m <= native.MAX_ROWS and x.dtype == torch.bfloat16:
            return self.native.matmul(x, out)
        if self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, None, "none", [],
                                                   "")
            return y if out is None else out.copy_(y)
        if out is None:
            out = torch.empty(m, sum(w.shape[0] for w in self.weights), dtype=x.dtype)
        if self.native is not None and m < UPCAST_MIN_ROWS and x.dtype == torch.bfloat16:
            step = native.GEMV_MAX_ROWS                       # no faster GEMM: rows of 8
            for r in range(0, m, step):
                self.native.matmul(x[r:r + step], out[r:r + step])
            return out
        col = 0
        for w in self.weights:                      # each part into its columns of out
            if m >= UPCAST_MIN_ROWS:
                _upcast_linear(x, w, out[:, col:col + w.shape[0]])
            else:
                out[:, col:col + w.shape[0]] = F.linear(x, w)
            col += w.shape[0]
        return out


# float32 elements of one block of an upcast weight (`_upcast_linear`): 64 MB
UPCAST_BLOCK = 1 << 24
# Rows from which `_upcast_linear` beats the native GEMV in calls of 8 rows and torch's own
# bf16 GEMM on a CPU without fast bf16 math (below, converting the weight costs more than the
# arithmetic it speeds up)
UPCAST_MIN_ROWS = 64


def _upcast_linear(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [M, N] = x [M, K] @ w [N, K]^T for bf16 w on a CPU without a fast bf16 GEMM: float32
    products and sums, rounded once to x's dtype, with w upcast `UPCAST_BLOCK` elements of rows
    at a time (no float32 copy of the whole weight is made or kept)."""
    n, k = w.shape
    xf = x.float()
    step = max(1, UPCAST_BLOCK // k)
    for r in range(0, n, step):
        y = xf @ w[r:r + step].float().T                                 # [M, step] float32
        out[:, r:r + step] = y.to(x.dtype)
    return out


class DenseLinear(Linear):
    """A float weight in the compute dtype: bf16 as stored, or dequantized once at load."""

    def __init__(self, scheme: Scheme, parts: dict[str, torch.Tensor], shape: tuple[int, int],
                 backend: TorchBackend, kernel: str) -> None:
        super().__init__(scheme, parts, shape, backend)
        self.kernel = kernel
        w = parts[""]
        if w.dtype != backend.dtype or scheme.name != "bf16":
            w = scheme.dequantize(parts, self.shape).to(backend.dtype)
        self.weight = w                                                 # [out, in]
        self.packed: PackedBf16 | None = None
        if w.dtype == torch.bfloat16 and backend.device.type == "cpu":
            # oneDNN's blocked layout, reordered once: 1.3-2.7x faster than F.linear on the
            # same bf16 bytes for decode shapes, and bit-identical (tests/runtime/test_backends);
            # without a fast bf16 GEMM, float32 blocks of the weight as stored
            self.packed = backend.pack_bf16([w])
            self.kernel = kernel.replace("F.linear", (
                "oneDNN prepacked bf16 linear" if self.packed.packed is not None else
                "float32 GEMM on bf16 row blocks") + (
                " + native GEMV (<= 2 rows)" if self.packed.native else ""))

    @property
    def compute_nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    @property
    def gemv(self) -> native.Weights | None:
        return None if self.packed is None else self.packed.native

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed(x)
        return F.linear(x, self.weight)

    def matmul_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed(x, out)
        return super().matmul_into(x, out)


# schemes `NativeQuant` runs -> (its scale part, rows per scale block, inputs per scale group;
# None: the whole row)
NATIVE_QUANT: dict[str, tuple[str, int, int | None]] = {
    "int8_per_channel": ("_scale", 1, None), "fp8_per_channel": ("_scale", 1, None),
    "int8_block": ("_scale", 1, 128), "block_fp8": ("_scale_inv", 128, 128)}


class NativeQuant(Linear):
    """An int8 / fp8 weight with its float32 scales, as stored, on a CPU with the native kernels
    under bf16 compute: calls of up to `native.Q8_MAX_ROWS` rows read the stored bytes
    (`native.QuantWeights`: half the bytes of bf16, no dequantized copy); larger calls
    dequantize `UPCAST_BLOCK` elements of rows at a time to float32 for a float32 GEMM. Each
    output is the float32 sum rounded once to bf16."""

    kernel = "native int8/fp8 GEMV (<= 16 rows); float32 GEMM on dequantized row blocks"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        key, self.row_block, group = NATIVE_QUANT[self.scheme.name]
        n, k = self.shape
        self.key, self.q = key, self.parts[""].contiguous()            # [out, in] int8 / fp8
        self.scale = self.parts[key].float().reshape(-(-n // self.row_block), -1).contiguous()
        self.native = native.QuantWeights([(self.q, self.scale)], group or k, self.row_block)

    @staticmethod
    def takes(scheme: Scheme) -> bool:
        """Whether the scheme is one of `NATIVE_QUANT` with the block size named there."""
        if scheme.name not in NATIVE_QUANT:
            return False
        _, rows, group = NATIVE_QUANT[scheme.name]
        return getattr(scheme, "group", group) == group and \
            tuple(getattr(scheme, "block", (rows, group))) == (rows, group)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= native.Q8_MAX_ROWS:
            return self.native.matmul(x)
        return self.matmul_into(x, torch.empty(x.shape[0], self.shape[0], dtype=x.dtype))

    def matmul_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= native.Q8_MAX_ROWS:
            return self.native.matmul(x, out)
        n, k = self.shape
        rb = self.row_block
        step = max(rb, UPCAST_BLOCK // k // rb * rb)
        xf = x.float()
        for r in range(0, n, step):
            rows = min(step, n - r)
            part = {"": self.q[r:r + rows], self.key: self.scale[r // rb:-(-(r + rows) // rb)]}
            w = self.scheme.dequantize(part, (rows, k))                  # [rows, in] float32
            out[:, r:r + rows] = (xf @ w.T).to(x.dtype)
        return out


class FusedQuant:
    """`NativeQuant` weights of one scheme [rows_i, K] used as one [sum(rows_i), K] matrix (a
    fused q|k|v), as stored: decode rows through one quantized GEMV call over the parts,
    larger calls each part's GEMM into its columns. `native` is None: the attention block
    (`native.AttentionLayer`) takes bf16 weights only."""

    native = None

    def __init__(self, lins: list[NativeQuant]) -> None:
        assert len({(lin.scheme.name, lin.shape[1]) for lin in lins}) == 1
        self.lins, self.rows = lins, sum(lin.shape[0] for lin in lins)
        self.quant = native.QuantWeights([(lin.q, lin.scale) for lin in lins],
                                         lins[0].native.group, lins[0].row_block)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, K] -> [M, rows] in x's dtype, or written into `out` ([M, rows])."""
        if out is None:
            out = torch.empty(x.shape[0], self.rows, dtype=x.dtype)
        if x.shape[0] <= native.Q8_MAX_ROWS:
            return self.quant.matmul(x, out)
        col = 0
        for lin in self.lins:
            lin.matmul_into(x, out[:, col:col + lin.shape[0]])
            col += lin.shape[0]
        return out


class Int8WeightOnly(Linear):
    """int8 [out, in] x per-row scale through `torch._weight_int8pack_mm`."""

    kernel = "torch._weight_int8pack_mm"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.q = _aligned(self.parts[""])                               # int8 [out, in]
        self.parts = {**self.parts, "": self.q}
        self.scale = self.parts["_scale"].reshape(-1)                   # [out]
        self._scales: dict[torch.dtype, torch.Tensor] = {}

    def scale_as(self, dtype: torch.dtype) -> torch.Tensor:
        s = self._scales.get(dtype)
        if s is None:
            s = self._scales[dtype] = self.scale.to(dtype).contiguous()
        return s

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(_aligned(x), self.q, self.scale_as(x.dtype))


class Int8Dynamic(Int8WeightOnly):
    """CUDA: activations quantized per row to int8, then `torch._int_mm` (int32 accumulate).
    `_int_mm` wants more than 16 rows; decode batches are padded (or use the weight-only
    kernel where this torch has it for CUDA)."""

    kernel = "torch._int_mm"

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        if m <= 16 and self.backend.caps.int8pack_cuda:
            return super().matmul(x)
        sx = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / 127.0   # [M, 1]
        xq = (x.float() / sx).round_().clamp_(-127, 127).to(torch.int8)
        if m <= 16:
            xq = F.pad(xq, (0, 0, 0, 17 - m))
        y = torch._int_mm(xq, self.q.t())[:m]                           # [M, out] int32
        return (y.float() * sx * self.scale.float()[None]).to(x.dtype)


class Int4CPU(Linear):
    """int4_block (group 128) through `torch._weight_int4pack_mm_for_cpu`: the stored nibbles
    (value q + 8) are repacked once at load into torch's int4pack layout (same byte count)."""

    kernel = "torch._weight_int4pack_mm_for_cpu"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        from step3_edge.quantize.schemes import unpack_int4

        n, k = self.shape
        q = (unpack_int4(self.parts[""], k).to(torch.int32) + 8).contiguous()  # [out, in] 0..15
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        s = self.parts["_scale"].float()                                # [out, in/128]
        self.scales_zeros = torch.stack([s.t(), torch.zeros_like(s.t())], -1).contiguous()
        self._sz: dict[torch.dtype, torch.Tensor] = {}

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        sz = self._sz.get(x.dtype)
        if sz is None:
            sz = self._sz[x.dtype] = self.scales_zeros.to(x.dtype)
        return torch._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed, 128, sz)


class FP8Scaled(Linear):
    """CUDA sm89+: e4m3 weight with per-row scales; activations quantized per row to e4m3 and
    multiplied by `torch._scaled_mm` (bf16 output)."""

    kernel = "torch._scaled_mm"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.q = self.parts[""]                                         # e4m3 [out, in]
        self.scale = self.parts["_scale"].float().reshape(1, -1)        # [1, out]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        sx = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / 448.0   # [M, 1]
        xq = (x.float() / sx).clamp_(-448.0, 448.0).to(FP8)
        y = torch._scaled_mm(xq, self.q.t(), scale_a=sx, scale_b=self.scale,
                             out_dtype=torch.bfloat16)
        return y.to(x.dtype)


class TorchBackend:
    """The torch backend for one device (CPU or CUDA) and one compute dtype."""

    name = "torch"

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                 native_kernels: bool | None = None, dtype_reason: str = "asked") -> None:
        """`native_kernels`: under bf16 compute on the CPU, use the native decode kernels
        (`native.py`: the GEMV here; the RMSNorm, SwiGLU / experts, decode attention and fp8 KV
        gather in the engine and the expert store) (None: where they build; False: never;
        True: required)."""
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype, self.dtype_reason = dtype, dtype_reason
        self.native_kernels = native_kernels       # as asked (a CUDA backend's host takes it)
        self.used: Counter[str] = Counter()
        self.caps = KernelCaps.probe(self.device, dtype, native_kernels)   # decided once
        self.native_note = self.caps.native_unavailable

    def pack_bf16(self, weights: list[torch.Tensor]) -> PackedBf16:
        """bf16 weights [rows_i, K] as one matrix (`PackedBf16`)."""
        return PackedBf16(weights, self.caps.native, self.caps.fast_bf16_gemm)

    def linear(self, scheme: Scheme | str, parts: dict[str, torch.Tensor],
               shape: tuple[int, int]) -> Linear:
        """A Linear for one stored weight; `parts` must already be on this device."""
        scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
        n, k = shape
        cls: type[Linear] | None = None
        name, cuda = scheme.name, self.device.type == "cuda"
        if not cuda and self.dtype == torch.bfloat16 and self.caps.native and \
                NativeQuant.takes(scheme):
            cls = NativeQuant
        elif name == "int8_per_channel" and not cuda:
            cls = Int8WeightOnly
        elif name == "int8_per_channel" and self.caps.int_mm and k % 8 == 0 and n % 8 == 0:
            cls = Int8Dynamic
        elif name == "int4_block" and not cuda and self.caps.int4pack_cpu and \
                k % 128 == 0 and n % 32 == 0 and getattr(scheme, "group", 128) == 128:
            cls = Int4CPU
        elif name == "fp8_per_channel" and cuda and self.caps.scaled_mm and \
                k % 16 == 0 and n % 16 == 0:
            cls = FP8Scaled
        if cls is not None:
            lin: Linear = cls(scheme, parts, shape, self)
        else:
            kernel = "F.linear" if name == "bf16" else \
                f"dequantized at load to {str(self.dtype).removeprefix('torch.')} " \
                f"(no fast {name} kernel on {self.device.type})"
            lin = DenseLinear(scheme, parts, shape, self, kernel)
        self.used[f"{name}: {lin.kernel}"] += 1
        return lin

    def describe(self) -> dict[str, Any]:
        """Device, dtype, probed kernels and how many weights went to each kernel."""
        out = {"backend": self.name, "device": str(self.device),
               "dtype": str(self.dtype).removeprefix("torch."), "dtype_reason": self.dtype_reason,
               "native_isa": self.caps.native_isa,
               "capabilities": self.caps.as_dict(),
               "kernels": dict(self.used)}
        if self.native_note:
            out["native_unavailable"] = self.native_note
        return out


def _aligned(t: torch.Tensor, align: int = 64) -> torch.Tensor:
    """`t` contiguous and starting on an `align`-byte boundary. torch's CPU
    `_weight_int8pack_mm` crashes (SIGSEGV, torch 2.13) when its input or weight does not
    start on one, and tensors read from safetensors files can sit at 8-byte offsets."""
    t = t.contiguous()
    return t if t.data_ptr() % align == 0 else t.clone()


BACKENDS = ("torch", "onnxruntime", "tensorrt")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


DTYPES = ("float32", "bfloat16", "float16")


def resolve_dtype(dtype: torch.dtype | str | None, device: str | None) -> tuple[torch.dtype, str]:
    """The compute dtype and why: as asked, or for None / "auto" the fastest correct one for
    the device. bf16 on CUDA, and on a CPU where bf16 decode is fast (the native kernels run,
    or oneDNN has fast bf16 math); float32 on a CPU with neither, where torch's bf16 kernels
    run at a few GFLOP/s (the weights stay bf16 in the bundle; they are upcast at load)."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype)
    if dtype not in (None, "auto"):
        if not isinstance(dtype, str) or dtype.removeprefix("torch.") not in DTYPES:
            raise ConfigError(f"compute dtype {dtype!r}",
                              "use 'auto', 'float32', 'bfloat16' or 'float16'")
        return getattr(torch, dtype.removeprefix("torch.")), "asked"
    if str(device or default_device()).partition(":")[0] != "cpu":    # checked where it is made
        return torch.bfloat16, "auto: bfloat16 on a GPU"
    if native.kernel() is not None:
        return torch.bfloat16, f"auto: bfloat16 with the native kernels ({native.kernel().isa})"
    if fast_bf16_gemm():
        return torch.bfloat16, "auto: bfloat16 (oneDNN has fast bf16 math on this CPU)"
    return torch.float32, (f"auto: float32 (no fast bf16 math on this CPU, and no native "
                           f"kernels: {native.unavailable_reason()})")


def make_backend(name: str = "torch", device: str | None = None,
                 dtype: torch.dtype | str | None = None, *, manifest: Manifest | None = None,
                 threads: int | None = None, native_kernels: bool | None = None,
                 dtype_reason: str | None = None) -> TorchBackend | GraphBackend:
    """The backend called `name` on `device` (default: CUDA when present, else the CPU),
    computing in `dtype` (torch: `resolve_dtype`'s choice for None / "auto"; the graph
    backends compute in float32). ONNX Runtime and
    TensorRT need the bundle's `manifest` (its subgraphs / engines); `threads` are ONNX
    Runtime's intra-op threads; `native_kernels` is the torch backend's (`TorchBackend`);
    `dtype_reason` says why `dtype` was chosen (`decisions.decide`: "auto"'s reason)."""
    device = device or default_device()
    why = ""
    if name == "torch":
        dtype, why = resolve_dtype(dtype, device)
        why = dtype_reason or why
    elif isinstance(dtype, str):
        dtype = None if dtype == "auto" else resolve_dtype(dtype, device)[0]
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {device!r} ({e})", "give 'cpu', 'cuda' or 'cuda:N'") from e
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but CUDA is not available",
                          "pass device='cpu' or run on a machine with a CUDA GPU")
    if name == "torch":
        return TorchBackend(device, dtype, native_kernels, why)
    if name == "onnxruntime":
        from step3_edge.runtime.ort_backend import OrtBackend

        return OrtBackend(manifest, device, dtype, threads)
    if name == "tensorrt":
        from step3_edge.runtime.trt_backend import TrtBackend

        return TrtBackend(manifest, device, dtype)
    raise ConfigError(f"unknown backend {name!r}", f"choose one of: {', '.join(BACKENDS)}")
