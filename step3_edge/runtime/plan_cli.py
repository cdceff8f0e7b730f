"""`step3-edge plan`: print the device placement and memory plan. Never touches weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from step3_edge.errors import ConfigError
from step3_edge.targets import TARGETS, get_target

# the planner's defaults (runtime/planner.py, which imports torch: not imported for --help)
ACTIVATION_RESERVE_GIB = 2
HEADROOM = 0.05


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the `plan` options on `p`."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=["tiny", "mini", "full"],
                     help="plan a preset config (`full` is the real Step3)")
    src.add_argument("--model", metavar="PATH",
                     help="checkpoint or bundle folder: reads only its config.json")
    p.add_argument("--target", default="l20", metavar="NAME",
                   help=f"card profile: {', '.join(TARGETS)}")
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help="number of cards (default: 1 for cpu, else the target's cards per "
                   "server, as `export`)")
    p.add_argument("--cpu-mem", default=None, metavar="SIZE",
                   help="CPU memory for cold experts, e.g. 512GiB (default: this machine's)")
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--kv-tokens", type=int, metavar="N",
                    help="KV cache budget in tokens, all sequences together (default: what "
                    "fits after the weights)")
    kv.add_argument("--context", type=int, metavar="TOKENS",
                    help="context length per sequence; the KV budget is context x --batch "
                    "(default: 8192 when --batch is given)")
    p.add_argument("--batch", type=int, metavar="N",
                   help="concurrent sequences, with --context (default: 1 when --context is "
                   "given)")
    p.add_argument("--kv-dtype", choices=["fp8", "int8", "bf16"], default="fp8",
                   help="KV cache element type (fp8 as in the Step3 paper)")
    p.add_argument("--scheme", metavar="SCHEME",
                   help="weight scheme of the FFN linears (default: the target's)")
    p.add_argument("--attn-scheme", metavar="SCHEME",
                   help="weight scheme of the attention linears (default: "
                   "the same as --scheme)")
    p.add_argument("--attention-devices", type=int, metavar="N",
                   help="cards of the attention side (default: the planner's A/F split)")
    p.add_argument("--activation-reserve", default=None, metavar="SIZE",
                   help=f"per-device activation reserve (default: {ACTIVATION_RESERVE_GIB}GiB)")
    p.add_argument("--headroom", type=float, default=HEADROOM, metavar="FRACTION",
                   help="fraction of each card kept free")
    p.add_argument("--expert-counts", metavar="JSON",
                   help="expert counts from `step3-edge profile`, to pick the hot experts "
                   "(default: every expert equally used)")
    p.add_argument("--text-only", action="store_true", help="no vision tower (text-only serving)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--dry-run", action="store_true",
                   help="accepted for symmetry with export: planning never reads weights")


def read_counts(path: str) -> dict[int, list[int]]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        data = data.get("expert_counts", data)
        return {int(k): [int(x) for x in v] for k, v in data.items()}
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"cannot read expert counts from {path}: {e}",
                          "pass the JSON written by `step3-edge profile` "
                          "({\"layer\": [count per expert, ...]})") from e


def _cpu_mem(text: str | None) -> int:
    from step3_edge.runtime.planner import parse_size

    if text is not None:
        return parse_size(text)
    import psutil

    return int(psutil.virtual_memory().total)


def run(args: argparse.Namespace) -> int:
    """Plan and print; PlanError / ConfigError propagate to the CLI's error printer."""
    from step3_edge.config import Step3Config
    from step3_edge.runtime.planner import DEFAULT_ACTIVATION_RESERVE, plan_placement

    cfg = Step3Config.preset(args.preset) if args.preset else Step3Config.from_pretrained(
        args.model)
    kv_tokens = args.kv_tokens
    if args.context is not None or args.batch is not None:
        if kv_tokens is not None:
            raise ConfigError("--batch goes with --context, not with --kv-tokens",
                              "give either --kv-tokens N or --context C --batch B")
        kv_tokens = (args.context or 8192) * (args.batch or 1)
    if kv_tokens is not None and kv_tokens < 1:
        raise ConfigError(f"KV budget {kv_tokens} tokens", "ask for at least 1 token")
    from step3_edge.runtime.planner import parse_size

    reserve = (DEFAULT_ACTIVATION_RESERVE if args.activation_reserve is None
               else parse_size(args.activation_reserve))
    target = get_target(args.target)
    devices = target.device_count(args.devices)
    plan = plan_placement(
        cfg, target, devices, cpu_mem_bytes=_cpu_mem(args.cpu_mem),
        scheme=args.scheme, attn_scheme=args.attn_scheme, kv_tokens=kv_tokens,
        kv_bytes_per_elem=2.0 if args.kv_dtype == "bf16" else 1.0,
        attention_devices=args.attention_devices, activation_reserve_bytes=reserve,
        headroom_fraction=args.headroom,
        expert_counts=read_counts(args.expert_counts) if args.expert_counts else None,
        vision=not args.text_only)
    if args.json:
        print(json.dumps(plan.to_dict()))
    else:
        contexts = (4096, 8192, 32768) if args.context is None else (args.context,)
        print(plan.format_table(contexts))
        from step3_edge.projection import describe, measured_costs

        host = plan.cold_bytes + (0 if target.is_gpu else
                                  sum(d.total_bytes for d in plan.device_plans))
        print("\n" + "\n".join(describe(cfg, plan.model_weight_bytes, host, measured_costs())))
    return 0
