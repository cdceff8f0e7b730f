"""`Step3Runtime`: load a bundle, then `generate` / `chat` (batched, streaming, thread-safe)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from step3_edge.config import Step3Config
from step3_edge.errors import PromptError
from step3_edge.plan import Plan
from step3_edge.processor import ImageViews, Step3Processor
from step3_edge.runtime.builders import make_builder
from step3_edge.runtime.decisions import GRAPH_PREFILL_TOKENS, Host, LoadDecisions, decide
from step3_edge.runtime.engine import Engine
from step3_edge.runtime.loading import open_bundle
from step3_edge.runtime.openmp import release_openmp_team
from step3_edge.runtime.options import LOAD_KEYWORDS, RuntimeOptions
from step3_edge.runtime.scheduler import Generation, Request, Scheduler, stats
from step3_edge.sampling import SamplingParams, check_max_new_tokens, check_seed

# every `Step3Runtime.load` keyword -> its help, generated from `RuntimeOptions`' fields
OVERRIDES: Mapping[str, str] = MappingProxyType(LOAD_KEYWORDS)


class Step3Runtime:
    """A loaded bundle: engine, expert store, KV pool, processor and the scheduler thread."""

    def __init__(self, bundle: Path, cfg: Step3Config, plan: Plan, processor: Step3Processor,
                 engine: Engine, scheduler: Scheduler, decisions: LoadDecisions) -> None:
        self.bundle, self.config, self.plan = bundle, cfg, plan
        self.processor, self.engine, self.scheduler = processor, engine, scheduler
        self.decisions = decisions
        self.options = decisions.options
        # tokens a sequence may reach (a TensorRT backend's engines may allow fewer)
        full = cfg.text_config.max_context
        lim = decisions.max_context
        self.max_context = min(full, lim) if lim else full

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, bundle: str | Path, **options: Any) -> Step3Runtime:
        """Load `bundle` (an export folder with manifest.json). Devices, resident experts and
        KV size come from its plan; the keywords (`RuntimeOptions`' fields, listed with their
        help in `OVERRIDES`) change them. Every option is checked before any file is opened,
        and every decision (`LoadDecisions`) is taken before any weight is read."""
        o = RuntimeOptions.from_kwargs(**options)
        manifest, plan, cfg, reader = open_bundle(bundle, o.verify)
        d = decide(o, manifest, plan, cfg, Host.probe())
        builder = make_builder(d, manifest)
        d = d.within(builder.limits)                    # TensorRT: its engines' bounds
        builder.check_kv_memory(d.kv_tokens, d.torch_kv_dtype, cfg, manifest)
        attn = builder.build_attention(cfg, reader, d.kv_tokens, d.torch_kv_dtype, o.vision)
        if d.afd is not None:
            from step3_edge.runtime.afd import start_afd

            engine: Any = start_afd(Path(bundle), plan, attn, d)
        else:
            ffn = builder.build_ffn(cfg, reader, plan, o.experts, o.bandwidths, o.threads,
                                    routers=attn.routers())
            engine = Engine(attn, ffn, o.sync_timing)
        try:
            processor = Step3Processor.from_pretrained(bundle, cfg)
            sched = Scheduler(engine, processor.decode, d.max_batch, d.max_prefill_tokens,
                              d.threads, o.kv.prefix_cache)
        except BaseException:
            engine.close()
            raise
        release_openmp_team()       # loading made this thread a team; steps run on the scheduler's
        return cls(Path(bundle), cfg, plan, processor, engine, sched, d)

    # ------------------------------------------------------------------ requests
    def submit(self, prompt: str | Sequence[int], images: Sequence[Any] | None = None, *,
               max_new_tokens: int = 64, sampling: SamplingParams | None = None,
               stop: str | Sequence[str] | None = None, seed: int | None = None) -> Request:
        """Queue one prompt (text, or token ids with images already expanded) and return its
        handle at once (`result()`, `stream()`). Prompt errors raise here."""
        self._check_args(max_new_tokens, sampling, seed)
        return self.scheduler.submit(self._request(prompt, images, max_new_tokens, sampling,
                                                   stop, seed))

    def _check_args(self, max_new_tokens: Any, sampling: Any, seed: Any) -> None:
        """The generation arguments, checked before any prompt is rendered or image decoded
        (`SamplingParams` checks its own values: NaN and out-of-range ones are refused)."""
        check_max_new_tokens(max_new_tokens, 0, self.max_context)
        check_seed(seed)
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise PromptError(f"sampling={sampling!r}", "give a SamplingParams(temperature=, "
                              "top_k=, top_p=), or None for greedy")

    def _request(self, prompt: str | Sequence[int], images: Sequence[Any] | None,
                 max_new_tokens: int, sampling: SamplingParams | None,
                 stop: str | Sequence[str] | None, seed: int | None) -> Request:
        if isinstance(prompt, str):
            ids, views = self.processor(prompt, list(images or []))
        elif not isinstance(prompt, Sequence) or not all(isinstance(i, int) for i in prompt):
            raise PromptError(f"a prompt that is neither a str nor a list of token ids: "
                              f"{str(prompt)[:60]}", "give a str or a list of token ids")
        else:
            ids = [int(i) for i in prompt]
            views = [im if isinstance(im, ImageViews) else self.processor.preprocess(im)
                     for im in (images or [])]
        t = self.config.text_config
        if not ids:
            raise PromptError("the prompt is empty", "give at least one token")
        if min(ids) < 0 or max(ids) >= t.vocab_size:
            raise PromptError(f"token ids must lie in 0..{t.vocab_size - 1}",
                              "tokenize with this bundle's processor")
        check_max_new_tokens(max_new_tokens, len(ids), self.max_context)
        check_seed(seed)
        if stop is not None and not isinstance(stop, (str, list, tuple)):
            raise PromptError(f"stop={stop!r}", "give a string or a list of strings")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if any(not isinstance(s, str) or not s for s in stops):
            raise PromptError(f"stop strings {stops!r}", "give non-empty strings")
        self.engine.attn.kv.check(len(ids) + max_new_tokens)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        return Request(ids, views or None, max_new_tokens, sampling or SamplingParams(),
                       frozenset(self.processor.stop_token_ids), stops, gen)

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 images: Sequence[Any] | None = None, *, max_new_tokens: int = 64,
                 sampling: SamplingParams | None = None, stop: str | Sequence[str] | None = None,
                 seed: int | None = None) -> Generation | list[Generation]:
        """Generate for one prompt (a str or a list of token ids; `images` its images) or a
        batch (a list of those; `images` one list per prompt). All prompts are checked before
        any is queued; they run together with whatever else is in flight."""
        self._check_args(max_new_tokens, sampling, seed)
        if not isinstance(prompts, Sequence):
            raise PromptError(f"prompts of type {type(prompts).__name__}",
                              "give a str, a list of token ids, or a list of those")
        single = isinstance(prompts, str) or (bool(prompts) and
                                              all(isinstance(i, int) for i in prompts))
        batch = [prompts] if single else list(prompts)
        imgs = [images] if single else list(images or [None] * len(batch))
        if not batch or len(imgs) != len(batch):
            raise PromptError(f"{len(batch)} prompts and {len(imgs)} image lists",
                              "give one image list (or None) per prompt")
        reqs = [self._request(p, im, max_new_tokens, sampling, stop,
                              None if seed is None else seed + i)
                for i, (p, im) in enumerate(zip(batch, imgs))]
        for r in reqs:
            self.scheduler.submit(r)
        out = [r.result() for r in reqs]
        return out[0] if single else out

    def chat(self, messages: list[dict[str, Any]], stream: bool = False, *,
             max_new_tokens: int = 256, sampling: SamplingParams | None = None,
             stop: str | Sequence[str] | None = None, seed: int | None = None
             ) -> str | Iterator[str]:
        """Answer a conversation (chat template, images in the messages). With stream=True,
        an iterator of text pieces that concatenate to the non-streamed answer."""
        self._check_args(max_new_tokens, sampling, seed)
        ids, views = self.processor.apply_chat(messages)
        req = self.submit(ids, views, max_new_tokens=max_new_tokens, sampling=sampling,
                          stop=stop, seed=seed)
        return req.stream() if stream else req.result().text

    # ------------------------------------------------------------------ statistics
    def stats(self) -> dict[str, Any]:
        """Expert store (hit rate, bytes moved, CPU-computed experts), time per layer side,
        kernels in use, KV and queue state."""
        with self.scheduler.engine_lock:
            return {**self.engine.snapshot(), "scheduler": stats(self.scheduler)}

    def reset_stats(self) -> None:
        """Zero the expert, timing and prefix-cache statistics."""
        with self.scheduler.engine_lock:
            self.engine.reset_stats()
            self.scheduler.reset_stats()

    def expert_counts(self) -> dict[int, list[int]]:
        """Tokens routed to each expert of each MoE layer since the last reset."""
        with self.scheduler.engine_lock:
            return self.engine.expert_counts()

    def record_trace(self, on: bool = True) -> list[list[dict[str, Any]]] | None:
        """Start recording the routing trace (on=True) or stop and return it."""
        with self.scheduler.engine_lock:
            return self.engine.record_trace(on)

    @property
    def kv_capacity(self) -> int:
        return self.engine.attn.kv.capacity_tokens

    def close(self) -> None:
        """Stop the scheduler thread (queued requests fail) and the AFD workers, if any."""
        self.scheduler.close()
        with self.scheduler.engine_lock:
            self.engine.close()

    def __enter__(self) -> Step3Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["GRAPH_PREFILL_TOKENS", "OVERRIDES", "Generation", "Request", "Step3Runtime"]
