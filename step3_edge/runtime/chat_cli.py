"""`step3-edge chat [--model PATH] [--image IMG]`: an interactive, streaming conversation.

Each line typed is a user turn; the answer streams as it is generated. `/reset` starts over,
`/stats` prints the expert-store and timing statistics, `/quit` (or end of input) leaves.
Images given with --image go with the first user turn."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from step3_edge.cli import add_model_argument, add_runtime_arguments, nonnegative_int, positive_int
from step3_edge.cli import runtime_overrides as runtime_overrides


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the `chat` options on `p`."""
    add_model_argument(p)
    p.add_argument("--image", action="append", default=[], metavar="IMG",
                   help="image file sent with the first question (repeatable; default: none)")
    p.add_argument("--system", metavar="TEXT",
                   help="system message put before the conversation (default: none)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, metavar="N",
                   help="most tokens generated per answer")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=nonnegative_int, default=0, metavar="K",
                   help="sample among the k most likely tokens; 0 = all")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample within the smallest set of tokens of this probability mass")
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help="seed of the sampler, for repeatable sampled answers (default: a "
                   "random seed)")
    p.add_argument("--timings", action="store_true",
                   help="after each answer, print its tokens, time to first token and decode "
                        "tokens/s to stderr (always on in a terminal)")
    add_runtime_arguments(p)


def chat_loop(rt: Any, sampling: Any, args: argparse.Namespace,
              stdin: TextIO = sys.stdin, out: TextIO = sys.stdout,
              err: TextIO = sys.stderr) -> int:
    """Read turns from `stdin` until /quit or end of input; stream answers to `out`, and
    each answer's timings to `err` (in a terminal, or with --timings)."""
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, Any]] = []
    interactive = stdin.isatty()
    images = [{"type": "image", "image": p} for p in args.image]
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            history = []
            out.write("(conversation reset)\n")
            continue
        if text == "/stats":
            out.write(json.dumps(rt.stats(), indent=1, default=str) + "\n")
            continue
        content: Any = text
        if not history and images:
            content = [*images, {"type": "text", "text": text}]
        history.append({"role": "user", "content": content})
        out.write("step3> " if interactive else "")
        ids, views = rt.processor.apply_chat(system + history)
        req = rt.submit(ids, views, max_new_tokens=args.max_new_tokens, sampling=sampling,
                        seed=args.seed)
        for piece in req.stream():
            out.write(piece)
            out.flush()
        out.write("\n")
        g = req.result()
        history.append({"role": "assistant", "content": g.text})
        if interactive or getattr(args, "timings", False):
            err.write(f"[{len(g.token_ids)} tokens, first token after "
                      f"{g.time_to_first_token_s:.2f} s, {g.decode_tokens_per_s:.1f} tok/s]\n")
    return 0


def run(args: argparse.Namespace) -> int:
    """Load the model and chat; errors are Step3EdgeErrors for the CLI to print."""
    from step3_edge.cli import resolve_bundle
    from step3_edge.runtime.api import Step3Runtime
    from step3_edge.sampling import SamplingParams, check_seed

    sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
    check_seed(args.seed)                                  # before the model loads
    bundle, _name = resolve_bundle(args.model)
    with Step3Runtime.load(bundle, **runtime_overrides(args)) as rt:
        if sys.stdin.isatty():
            print(f"step3-edge chat: {bundle} on {rt.stats()['backend']['device']} "
                  "(/reset, /stats, /quit)", file=sys.stderr)
        return chat_loop(rt, sampling, args, sys.stdin, sys.stdout, sys.stderr)
