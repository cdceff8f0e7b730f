"""Synthetic Step3 checkpoints in the exact real layout (the tensor names, shapes and block-fp8
format of stepfun-ai/step3 and step3-fp8; docs/model.md): the tiny and mini presets, and
real-width slices of the full model (every width real, fewer layers and experts) to rehearse a
deployment before downloading the 326 GB checkpoint.

Weights are random but deterministic: each tensor has its own generator seeded from the run
seed and the tensor name, so bf16 and block-fp8 checkpoints of one seed hold the same weights
(block-fp8 is the bf16 weight quantized as step3-fp8 was: e4m3, 128x128 blocks, float32
`weight_scale_inv`; router, norms, embeddings, lm_head and vision stay bf16).
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from step3_edge.config import Step3Config
from step3_edge.fsutil import staged_dir
from step3_edge.layout import WeightSpec, expected_weights
from step3_edge.quantize.schemes import BF16, BlockFP8, Scheme
from step3_edge.shard_writer import ShardWriter, plan_shards

FP8_QUANT_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                    "weight_block_size": [128, 128]}


CHUNK_ELEMS = 1 << 26     # values drawn and written at once: a larger tensor goes by expert
                          # and by blocks of 128 rows, so memory stays flat in model size
Piece = tuple[int | None, int, int]   # (expert or None, first row, end row)


def pieces(shape: tuple[int, ...]) -> list[Piece]:
    """How a tensor of `shape` is drawn and written: whole up to CHUNK_ELEMS values, else one
    expert of an [E, out, in] tensor at a time and, within a matrix, blocks of a multiple of
    128 rows (whole blocks of block-fp8, so every piece quantizes on its own)."""
    if math.prod(shape) <= CHUNK_ELEMS or len(shape) < 2:
        return [(None, 0, shape[0] if shape else 1)]
    experts = len(shape) == 3                   # [E, out, in]; else blocks of the first dim
    rows, row = (shape[1], shape[2]) if experts else (shape[0], math.prod(shape[1:]))
    step = max(128, CHUNK_ELEMS // row // 128 * 128)
    blocks = [(r, min(rows, r + step)) for r in range(0, rows, step)]
    if not experts:
        return [(None, r0, r1) for r0, r1 in blocks]
    return [(e, r0, r1) for e in range(shape[0]) for r0, r1 in blocks]


def _piece_shape(shape: tuple[int, ...], piece: Piece) -> tuple[int, ...]:
    e, r0, r1 = piece
    if not shape:
        return ()
    return (r1 - r0, *shape[1:]) if e is None else (r1 - r0, *shape[2:])


def random_pieces(spec: WeightSpec, seed: int) -> Iterator[tuple[Piece, torch.Tensor]]:
    """Deterministic bf16 values of one checkpoint entry, piece by piece (`pieces`), scaled so
    activations stay O(1). The generator is seeded from the run seed and the tensor name."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(spec.name.encode()))
    name, shape = spec.name, spec.shape
    if spec.role == "norm" or "layer_norm" in name and name.endswith(".weight"):
        def draw(s): return 1.0 + 0.1 * torch.randn(s, generator=g)
    elif name.endswith(".bias"):
        def draw(s): return 0.02 * torch.randn(s, generator=g)
    elif spec.role == "embed" or name.endswith(("class_embedding", "position_embedding.weight")):
        k = 1.0 if spec.role == "embed" else 0.1

        def draw(s): return torch.randn(s, generator=g) * k
    else:
        fan_in = math.prod(shape[1:]) if spec.role != "experts" else shape[-1]

        def draw(s): return torch.randn(s, generator=g) / math.sqrt(fan_in)
    for piece in pieces(shape):
        yield piece, draw(_piece_shape(shape, piece)).to(torch.bfloat16)


def random_weight(spec: WeightSpec, seed: int) -> torch.Tensor:
    """The whole tensor `random_pieces` draws (what `write_checkpoint` writes for `spec`)."""
    parts = [t for _, t in random_pieces(spec, seed)]
    return parts[0] if len(parts) == 1 else torch.cat(parts).reshape(spec.shape)


def checkpoint_bytes(cfg: Step3Config, fmt: str = "bf16") -> int:
    """Bytes of the weights `write_checkpoint` writes for `cfg` in `fmt`."""
    return sum(_scheme(spec, fmt).nbytes(spec.shape) for spec in expected_weights(cfg).values())


