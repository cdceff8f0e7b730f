"""`step3-edge eval`: exact-match accuracy on the held-out shapes task, per question type.

    step3-edge eval --model CKPT|BUNDLE [--n 500] [--seed 1] [--json out.json]
    step3-edge eval --variants [--model CKPT] [--n 500] ...   (every deployment variant:
                                                             step3_edge/variants.py)

The held-out set is `step3_edge.tasks.make_examples(seed, n)` (question types in rotation,
default seed EVAL_SEED, which training never draws from). Each example is answered greedily
and compared after `normalize_answer`: the answer after `</think>` (the model thinks first),
without case, outer spaces or a final dot.

Anything with `answer(image, question) -> str` can be evaluated (`Answerer`). A checkpoint
folder (config.json) is answered by the reference model (`ReferenceAnswerer`); a bundle folder
(manifest.json) by `step3_edge.runtime.Step3Runtime` (`RuntimeAnswerer`), so every deployment
variant is measured on the same examples with the same scoring.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tqdm import tqdm

from step3_edge.errors import ConfigError
from step3_edge.tasks import EVAL_SEED, QUESTION_TYPES, Example, make_examples, normalize_answer

if TYPE_CHECKING:                  # torch is imported where a model runs: `--help` stays fast
    import torch
    from PIL import Image

MAX_NEW_TOKENS = 96   # the longest answer (four shapes described) is ~75 tokens


class Answerer(Protocol):
    """Answers one question about one image with the model's greedy output text."""

    def answer(self, image: Image.Image, question: str) -> str: ...


