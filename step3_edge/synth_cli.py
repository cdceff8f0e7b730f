"""`step3-edge synth`: its flags, and the checks made before `synth.write_checkpoint` runs
(kept apart from `synth`, so that `--help` imports no torch)."""

from __future__ import annotations

import argparse
from pathlib import Path

from step3_edge.config import Step3Config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=["tiny", "mini", "full"], default="tiny",
                   help="model size: tiny (seconds), mini (the benchmark size), full (the real "
                   "Step3's widths; needs --layers)")
    p.add_argument("--layers", type=int, help="full preset: decoder layers of the slice "
                   "(the real model has 61; default: none, required with --preset full)")
    p.add_argument("--experts", type=int, help="full preset: routed experts per MoE layer "
                   "(default: the real 48)")
    p.add_argument("--vision-layers", type=int,
                   help="full preset: ViT layers (default: 2 of the real 63)")
    p.add_argument("--dense-layers", type=int, default=1,
                   help="full preset: leading dense decoder layers; the rest are MoE")
    p.add_argument("--format", choices=["bf16", "block-fp8"], default="bf16",
                   help="bf16, or block-fp8 as stepfun-ai/step3-fp8 stores it")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--shard-mb", type=int, default=64, help="shard size in MiB")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output folder (only a synthetic checkpoint)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def slice_config(args: argparse.Namespace) -> Step3Config:
    """The config `synth` writes: a preset, or for `full` a real-width slice of it."""
    from step3_edge.errors import ConfigError
    from step3_edge.presets import full_slice
    from step3_edge.synth import checkpoint_bytes

    depth = {"--layers": args.layers, "--experts": args.experts,
             "--vision-layers": args.vision_layers}
    if args.preset != "full":
        given = [k for k, v in depth.items() if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply to --preset full",
                              "drop them, or use --preset full for a real-width slice")
        return Step3Config.preset(args.preset)
    if args.layers is None:
        size = checkpoint_bytes(Step3Config.preset("full"), args.format)
        raise ConfigError(f"the full preset is 321B parameters ({size / 1e9:.0f} GB in "
                          f"{args.format})",
                          "write a real-width slice with --layers N (and --experts E), or "
                          "plan the real model without weights: step3-edge plan --preset full")
    return Step3Config.from_dict(full_slice(args.layers, args.experts, args.vision_layers,
                                            args.dense_layers), source="--preset full")


def run(args: argparse.Namespace) -> int:
    import shutil

    from step3_edge.errors import ConfigError
    from step3_edge.synth import checkpoint_bytes, write_checkpoint

    cfg = slice_config(args)
    size = checkpoint_bytes(cfg, args.format)
    out = Path(args.out)
    free = shutil.disk_usage(next(p for p in (out, *out.absolute().parents) if p.exists())).free
    if size > free:
        raise ConfigError(f"the checkpoint needs {size / 1e9:.1f} GB and {out} has "
                          f"{free / 1e9:.1f} GB free",
                          "free disk space, write elsewhere, or pass fewer --layers / --experts")
    out = write_checkpoint(cfg, out, args.format, args.seed, args.shard_mb * 2**20,
                           overwrite=args.force, progress=not args.quiet)
    t = cfg.text_config
    print(f"wrote {args.preset} {args.format} checkpoint to {out}: {t.num_hidden_layers} "
          f"layers ({len(t.moe_layers)} MoE of {t.moe_num_experts} experts), hidden "
          f"{t.hidden_size}, {size / 1e9:.2f} GB")
    return 0
