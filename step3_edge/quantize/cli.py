"""`step3-edge quantize`: requantize a checkpoint for a target card."""

from __future__ import annotations

import argparse
import sys

from step3_edge.errors import Step3EdgeError
from step3_edge.targets import TARGETS, get_target

# the names of quantize.schemes.SCHEMES and convert's DEFAULT_SHARD_BYTES in MiB, written out so
# that `--help` does not import torch (tests/test_cli.py checks they agree)
SCHEME_NAMES = ("bf16", "block_fp8", "fp8_per_channel", "int4_block", "int8_block",
                "int8_per_channel")
SHARD_MB = 4096


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the quantize options on `p`."""
    p.add_argument("--model", required=True, help="source checkpoint folder (bf16, block-fp8 "
                   "or an earlier step3-edge quantization)")
    p.add_argument("--target", required=True, help=f"target card: {', '.join(TARGETS)}")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--scheme", choices=SCHEME_NAMES, default=None,
                   help="scheme of routed experts, shared expert and dense MLP "
                   "(default: the target's default_scheme)")
    p.add_argument("--attn-scheme", choices=SCHEME_NAMES, default=None,
                   help="scheme of the attention projections (default: same as --scheme; "
                   "bf16 keeps them unquantized)")
    p.add_argument("--override", action="append", default=[], metavar="PATTERN=SCHEME",
                   help="extra rule checked before the defaults, first match wins; PATTERN "
                   "is an fnmatch glob over tensor names (repeatable)")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="also write the per-tensor error report as JSON (default: not "
                   "written)")
    p.add_argument("--shard-mb", type=int, default=SHARD_MB,
                   help="output shard size in MiB")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output folder (only a checkpoint quantize wrote: "
                   "never the source, a folder of other files, a file or the current folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Convert, print the per-scheme error table, optionally save the JSON report."""
    from step3_edge.quantize.convert import convert_checkpoint
    from step3_edge.quantize.recipe import build_recipe

    target = get_target(args.target)
    recipe = build_recipe(target, args.scheme, args.attn_scheme, args.override)
    res = convert_checkpoint(args.model, args.out, target, recipe, overwrite=args.force,
                             shard_bytes=args.shard_mb << 20, progress=not args.quiet)
    print(res.report.table())
    if args.report:
        res.report.save(args.report)
        print(f"error report written to {args.report}")
    print(f"wrote {target.name} checkpoint to {res.out} "
          f"({res.source_bytes / 1e9:.3f} GB -> {res.output_bytes / 1e9:.3f} GB, "
          f"{res.source_bytes / 1e9 / max(res.seconds, 1e-9):.2f} GB/s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m step3_edge.quantize.cli ...`), same as the subcommand."""
    p = argparse.ArgumentParser(prog="step3-edge quantize", description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except Step3EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
