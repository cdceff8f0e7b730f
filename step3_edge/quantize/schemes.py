"""Weight quantization schemes: small frozen dataclasses with pure quantize / dequantize.

A scheme turns one weight `w` of shape [..., out, in] (leading dims: stacked experts) into the
tensors stored for it: `parts[""]` is stored under the weight's own name and `parts[suffix]`
under `name + suffix` (e.g. `weight_scale_inv`). `dequantize` inverts it in float32.

Stored layouts (all scales are float32 dequantization multipliers, W ~= q * scale):

- bf16:             bf16 [..., out, in]; no scale
- block_fp8:        e4m3fn [..., out, in]; `_scale_inv` [..., ceil(out/128), ceil(in/128)]
- fp8_per_channel:  e4m3fn [..., out, in]; `_scale` [..., out, 1]
- int8_per_channel: int8 [..., out, in], q in [-127, 127]; `_scale` [..., out, 1]
- int8_block:       int8 [..., out, in], q in [-127, 127]; `_scale` [..., out, ceil(in/128)]
- int4_block:       uint8 [..., out, ceil(in/2)], two q per byte; `_scale` [..., out,
                    ceil(in/128)]

Stored names: `NAME` and `NAME_scale` (e.g. `...down_proj.weight_scale`, vLLM's name for a
dequantization multiplier); block_fp8 keeps step3-fp8's `NAME_scale_inv`. int8/int4 groups are
128 consecutive inputs of one output row (symmetric, no zero point); a partial last group
(in % 128 != 0) has its own scale from the values it holds.

int4_block nibbles hold q + 8 (offset binary, q in [-7, 7], so 1..15); the LOW nibble holds the
even input index, the high nibble the odd one; an odd `in` pads the last high nibble with 8
(zero). This is ONNX Runtime MatMulNBits' byte layout (bits=4, block_size=128, implicit zero
point 8); int8_block becomes MatMulNBits bits=8 by adding 128. `to_matmul_nbits` does both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from step3_edge.errors import QuantizationError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127
INT4_MAX = 7


@dataclass(frozen=True)
class Scheme(ABC):
    name: ClassVar[str] = ""
    storage_dtype: ClassVar[torch.dtype] = torch.bfloat16
    suffixes: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored parts of weight `w` [..., out, in]."""

    @abstractmethod
    def dequantize(self, parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """float32 weight of logical `shape` from its stored parts."""

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes stored for a weight of `shape` (all parts), without writing it."""
        dts = self.part_dtypes()
        return sum(_numel(s) * _itemsize(dts[k]) for k, s in self.part_shapes(shape).items())

    def part_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Stored shape of each part of a weight of logical `shape`."""
        return {"": tuple(shape)}

    def part_dtypes(self) -> dict[str, torch.dtype]:
        """Stored dtype of each part (scales are float32)."""
        return {"": self.storage_dtype, **{s: torch.float32 for s in self.suffixes}}


@dataclass(frozen=True)
class BF16(Scheme):
    """Not quantized: stored as bf16."""

    name: ClassVar[str] = "bf16"

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"": w.to(torch.bfloat16).contiguous()}

    def dequantize(self, parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        return parts[""].float()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _checked(w: torch.Tensor) -> torch.Tensor:
    """`w` as float32, refusing tensors that are not [..., out, in]."""
    if w.dim() < 2:
        raise QuantizationError(f"cannot quantize a tensor of shape {list(w.shape)}",
                                "only [..., out, in] weights can be quantized; keep it bf16")
    return w.float()


def safe_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """amax / qmax, with 1 where that is 0 (all-zero rows/blocks, or amax so small that the
    division underflows), so that w / scale never produces NaN or inf. A NaN or inf weight
    shows in its amax (amax propagates NaN) and is refused."""
    if not bool(torch.isfinite(amax).all()):
        raise QuantizationError("weight holds NaN or inf values",
                                "the source checkpoint is corrupt; re-download or re-create it")
    s = amax / qmax
    return torch.where(s > 0, s, torch.ones_like(s))


def cast_fp8(x: torch.Tensor) -> torch.Tensor:
    """float -> e4m3fn with saturation at +-448 (round to nearest even inside the range)."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def fp8_to_float(q: torch.Tensor) -> torch.Tensor:
    """e4m3fn (or its raw uint8 bytes) -> float32, bit-exact with `.float()` in four
    vectorised ops, where the CPU's own cast is ~7x slower (fp8 is a storage type there) and a
    256-entry table lookup ~2.5x at KV-cache sizes: the bytes are read as int8 and sign-extended
    to int32, shifted so the 7 magnitude bits sit at fp32's bits 20-26, masked to those and the
    sign bit. That reads as an fp32 2^120 times too small (subnormal for fp8's subnormals: still
    exact), and the scale is put back. The NaN bytes (0x7f, 0xff) come out as +-480."""
    bits = q.view(torch.int8).to(torch.int32)          # the one new buffer: in place after
    bits.bitwise_left_shift_(20).bitwise_and_(_SIGN_AND_MAGNITUDE)
    return bits.view(torch.float32).mul_(2.0 ** 120)


_SIGN_AND_MAGNITUDE = -0x78100000       # 0x87F00000 as int32: bit 31 and bits 20-26


def _round_int(x: torch.Tensor, qmax: int, dtype: torch.dtype) -> torch.Tensor:
    """Round to nearest (ties to even) and saturate at +-qmax."""
    return torch.round(x).clamp_(-qmax, qmax).to(dtype)


def _block_amax(w: torch.Tensor, bo: int, bi: int) -> torch.Tensor:
    """amax over [bo, bi] blocks of the last two dims; partial edge blocks allowed."""
    *lead, o, i = w.shape
    no, ni = _cdiv(o, bo), _cdiv(i, bi)
    padded = torch.zeros(*lead, no * bo, ni * bi, dtype=torch.float32)
    padded[..., :o, :i] = w.abs()
    return padded.view(*lead, no, bo, ni, bi).amax(dim=(-3, -1))  # [..., no, ni]


def expand_blocks(s: torch.Tensor, bo: int, bi: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Broadcast a per-block tensor [..., no, ni] to the weight's [..., out, in]."""
    o, i = shape[-2], shape[-1]
    return s.repeat_interleave(bo, dim=-2)[..., :o, :].repeat_interleave(bi, dim=-1)[..., :i]


def _group_view(w: torch.Tensor, g: int) -> torch.Tensor:
    """[..., out, in] -> [..., out, ceil(in/g), g], zero-padding a partial last group."""
    i = w.shape[-1]
    pad = _cdiv(i, g) * g - i
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.view(*w.shape[:-1], -1, g)


@dataclass(frozen=True)
class BlockFP8(Scheme):
    """DeepSeek / step3-fp8 format (its quantization_config): e4m3 weight, float32
    `weight_scale_inv` of shape [..., ceil(out/128), ceil(in/128)], W = W8 * S[block]."""

    name: ClassVar[str] = "block_fp8"
    storage_dtype: ClassVar[torch.dtype] = FP8
    suffixes: ClassVar[tuple[str, ...]] = ("_scale_inv",)
    block: tuple[int, int] = (128, 128)

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        bo, bi = self.block
        w = _checked(w)
        scale = safe_scale(_block_amax(w, bo, bi), FP8_MAX)  # [..., no, ni]
        q = cast_fp8(w / expand_blocks(scale, bo, bi, tuple(w.shape)))
        return {"": q.contiguous(), "_scale_inv": scale.contiguous()}

    def dequantize(self, parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        bo, bi = self.block
        q, s = parts[""], parts["_scale_inv"].float()
        *lead, o, i = q.shape
        if o % bo == 0 and i % bi == 0:                    # whole blocks: broadcast, no copy
            qb = fp8_to_float(q).view(*lead, o // bo, bo, i // bi, bi)
            return (qb * s[..., :, None, :, None]).view(q.shape)
        return fp8_to_float(q) * expand_blocks(s, bo, bi, tuple(q.shape))

    def part_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        *lead, o, i = shape
        return {"": tuple(shape),
                "_scale_inv": (*lead, _cdiv(o, self.block[0]), _cdiv(i, self.block[1]))}


@dataclass(frozen=True)
class FP8PerChannel(Scheme):
    """e4m3 weight with one float32 scale per output channel: scale = amax_row / 448."""

    name: ClassVar[str] = "fp8_per_channel"
    storage_dtype: ClassVar[torch.dtype] = FP8
    suffixes: ClassVar[tuple[str, ...]] = ("_scale",)

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        w = _checked(w)                                                    # [..., out, in]
        scale = safe_scale(w.abs().amax(dim=-1, keepdim=True), FP8_MAX)    # [..., out, 1]
        return {"": cast_fp8(w / scale).contiguous(), "_scale": scale.contiguous()}

    def dequantize(self, parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        return fp8_to_float(parts[""]) * parts["_scale"].float()

    def part_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {"": tuple(shape), "_scale": (*shape[:-1], 1)}


@dataclass(frozen=True)
class Int8PerChannel(Scheme):
    """Symmetric weight-only int8, one float32 scale per output channel: scale = amax_row/127,
    q = clamp(round(w / scale), -127, 127)."""

    name: ClassVar[str] = "int8_per_channel"
    storage_dtype: ClassVar[torch.dtype] = torch.int8
    suffixes: ClassVar[tuple[str, ...]] = ("_scale",)

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        w = _checked(w)                                                    # [..., out, in]
        scale = safe_scale(w.abs().amax(dim=-1, keepdim=True), INT8_MAX)   # [..., out, 1]
        return {"": _round_int(w / scale, INT8_MAX, torch.int8).contiguous(),
                "_scale": scale.contiguous()}

    def dequantize(self, parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        return parts[""].float() * parts["_scale"].float()

    def part_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {"": tuple(shape), "_scale": (*shape[:-1], 1)}


@dataclass(frozen=True)
class Int8Block(Scheme):
    """Symmetric int8 with one float32 scale per `group` consecutive inputs of a row:
    scale = amax_group / 127 (a partial last group uses the inputs it has)."""

    name: ClassVar[str] = "int8_block"
    storage_dtype: ClassVar[torch.dtype] = torch.int8
    suffixes: ClassVar[tuple[str, ...]] = ("_scale",)
    group: int = 128

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        w = _checked(w)
        q, scale = _quantize_groups(w, self.group, INT8_MAX)   # [..., out, nb*g], [..., out, nb]
        q = q[..., : w.shape[-1]]
        return {"": q.to(torch.int8).contiguous(), "_scale": scale.contiguous()}

    def dequantize(self, parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        return _dequantize_groups(parts[""].float(), parts["_scale"].float(), self.group)

    def part_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {"": tuple(shape), "_scale": (*shape[:-1], _cdiv(shape[-1], self.group))}


@dataclass(frozen=True)
class Int4Block(Scheme):
    """Symmetric int4 with one float32 scale per `group` inputs of a row (scale =
    amax_group / 7, q in [-7, 7]), packed two per byte: low nibble = even index, value q + 8."""

    name: ClassVar[str] = "int4_block"
    storage_dtype: ClassVar[torch.dtype] = torch.uint8
    suffixes: ClassVar[tuple[str, ...]] = ("_scale",)
    group: int = 128

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        w = _checked(w)
        q, scale = _quantize_groups(w, self.group, INT4_MAX)   # [..., out, nb*g], [..., out, nb]
        i = w.shape[-1]
        u = (q[..., :i] + 8).to(torch.uint8)                    # [..., out, in], 1..15
        if i % 2:                                               # pad with a zero (nibble 8)
            u = torch.cat([u, torch.full((*u.shape[:-1], 1), 8, dtype=torch.uint8)], dim=-1)
        packed = u[..., 0::2] | (u[..., 1::2] << 4)             # [..., out, ceil(in/2)]
        return {"": packed.contiguous(), "_scale": scale.contiguous()}

    def dequantize(self, parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        q = unpack_int4(parts[""], shape[-1]).float()             # [..., out, in]
        return _dequantize_groups(q, parts["_scale"].float(), self.group)

    def part_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        *lead, i = shape
        return {"": (*lead, _cdiv(i, 2)), "_scale": (*lead, _cdiv(i, self.group))}


def _quantize_groups(w: torch.Tensor, g: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group quantization along the last dim -> (q as float [..., out, nb*g] holding
    integers in [-qmax, qmax], scale [..., out, nb])."""
    wg = _group_view(w, g)                                          # [..., out, nb, g]
    scale = safe_scale(wg.abs().amax(dim=-1), qmax)                 # [..., out, nb]
    q = torch.round(wg / scale[..., None]).clamp_(-qmax, qmax)     # [..., out, nb, g]
    return q.flatten(-2), scale


def _dequantize_groups(q: torch.Tensor, scale: torch.Tensor, g: int) -> torch.Tensor:
    i = q.shape[-1]
    return (_group_view(q, g) * scale[..., None]).flatten(-2)[..., :i]  # [..., out, in]


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [..., ceil(n/2)] (low nibble = even index, offset 8) -> int8 [..., n] in [-8, 7]."""
    lo = (packed & 0x0F).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).flatten(-2)[..., :n]


def to_matmul_nbits(scheme: Scheme, parts: dict[str, torch.Tensor],
                    shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """ONNX Runtime `com.microsoft::MatMulNBits` initializers for a 2-D int8_block or
    int4_block weight [N=out, K=in]: (B uint8 [N, ceil(K/128), 128*bits/8], scales float32
    [N * ceil(K/128)], bits). Values are unsigned with the implicit zero point 2^(bits-1);
    K is zero-padded (value = zero point) up to whole blocks."""
    if not isinstance(scheme, Int8Block | Int4Block) or scheme.group != 128 or len(shape) != 2:
        raise QuantizationError(f"MatMulNBits needs a 2-D int8_block/int4_block weight with "
                                f"128-wide groups, got {scheme.name} {list(shape)}",
                                "requantize with --scheme int8_block or int4_block")
    n, k = shape
    nb = _cdiv(k, 128)
    if isinstance(scheme, Int8Block):
        u = (parts[""].to(torch.int16) + 128).to(torch.uint8)          # [N, K]
        b = torch.full((n, nb * 128), 128, dtype=torch.uint8)
        b[:, :k] = u
        bits = 8
    else:
        p = parts[""]                                                  # [N, ceil(K/2)]
        b = torch.full((n, nb * 64), 0x88, dtype=torch.uint8)
        b[:, : p.shape[-1]] = p
        bits = 4
    return b.view(n, nb, -1).contiguous(), parts["_scale"].float().reshape(-1), bits


SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    BF16(), BlockFP8(), FP8PerChannel(), Int8PerChannel(), Int8Block(), Int4Block())}


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise QuantizationError(f"unknown quantization scheme {name!r}",
                                f"choose one of: {', '.join(SCHEMES)}") from None