def _messages(image: Image.Image, question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": question}]}]


class ReferenceAnswerer:
    """The reference PyTorch model on a checkpoint folder (bf16, block-fp8, requantized)."""

    def __init__(self, folder: str | Path, dtype: torch.dtype | None = None,
                 max_new_tokens: int = MAX_NEW_TOKENS) -> None:
        """`dtype`: the model's (default float32)."""
        import torch

        from step3_edge.model import Step3ForConditionalGeneration
        from step3_edge.processor import Step3Processor

        self.model = Step3ForConditionalGeneration.from_pretrained(folder,
                                                                   dtype or torch.float32)
        self.processor = Step3Processor.from_pretrained(folder, self.model.config)
        self.stops = tuple(self.processor.stop_token_ids)
        self.max_new_tokens = max_new_tokens

    def answer(self, image: Image.Image, question: str) -> str:
        import torch

        ids, views = self.processor.apply_chat(_messages(image, question))
        out = self.model.generate(torch.tensor([ids]), self.max_new_tokens, images=views,
                                  stop_token_ids=self.stops)
        new = out[0, len(ids):].tolist()
        if new and new[-1] in self.stops:
            new = new[:-1]
        return self.processor.decode(new)


class RuntimeAnswerer:
    """A deployment bundle through `Step3Runtime.load(bundle).chat(messages)`."""

    def __init__(self, bundle: str | Path, max_new_tokens: int = MAX_NEW_TOKENS,
                 **load_kwargs: Any) -> None:
        try:
            from step3_edge.runtime import Step3Runtime  # type: ignore[attr-defined]
        except ImportError as e:
            raise ConfigError(f"{bundle} is a bundle, but step3_edge.runtime.Step3Runtime is "
                              f"not available ({e})", "evaluate the checkpoint folder instead, "
                              "or install the runtime") from e
        self.runtime = Step3Runtime.load(bundle, **load_kwargs)
        self.max_new_tokens = max_new_tokens

    def answer(self, image: Image.Image, question: str) -> str:
        return str(self.runtime.chat(_messages(image, question),
                                     max_new_tokens=self.max_new_tokens))


def load_answerer(path: str | Path, dtype: torch.dtype | None = None) -> Answerer:
    """A RuntimeAnswerer for a bundle (manifest.json), else a ReferenceAnswerer (`dtype`:
    its model's, default float32)."""
    p = Path(path)
    if (p / "manifest.json").is_file():
        return RuntimeAnswerer(p)
    if (p / "config.json").is_file():
        return ReferenceAnswerer(p, dtype)
    raise ConfigError(f"{p} holds neither manifest.json (bundle) nor config.json (checkpoint)",
                      "point --model at a checkpoint or bundle folder")


@dataclass
class EvalReport:
    """Exact-match results of one evaluation run."""

    model: str
    seed: int
    records: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def per_type(self) -> dict[str, dict[str, float]]:
        """{qtype: {"n", "correct", "accuracy"}} in QUESTION_TYPES order, plus "all"."""
        out: dict[str, dict[str, float]] = {}
        for qtype in (*QUESTION_TYPES, "all"):
            rows = [r for r in self.records if qtype in ("all", r["qtype"])]
            if rows:
                ok = sum(r["correct"] for r in rows)
                out[qtype] = {"n": len(rows), "correct": ok, "accuracy": ok / len(rows)}
        return out

    def table(self) -> str:
        """The per-type accuracy as a plain-text table."""
        lines = [f"{'question type':<14} {'n':>5} {'correct':>8} {'accuracy':>9}"]
        for qtype, s in self.per_type().items():
            lines.append(f"{qtype:<14} {s['n']:>5} {s['correct']:>8} {100 * s['accuracy']:>8.1f}%")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """Summary plus every record (question, expected, got)."""
        return {"model": self.model, "seed": self.seed, "n": len(self.records),
                "seconds": round(self.seconds, 1), "per_type": self.per_type(),
                "records": self.records}


def evaluate(answerer: Answerer, examples: list[Example], model_name: str = "",
             progress: bool = True) -> EvalReport:
    """Answer every example and score it by exact match after `normalize_answer`."""
    report = EvalReport(model_name, examples[0].seed if examples else EVAL_SEED)
    t0 = time.perf_counter()
    for ex in tqdm(examples, desc="eval", unit="q", disable=not progress):
        got = answerer.answer(ex.image, ex.question)
        report.records.append({"index": ex.index, "qtype": ex.qtype, "question": ex.question,
                               "expected": ex.answer, "got": got,
                               "correct": normalize_answer(got) == normalize_answer(ex.answer)})
    report.seconds = time.perf_counter() - t0
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    from step3_edge.cli import nonnegative_int, positive_int

    p.add_argument("--model", metavar="PATH",
                   help="checkpoint folder (answered by the reference model) or bundle folder "
                   "(answered by the runtime) (default: the embedded default model)")
    p.add_argument("--n", type=positive_int, default=500, help="number of held-out examples")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="held-out task seed")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="reference-model dtype (checkpoints only)")
    p.add_argument("--json", type=Path, metavar="FILE",
                   help="also write the report (with every answer) here (default: not written)")
    p.add_argument("--show-errors", type=nonnegative_int, default=0, metavar="N",
                   help="print up to N wrong answers")
    from step3_edge import variants

    variants.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    from step3_edge.defaults import default_model

    if args.n < 1:
        raise ConfigError(f"--n is {args.n}", "pass a positive number of examples")
    if getattr(args, "variants", False):
        from step3_edge import variants

        return variants.run(args)
    stray = [f"--{k.replace('_', '-')}" for k in ("only", "work", "rebuild", "runtime_dtype",
                                                  "device") if getattr(args, k, None)]
    if stray:
        raise ConfigError(f"{', '.join(stray)}: only used with --variants",
                          "add --variants, or drop those options")
    folder = Path(args.model) if args.model else default_model()
    import torch

    answerer = load_answerer(folder, getattr(torch, args.dtype))
    report = evaluate(answerer, make_examples(args.seed, args.n), str(folder),
                      progress=sys.stderr.isatty())
    print(f"model {folder}  held-out seed {args.seed}  n={args.n}  "
          f"({report.seconds:.0f} s)")
    print(report.table())
    wrong = [r for r in report.records if not r["correct"]][:args.show_errors]
    for r in wrong:
        print(f"  #{r['index']} {r['qtype']}: {r['question']!r} expected {r['expected']!r} "
              f"got {r['got']!r}")
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0
