"""Synthetic Step3 checkpoints in the exact real layout (spec §3, §4), with small sizes.

Weights are random but deterministic: each tensor has its own generator seeded from the run
seed and the tensor name, so bf16 and block-fp8 checkpoints of one seed hold the same weights
(block-fp8 is the bf16 weight quantized as step3-fp8 was: e4m3, 128x128 blocks, float32
`weight_scale_inv`; router, norms, embeddings, lm_head and vision stay bf16).
"""

from __future__ import annotations

import argparse
import json
import math
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from step3_edge.config import Step3Config
from step3_edge.fsutil import staged_dir
from step3_edge.layout import WeightSpec, expected_weights
from step3_edge.quantize.schemes import BlockFP8

FP8_QUANT_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                    "weight_block_size": [128, 128]}


def random_weight(spec: WeightSpec, seed: int) -> torch.Tensor:
    """A deterministic bf16 tensor for one checkpoint entry, scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(spec.name.encode()))
    name, shape = spec.name, spec.shape
    if spec.role == "norm" or "layer_norm" in name and name.endswith(".weight"):
        w = 1.0 + 0.1 * torch.randn(shape, generator=g)
    elif name.endswith(".bias"):
        w = 0.02 * torch.randn(shape, generator=g)
    elif spec.role == "embed" or name.endswith(("class_embedding", "position_embedding.weight")):
        w = torch.randn(shape, generator=g) * (1.0 if spec.role == "embed" else 0.1)
    else:
        fan_in = math.prod(shape[1:]) if spec.role != "experts" else shape[-1]
        w = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return w.to(torch.bfloat16)


def write_checkpoint(cfg: Step3Config, out: str | Path, fmt: str = "bf16", seed: int = 0,
                     shard_bytes: int = 64 * 2**20, overwrite: bool = False,
                     weights: dict[str, torch.Tensor] | None = None,
                     progress: bool = True, special: dict[str, int] | None = None,
                     merges: Sequence[tuple[str, str]] = ()) -> Path:
    """Write `cfg` as a checkpoint folder: config.json, sharded safetensors + index, tokenizer.

    `weights` (name -> tensor) overrides the random ones, e.g. for a trained model; `special`
    (token -> id) replaces the Step3 special-token ids and `merges` adds BPE merges to the
    byte-level tokenizer, e.g. for a compact vocabulary.
    """
    from step3_edge.tokenizer import SPECIAL_TOKENS, write_tokenizer_files

    if fmt not in ("bf16", "block-fp8"):
        raise ValueError(f"format {fmt!r}")
    out = Path(out)
    cfg = cfg.with_quantization(FP8_QUANT_CONFIG if fmt == "block-fp8" else None)
    fp8 = BlockFP8()
    specs = list(expected_weights(cfg).values())
    with staged_dir(out, overwrite, synthetic_checkpoint_owned) as tmp:
        shard: dict[str, torch.Tensor] = {}   # only one shard is held in memory at a time
        n, size, total = 1, 0, 0
        weight_map: dict[str, int] = {}
        for spec in tqdm(specs, desc=f"synth {fmt}", unit="tensor", disable=not progress):
            w = weights[spec.name] if weights is not None else random_weight(spec, seed)
            if tuple(w.shape) != spec.shape:
                raise ValueError(f"{spec.name}: {tuple(w.shape)} != {spec.shape}")
            if fmt == "block-fp8" and spec.is_linear:
                parts = fp8.quantize(w)
            else:
                parts = {"": w.to(torch.bfloat16).contiguous()}
            nbytes = sum(t.numel() * t.element_size() for t in parts.values())
            if size and size + nbytes > shard_bytes:
                save_file(shard, str(tmp / f"part-{n}"), metadata={"format": "pt"})
                shard, n, size = {}, n + 1, 0
            for suffix, t in parts.items():
                shard[spec.name + suffix] = t
                weight_map[spec.name + suffix] = n
            size += nbytes
            total += nbytes
        save_file(shard, str(tmp / f"part-{n}"), metadata={"format": "pt"})
        files = {i: f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)}
        for i in range(1, n + 1):
            (tmp / f"part-{i}").rename(tmp / files[i])
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: files[v] for k, v in weight_map.items()}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        cfg.save(tmp)
        write_tokenizer_files(tmp, special=special or SPECIAL_TOKENS, merges=merges)
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg.text_config.bos_token_id,
             "eos_token_id": cfg.text_config.eos_token_id}, indent=2) + "\n")
    return out


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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=["tiny", "mini", "full"], default="tiny")
    p.add_argument("--format", choices=["bf16", "block-fp8"], default="bf16")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-mb", type=int, default=64, help="shard size in MiB")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")


def run(args: argparse.Namespace) -> int:
    cfg = Step3Config.preset(args.preset)
    if args.preset == "full":
        from step3_edge.errors import ConfigError

        raise ConfigError("the full preset is 321B parameters (~642 GB bf16)",
                          "use --preset tiny or mini; `step3-edge plan --preset full` plans "
                          "the real model without weights")
    out = write_checkpoint(cfg, args.out, args.format, args.seed, args.shard_mb * 2**20,
                           overwrite=args.force)
    print(f"wrote {args.preset} {args.format} checkpoint to {out}")
    return 0
