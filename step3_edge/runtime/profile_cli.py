"""`step3-edge profile [--model PATH] --prompts FILE`: run prompts through the runtime and record
how many tokens each routed expert of each MoE layer received, as the JSON that the planner
reads (`step3-edge plan --expert-counts`, `Step3Runtime.load(expert_counts=...)`).

FILE holds one prompt per line, or JSON lines with {"prompt": "..."} or {"messages": [...]}
(chat template). `--trace` also writes the routing trace (per step and MoE layer: the experts
used and those the next layer's router predicted) for replaying cache policies."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from step3_edge.errors import PromptError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the `profile` options on `p`."""
    from step3_edge.cli import add_model_argument, add_runtime_arguments, positive_int

    add_model_argument(p)
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="text file: one prompt per line, or JSON lines with {\"prompt\": ...} "
                   "or {\"messages\": [...]}")
    p.add_argument("--out", default="expert_counts.json", metavar="JSON",
                   help="where to write the expert counts")
    p.add_argument("--trace", metavar="JSON",
                   help="also write the routing trace to this JSON file (default: no trace)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, metavar="N",
                   help="tokens generated after each prompt (their routing is counted too)")
    p.add_argument("--chat", action="store_true", help="wrap plain prompts in the chat template")
    add_runtime_arguments(p)


def read_prompts(path: str | Path) -> list[Any]:
    """Prompts of a file: str, or a message list for {"messages": ...} lines."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PromptError(f"cannot read prompts from {path}: {e}",
                          "give a UTF-8 text file with one prompt per line") from e
    out: list[Any] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
                out.append(obj["messages"] if "messages" in obj else str(obj["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise PromptError(f"{path}:{i} is not a JSON line with 'prompt' or "
                                  f"'messages' ({e})", "fix that line") from e
        else:
            out.append(line)
    if not out:
        raise PromptError(f"{path} holds no prompts", "write one prompt per line")
    return out


def run(args: argparse.Namespace) -> int:
    from step3_edge.cli import resolve_bundle, runtime_overrides
    from step3_edge.runtime.api import Step3Runtime

    prompts = read_prompts(args.prompts)
    bundle, _name = resolve_bundle(args.model)
    # every prompt token routed (the prefix cache would skip repeated prefixes)
    with Step3Runtime.load(bundle, **{**runtime_overrides(args), "prefix_cache": False}) as rt:
        ids = []
        for p in prompts:
            if isinstance(p, list):
                ids.append(rt.processor.apply_chat(p))
            elif args.chat:
                ids.append(rt.processor.apply_chat([{"role": "user", "content": p}]))
            else:
                ids.append(rt.processor(p))
        rt.reset_stats()
        if args.trace:
            rt.record_trace(True)
        reqs = [rt.submit(i, v, max_new_tokens=args.max_new_tokens) for i, v in ids]
        for r in reqs:
            r.result()
        trace = rt.record_trace(False) if args.trace else None
        counts = rt.expert_counts()
        k = rt.config.text_config.moe_top_k
        tokens = sum(next(iter(counts.values()), [])) // k     # tokens through each layer
        data = {"expert_counts": {str(L): c for L, c in counts.items()},
                "prompts": len(prompts), "tokens": tokens, "bundle": str(bundle),
                "hit_rate": rt.stats()["experts"]["hit_rate"]}
    Path(args.out).write_text(json.dumps(data) + "\n")
    if trace is not None:
        Path(args.trace).write_text(json.dumps({"trace": trace}) + "\n")
    print(f"profiled {len(prompts)} prompts ({tokens} tokens): expert counts -> {args.out}"
          + (f", trace ({len(trace)} steps) -> {args.trace}" if trace is not None else ""))
    return 0