def _scheme(spec: WeightSpec, fmt: str) -> Scheme:
    return BlockFP8() if fmt == "block-fp8" and spec.is_linear else BF16()


def write_checkpoint(cfg: Step3Config, out: str | Path, fmt: str = "bf16", seed: int = 0,
                     shard_bytes: int = 64 * 2**20, overwrite: bool = False,
                     weights: dict[str, torch.Tensor] | None = None,
                     progress: bool = True, special: dict[str, int] | None = None,
                     merges: Sequence[tuple[str, str]] = ()) -> Path:
    """Write `cfg` as a checkpoint folder: config.json, sharded safetensors + index, tokenizer.

    `weights` (name -> tensor) overrides the random ones, e.g. for a trained model; `special`
    (token -> id) replaces the Step3 special-token ids and `merges` adds BPE merges to the
    byte-level tokenizer, e.g. for a compact vocabulary. Memory stays bounded by one piece
    (`pieces`) of one tensor, whatever the model's size.
    """
    from step3_edge.tokenizer import SPECIAL_TOKENS, write_tokenizer_files

    if fmt not in ("bf16", "block-fp8"):
        raise ValueError(f"format {fmt!r}")
    out = Path(out)
    cfg = cfg.with_quantization(FP8_QUANT_CONFIG if fmt == "block-fp8" else None)
    specs = list(expected_weights(cfg).values())
    if weights is not None:
        for spec in specs:
            if tuple(weights[spec.name].shape) != spec.shape:
                raise ValueError(f"{spec.name}: {tuple(weights[spec.name].shape)} != "
                                 f"{spec.shape}")
    shards = plan_shards(specs, lambda spec: _scheme(spec, fmt), shard_bytes)
    with staged_dir(out, overwrite, synthetic_checkpoint_owned) as tmp, \
            tqdm(total=checkpoint_bytes(cfg, fmt), desc=f"synth {fmt}", unit="B",
                 unit_scale=True, disable=not progress) as bar:
        weight_map: dict[str, str] = {}
        total = 0
        for fname, group, entries in shards:
            weight_map.update({name: fname for name, _, _ in entries})
            with ShardWriter(tmp / fname, entries) as shard:
                for spec in group:
                    _write_tensor(shard, spec, _scheme(spec, fmt), seed, weights, bar)
            total += shard.size
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        cfg.save(tmp)
        write_tokenizer_files(tmp, special=special or SPECIAL_TOKENS, merges=merges)
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg.text_config.bos_token_id,
             "eos_token_id": cfg.text_config.eos_token_id}, indent=2) + "\n")
    return out


def _write_tensor(shard: ShardWriter, spec: WeightSpec, scheme: Scheme, seed: int,
                  weights: dict[str, torch.Tensor] | None, bar: tqdm) -> None:
    """Every piece of one tensor, quantized on its own, at its byte offset in each part."""
    shape = spec.shape
    if weights is not None:
        w = weights[spec.name]
        source = ((p, w if not shape else w[p[1]:p[2]] if p[0] is None else w[p[0], p[1]:p[2]])
                  for p in pieces(shape))
    else:
        source = random_pieces(spec, seed)
    dts = scheme.part_dtypes()
    matrix = shape[1:] if len(shape) == 3 else shape      # what one expert index covers
    for (e, r0, r1), t in source:
        parts = scheme.quantize(t)
        for k, part in parts.items():
            offset = 0
            if e is not None:
                offset += e * math.prod(scheme.part_shapes(matrix)[k]) * dts[k].itemsize
            if r0:
                offset += math.prod(scheme.part_shapes((r0, *matrix[1:]))[k]) * dts[k].itemsize
            shard.write(spec.name + k, offset, part)
            bar.update(part.numel() * part.element_size())


_SYNTH_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "model.safetensors.index.json")


def synthetic_checkpoint_owned(folder: Path) -> str | None:
    """None when `folder` holds only what `write_checkpoint` writes (no folders); else why
    --force must not replace it."""
    other = sorted(p.name for p in folder.iterdir()
                   if p.is_dir() or p.is_symlink() or not (p.name in _SYNTH_FILES
                                                           or p.suffix == ".safetensors"))
    if not (folder / "config.json").is_file():
        return "it is not a checkpoint (no config.json)"
    return f"it holds files a synthetic checkpoint does not: {other[:5]}" if other else None
