"""`step3-edge generate`: one prompt (and images) answered by the reference model (a checkpoint
folder) or by the deployment runtime (an exported bundle)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from step3_edge.errors import BundleError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the user message")
    p.add_argument("--model", metavar="PATH",
                   help="checkpoint folder (config.json; answered by the reference model) or "
                   "engine bundle (manifest.json; answered by the runtime) "
                   "(default: the embedded default model)")
    p.add_argument("--image", action="append", default=[], metavar="IMG",
                   help="image file (repeatable; default: none)")
    p.add_argument("--system", metavar="TEXT", help="system message (default: none)")
    p.add_argument("--raw", action="store_true",
                   help="send PROMPT as-is, without the chat template")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                   help="most tokens to generate (the answer may stop sooner)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample from the k most likely tokens only (0: no limit)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample from the smallest set of tokens whose probability reaches p "
                   "(1: no limit)")
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help="seed for sampling (default: a fresh one per run)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute dtype: auto is the runtime's choice for this host on a bundle "
                   "(bf16 where the CPU has fast bf16 math or native kernels), float32 for the "
                   "reference model on a checkpoint")
    p.add_argument("--json", action="store_true",
                   help="print JSON with the prompt and generated token ids")


def run(args: argparse.Namespace) -> int:
    import torch

    from step3_edge.chat import split_reasoning
    from step3_edge.defaults import default_model
    from step3_edge.manifest import MANIFEST, looks_like_bundle
    from step3_edge.model import Step3ForConditionalGeneration
    from step3_edge.processor import Step3Processor
    from step3_edge.sampling import SamplingParams, check_max_new_tokens, check_seed

    folder = Path(args.model) if args.model else default_model()
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
    check_seed(args.seed)
    t0 = time.perf_counter()
    runtime = None
    bundle = (folder / MANIFEST).exists() or (folder / MANIFEST).is_symlink()
    if not bundle and looks_like_bundle(folder):
        raise BundleError(f"{folder} has a bundle's layout (onnx/, experts/ or device-*/ "
                          f"folders) but no {MANIFEST}", "re-export the bundle; a bundle is "
                          "never read as a plain checkpoint")
    from step3_edge.config import Step3Config

    context = Step3Config.from_pretrained(folder).text_config.max_context
    check_max_new_tokens(args.max_new_tokens, 0, context)      # before any weight is read
    if bundle:                                      # an exported bundle: the deployment runtime
        from step3_edge.runtime.api import Step3Runtime

        runtime = Step3Runtime.load(folder, dtype=args.dtype)
        proc = runtime.processor
    else:
        model = Step3ForConditionalGeneration.from_pretrained(folder, getattr(
            torch, "float32" if args.dtype == "auto" else args.dtype))
        proc = Step3Processor.from_pretrained(folder, model.config)
    load_s = time.perf_counter() - t0
    if args.raw:
        ids, views = proc(args.prompt, args.image)
    else:
        content = [{"type": "image", "image": img} for img in args.image]
        content.append({"type": "text", "text": args.prompt})
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": content}]
        ids, views = proc.apply_chat(messages)
    check_max_new_tokens(args.max_new_tokens, len(ids),
                         runtime.max_context if runtime is not None else context)
    gen = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    t1 = time.perf_counter()
    if runtime is not None:
        with runtime:
            new = runtime.generate(ids, views or None, max_new_tokens=args.max_new_tokens,
                                   sampling=sampling, seed=args.seed).token_ids
    else:
        out = model.generate(torch.tensor([ids]), args.max_new_tokens, images=views or None,
                             sampling=sampling, stop_token_ids=tuple(proc.stop_token_ids),
                             generator=gen)
        new = out[0, len(ids):].tolist()
    gen_s = time.perf_counter() - t1
    if new and new[-1] in proc.stop_token_ids:
        new = new[:-1]
    text = proc.decode(new)
    reasoning, answer = split_reasoning(text)
    if args.json:
        print(json.dumps({"model": str(folder), "prompt_token_ids": ids,
                          "generated_token_ids": new, "text": text, "reasoning": reasoning,
                          "answer": answer,
                          "load_seconds": round(load_s, 3),
                          "generate_seconds": round(gen_s, 3)}))
    else:
        if reasoning:
            print(f"(thinking: {reasoning})")
        print(answer)
        if not text.strip():
            print(f"(no printable text; generated token ids: {new})", file=sys.stderr)
    return 0
