"""Next-token sampling shared by the reference model and the runtime."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from step3_edge.errors import PromptError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise PromptError(f"invalid sampling parameters {self}",
                              "use temperature >= 0, top_k >= 0 and 0 < top_p <= 1")


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
