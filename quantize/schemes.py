"""Weight quantization schemes: small frozen dataclasses with pure quantize / dequantize.

A scheme turns one weight `w` of shape [..., out, in] (leading dims: stacked experts) into the
tensors stored for it: `parts[""]` is stored under the weight's own name and `parts[suffix]`
under `name + suffix` (e.g. `weight_scale_inv`). `dequantize` inverts it in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from step3_edge.errors import QuantizationError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


@dataclass(frozen=True)
class Scheme:
    name: ClassVar[str] = ""
    storage_dtype: ClassVar[torch.dtype] = torch.bfloat16
    suffixes: ClassVar[tuple[str, ...]] = ()

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError  # each scheme overrides

    def dequantize(self, parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError  # each scheme overrides

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes stored for a weight of `shape` (all parts), without writing it."""
        raise NotImplementedError  # each scheme overrides


@dataclass(frozen=True)
class BF16(Scheme):
    """Not quantized: stored as bf16."""

    name: ClassVar[str] = "bf16"

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"": w.to(torch.bfloat16).contiguous()}

    def dequantize(self, parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        return parts[""].float()

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return 2 * _numel(shape)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _block_amax(w: torch.Tensor, bo: int, bi: int) -> torch.Tensor:
    """amax over [bo, bi] blocks of the last two dims; partial edge blocks allowed."""
    *lead, o, i = w.shape
    no, ni = -(-o // bo), -(-i // bi)
    padded = torch.zeros(*lead, no * bo, ni * bi, dtype=torch.float32)
    padded[..., :o, :i] = w.abs()
    return padded.view(*lead, no, bo, ni, bi).amax(dim=(-3, -1))  # [..., no, ni]


def expand_blocks(s: torch.Tensor, bo: int, bi: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Broadcast a per-block tensor [..., no, ni] to the weight's [..., out, in]."""
    o, i = shape[-2], shape[-1]
    return s.repeat_interleave(bo, dim=-2)[..., :o, :].repeat_interleave(bi, dim=-1)[..., :i]


@dataclass(frozen=True)
class BlockFP8(Scheme):
    """DeepSeek / step3-fp8 format (spec §4): e4m3 weight, float32 `weight_scale_inv` of shape
    [..., ceil(out/128), ceil(in/128)], W = W8 * S[block]."""

    name: ClassVar[str] = "block_fp8"
    storage_dtype: ClassVar[torch.dtype] = FP8
    suffixes: ClassVar[tuple[str, ...]] = ("_scale_inv",)
    block: tuple[int, int] = (128, 128)

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        bo, bi = self.block
        w = w.float()
        amax = _block_amax(w, bo, bi)
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # [..., no, ni]
        q = (w / expand_blocks(scale, bo, bi, tuple(w.shape))).clamp(-FP8_MAX, FP8_MAX)
        return {"": q.to(FP8).contiguous(), "_scale_inv": scale.contiguous()}

    def dequantize(self, parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        bo, bi = self.block
        q, s = parts[""], parts["_scale_inv"].float()
        return q.float() * expand_blocks(s, bo, bi, tuple(q.shape))

    def nbytes(self, shape: tuple[int, ...]) -> int:
        *lead, o, i = shape
        blocks = _numel(tuple(lead)) * -(-o // self.block[0]) * -(-i // self.block[1])
        return _numel(shape) + 4 * blocks


SCHEMES: dict[str, Scheme] = {s.name: s for s in (BF16(), BlockFP8())}


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise QuantizationError(f"unknown quantization scheme {name!r}",
                                f"choose one of: {', '.join(SCHEMES)}") from None
