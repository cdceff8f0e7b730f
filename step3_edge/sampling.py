"""Next-token sampling shared by the reference model and the runtime."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from step3_edge.errors import PromptError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        bad = []
        if not _number(t) or not math.isfinite(t) or t < 0:
            bad.append(f"temperature {t!r} (expected a finite number >= 0)")
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < 2**31:
            bad.append(f"top_k {k!r} (expected an integer >= 0)")
        if not _number(p) or not 0 < p <= 1:                # NaN fails both comparisons
            bad.append(f"top_p {p!r} (expected a number in (0, 1])")
        if bad:
            raise PromptError("invalid sampling parameters: " + "; ".join(bad),
                              "use temperature >= 0 (0: greedy), top_k >= 0 (0: off) and "
                              "0 < top_p <= 1 (1: off)")


MAX_SEED = 2**64 - 1


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_seed(seed: Any) -> int | None:
    """`seed` as given when it is None or an integer in 0..2**64-1 (what torch.Generator
    takes); PromptError otherwise."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise PromptError(f"seed {seed!r} is not an integer in 0..{MAX_SEED}",
                          "pass a seed between 0 and 2**64 - 1")
    return seed


def check_max_new_tokens(max_new_tokens: Any, prompt_tokens: int, context: int) -> int:
    """`max_new_tokens` when it is an integer >= 1 that fits the context beside the prompt;
    PromptError naming the largest value that fits otherwise (checked before any KV cache is
    allocated for it)."""
    room = context - prompt_tokens
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
            not 1 <= max_new_tokens <= room:
        raise PromptError(f"max_new_tokens {max_new_tokens!r} does not fit: the prompt has "
                          f"{prompt_tokens:,} tokens and the context {context:,}",
                          f"pass --max-new-tokens between 1 and {room:,}" if room >= 1 else
                          "shorten the prompt")
    return max_new_tokens


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> the first index of each row's maximum [B] (argmax's result; on the CPU
    `max(dim)` finds it ~3x faster than `argmax`: 55 against 160 us for a 128K-entry row)."""
    return logits.max(dim=-1).indices


def sample_next(logits: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] (float) -> next token ids [B]."""
    if params.temperature == 0:
        return greedy(logits)
    logits = logits / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p   # keep the smallest nucleus
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
