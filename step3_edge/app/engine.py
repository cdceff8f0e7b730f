"""The app's handle on the runtime: one loaded `Step3Runtime`, streamed answers with their
statistics, the device plan and the memory in use. No model logic lives here: tokenizing,
images, sampling, batching and the expert cache are the runtime's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class AnswerStats:
    """What one answer cost: tokens, time to first token, speed and expert-cache hit rate."""

    prompt_tokens: int
    completion_tokens: int
    first_token_s: float | None
    total_s: float
    finish_reason: str                  # "stop", "length" (OpenAI's words) or "cancelled"
    expert_hit_rate: float | None       # None: no routed expert was used meanwhile

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: answer tokens after the first over the time after the first piece
        (all tokens over the whole time when no printable piece came)."""
        if self.first_token_s is None or self.completion_tokens < 2:
            return self.completion_tokens / self.total_s if self.total_s > 0 else 0.0
        span = self.total_s - self.first_token_s
        return (self.completion_tokens - 1) / span if span > 0 else 0.0


class Answer:
    """One streamed answer: iterate for text pieces; `stats` is set once it has finished.

    `close()` may be called from any thread (the stop button, a client that went away): the
    iteration ends after the piece in progress, and the runtime request is cancelled where the
    runtime offers `Request.cancel()`. Times count from the call to
    `ChatEngine.answer` (images are decoded in it).
    """

    def __init__(self, engine: ChatEngine, request: Any, t0: float,
                 experts0: tuple[int, int]) -> None:
        self._engine = engine
        self.request = request
        self._stream = request.stream()
        self._closed = False
        self._t0 = t0
        self._experts0 = experts0
        self._first: float | None = None
        self.text = ""
        self.stats: AnswerStats | None = None

    def __iter__(self) -> Iterator[str]:
        while not self._closed:
            piece = next(self._stream, None)       # blocks until the runtime has a piece
            if piece is None:
                self._finish()
                return
            if self._first is None:
                self._first = time.perf_counter() - self._t0
            self.text += piece
            yield piece

    def _finish(self, reason: str | None = None) -> None:
        r = self.request
        (h0, a0), (h1, a1) = self._experts0, self._engine._expert_counters()
        hits, accesses = h1 - h0, a1 - a0     # all requests in flight share these counters
        self.stats = AnswerStats(
            prompt_tokens=len(r.prompt_ids), completion_tokens=len(r.token_ids),
            first_token_s=self._first, total_s=time.perf_counter() - self._t0,
            finish_reason=reason or r.finish_reason or "length",
            expert_hit_rate=hits / accesses if accesses > 0 else None)
        self._engine.last_answer = self

    def close(self) -> None:
        """Stop reading and cancel the generation (idempotent, any thread)."""
        if self._closed:
            return
        self._closed = True
        if self.stats is None:
            self._finish("cancelled")
        cancel = getattr(self.request, "cancel", None)
        if callable(cancel):
            cancel()


class ChatEngine:
    """A loaded runtime plus what the app shows about it."""

    def __init__(self, runtime: Any, bundle: Path, name: str | None = None) -> None:
        self.runtime = runtime
        self.bundle = Path(bundle)
        self.name = name or self.bundle.name
        self.last_answer: Answer | None = None
        import psutil

        self._process = psutil.Process()

    @classmethod
    def load(cls, model: str | Path | None = None, *, progress: bool = True,
             **overrides: Any) -> ChatEngine:
        """Load `model`: a bundle, or a checkpoint (exported for the cpu target into the
        cache on first use); default: the embedded model. `overrides` go to
        `Step3Runtime.load`."""
        from step3_edge.cli import resolve_bundle
        from step3_edge.runtime import Step3Runtime

        bundle, name = resolve_bundle(model, progress=progress)
        return cls(Step3Runtime.load(bundle, **overrides), Path(bundle), name)

    @property
    def max_tokens_limit(self) -> int:
        """The most tokens one answer may ask for (the model's context length)."""
        return int(self.runtime.config.text_config.max_context)

    def answer(self, messages: Sequence[dict[str, Any]], *, max_tokens: int,
               temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] = (),
               seed: int | None = None) -> Answer:
        """Queue an answer to `messages` (step3-edge chat format) and return its stream.
        A malformed conversation or image raises its Step3EdgeError here."""
        from step3_edge.sampling import SamplingParams

        rt, t0, experts0 = self.runtime, time.perf_counter(), self._expert_counters()
        ids, views = rt.processor.apply_chat(list(messages))
        request = rt.submit(ids, views, max_new_tokens=max_tokens,
                            sampling=SamplingParams(temperature=temperature, top_p=top_p),
                            stop=tuple(stop), seed=seed)
        return Answer(self, request, t0, experts0)

    def _expert_counters(self) -> tuple[int, int]:
        experts = self.runtime.stats().get("experts", {})
        return int(experts.get("hits", 0)), int(experts.get("accesses", 0))

    def plan_table(self) -> str:
        """The device plan as `step3-edge plan` prints it."""
        return str(self.runtime.plan.format_table())

    def runtime_stats(self) -> dict[str, Any]:
        """The runtime's counters (expert cache, bytes moved, time per layer side, queue)."""
        return dict(self.runtime.stats())

    def memory(self) -> dict[str, int]:
        """Bytes: this process's RSS, and the system's total / used / available memory."""
        import psutil

        vm = psutil.virtual_memory()
        return {"rss": self._process.memory_info().rss, "total": vm.total,
                "used": vm.total - vm.available, "available": vm.available}

    def close(self) -> None:
        """Stop the runtime's scheduler thread."""
        self.runtime.close()


def add_server_arguments(p: Any, port: int) -> None:
    """The options `app` and `serve` share: --model, the runtime options, host and port."""
    from step3_edge.cli import add_model_argument, add_runtime_arguments, port_number

    add_model_argument(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; 127.0.0.1 serves this machine only, 0.0.0.0 every "
                   "network interface")
    p.add_argument("--port", type=port_number, default=port, help="TCP port to listen on")
    add_runtime_arguments(p)
