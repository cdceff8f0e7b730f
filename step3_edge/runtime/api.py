"""`Step3Runtime`: load a bundle, then `generate` / `chat` (batched, streaming, thread-safe)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from step3_edge.config import Step3Config
from step3_edge.errors import ConfigError, PromptError
from step3_edge.processor import ImageViews, Step3Processor
from step3_edge.runtime.backends import make_backend
from step3_edge.runtime.engine import Engine
from step3_edge.runtime.loading import (GRAPH_BACKENDS, bandwidths_option, build_attention,
                                        build_ffn, check_kv_memory, choose_backend,
                                        kv_settings, open_bundle)
from step3_edge.runtime.openmp import release_openmp_team
from step3_edge.runtime.planner import Plan
from step3_edge.runtime.scheduler import Generation, Request, Scheduler, stats
from step3_edge.sampling import SamplingParams

OVERRIDES: dict[str, str] = {
    "device": "torch device: 'cpu', 'cuda', 'cuda:1' (default: CUDA when present)",
    "dtype": "compute dtype: 'auto' (default: bfloat16 on a GPU and on a CPU where bf16 decode is "
             "fast (the native kernels, or oneDNN's bf16 math), else float32; stats say which "
             "and why), 'bfloat16', 'float32' (the reference's numerics) or 'float16'",
    "backend": "'torch', 'onnxruntime' (the bundle's ONNX subgraphs; CPU provider, or CUDA "
               "with onnxruntime-gpu), 'tensorrt' (the bundle's TensorRT engines on a CUDA "
               "GPU) or 'auto' (default: onnxruntime for float32 compute on "
               "a CPU when the bundle has ONNX subgraphs, else torch; docs/runtime.md, Backends)",
    "resident": "routed experts on the device: a fraction in [0, 1] or a count "
                "(default: the plan's hot set)",
    "cache": "device expert cache policy: 'static', 'lru' or 'lfu' (default)",
    "miss": "on a miss: 'cpu' (compute there), 'copy' (into the cache) or 'auto' (cost model)",
    "prefetch": "copy the next layer's predicted experts ahead (default: on CUDA with a "
                "dynamic cache)",
    "expert_counts": "profile JSON path or {layer: [count per expert]} to pick the resident set",
    "kv_tokens": "KV pool size in tokens, per attention rank under AFD (default: the plan's "
                 "KV bytes at kv_dtype, split evenly over the attention ranks)",
    "kv_dtype": "KV element type (default: float32 under float32 compute, else the plan's: "
                "fp8 -> float8_e4m3fn, 2 bytes -> bfloat16)",
    "threads": "intra-op threads of the engine thread, which runs every step (with afd: "
               "the attention side here; default: torch.get_num_threads() at load, or "
               "afd_threads with afd=True on a CPU); like torch.set_num_threads, it also "
               "becomes the count of threads that first use torch later",
    "max_batch": "sequences decoded together (default 32)",
    "max_prefill_tokens": "prompt tokens per step (default 2048 with torch, 512 with the graph "
                          "backends; longer prompts are chunked)",
    "stacked_experts": "on a CPU with every routed expert resident and bf16 weights, also "
                       "keep each layer's experts stacked (a second copy) and run decode-sized "
                       "batches through two GEMMs instead of two per expert: None (default: "
                       "unless the native GEMV runs the experts, which is faster per expert), "
                       "True, False",
    "native_kernels": "on an x86-64 CPU (AVX512-BF16, or AVX2 + FMA) under bf16 compute, run "
                      "bf16 linears of "
                      "decode-sized calls (<= 2 rows), the RMSNorms, SwiGLU MLPs and a decode "
                      "step's experts, its attention (a batch-1-2 step's whole attention side) "
                      "and fp8 KV reads through the native kernels built on first use with "
                      "the C compiler (runtime/native.py): "
                      "None (default: where they build), False (torch / oneDNN only: the "
                      "reference's exact bits), True (required)",
    "prefix_cache": "reuse the KV blocks of finished sequences for prompts that start with "
                    "the same tokens and images (default True)",
    "bandwidths": "Bandwidths or dict to skip the start-up measurement",
    "verify": "check every artifact's sha256 before loading (default False)",
    "vision": "load the vision tower (default True)",
    "sync_timing": "synchronize CUDA around each layer side for exact timings (default False)",
    "afd": "attention / FFN disaggregation across processes: False (default, one process), "
           "True (spawn the FFN worker processes here) or 'env' (this process is rank 0 of a "
           "torchrun / env:// group whose other ranks run `python -m step3_edge.runtime.afd`)",
    "ffn_ranks": "FFN worker processes to spawn with afd=True (default: the plan's FFN "
                 "devices, at least 1); experts are split across them",
    "attention_ranks": "AFD attention ranks, data-parallel: each holds the attention weights "
                       "and the KV cache of its own sequences; this process is the first, "
                       "afd=True spawns the others (default: the plan's attention devices, "
                       "at least 1); requests go to the least-loaded one",
    "attention_devices": "devices of the spawned attention ranks after this one, e.g. "
                         "['cuda:1'] (default: like ffn_devices)",
    "micro_batches": "AFD micro-batches per step and attention rank (default 3, as the "
                     "Step3 paper)",
    "afd_threads": "intra-op threads of each spawned worker, and of this process's engine "
                   "thread on a CPU unless `threads` is given (default: cores / processes)",
    "afd_timeout": "seconds to wait for an AFD worker before failing (default 300)",
    "afd_backend": "torch.distributed backend: 'gloo' or 'nccl' (default: nccl when every rank "
                   "has its own GPU, else gloo)",
    "ffn_devices": "devices of the spawned FFN workers, e.g. ['cuda:1'] (default: one GPU "
                   "each after the attention's when there are enough, else the CPU)",
    "ort_threads": "ONNX Runtime intra-op threads (default: ORT's, one per core)",
}


# Default prompt tokens per step for the ONNX Runtime / TensorRT graphs: their attention
# materializes [chunk, context] scores, so long prompts in 2048-token chunks took far more time
# and memory (`mini`, float32, ORT, 4,000 tokens: 29.3 s and 8.6 GB over the loaded weights
# in 2048-token chunks, 4.9 s and 2.3 GB in 512-token ones; 1,000 tokens 3.2 -> 2.3 s).
GRAPH_PREFILL_TOKENS = 512
COUNTS = ("threads", "max_batch", "max_prefill_tokens", "ffn_ranks", "afd_threads",
          "ort_threads", "micro_batches")
FLAGS = ("prefetch", "verify", "vision", "sync_timing", "prefix_cache")
TRISTATE = ("stacked_experts", "native_kernels")    # None (decided at load), True or False


def _check_options(o: dict[str, Any]) -> None:
    """Counts are whole numbers >= 1, flags are booleans, afd_backend is gloo or nccl,
    resident is a number, afd_timeout is positive: checked before any weight is read (the
    options with their own parsers check themselves)."""
    for k in COUNTS:
        v = o.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"{k}={v!r}", f"give {k} as a whole number >= 1")
    for k in FLAGS:
        if k in o and not isinstance(o[k], bool):
            raise ConfigError(f"{k}={o[k]!r}", f"give {k} as True or False")
    for k in TRISTATE:
        if o.get(k) not in (None, True, False):
            raise ConfigError(f"{k}={o[k]!r}", f"give {k} as None, True or False")
    if o.get("afd_backend") not in (None, "gloo", "nccl"):
        raise ConfigError(f"afd_backend={o['afd_backend']!r}", "use 'gloo' or 'nccl'")
    r = o.get("resident")
    if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float))):
        raise ConfigError(f"resident={r!r}", "give a fraction in [0, 1] (a float) or a count "
                          "of experts (a whole number)")
    t = o.get("afd_timeout")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0):
        raise ConfigError(f"afd_timeout={t!r}", "give the seconds to wait as a number > 0")


def _check_seed(seed: Any) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise PromptError(f"seed={seed!r}", "give a whole number, or None")


class Step3Runtime:
    """A loaded bundle: engine, expert store, KV pool, processor and the scheduler thread."""

    def __init__(self, bundle: Path, cfg: Step3Config, plan: Plan, processor: Step3Processor,
                 engine: Engine, scheduler: Scheduler, options: dict[str, Any],
                 max_context: int | None = None) -> None:
        self.bundle, self.config, self.plan = bundle, cfg, plan
        self.processor, self.engine, self.scheduler = processor, engine, scheduler
        self.options = options
        # tokens a sequence may reach (a TensorRT backend's engines may allow fewer)
        full = cfg.text_config.max_context
        self.max_context = min(full, max_context) if max_context else full

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, bundle: str | Path, **overrides: Any) -> Step3Runtime:
        """Load `bundle` (an export folder with manifest.json). Devices, resident experts and
        KV size come from its plan; `OVERRIDES` lists the keywords that change them."""
        unknown = sorted(set(overrides) - set(OVERRIDES))
        if unknown:
            raise ConfigError(f"unknown runtime option(s) {unknown}",
                              "known options: " + ", ".join(OVERRIDES))
        o = dict(overrides)
        _check_options(o)
        threads = o.get("threads")
        o["bandwidths"] = bandwidths_option(o.get("bandwidths"))   # checked before any weight
        manifest, plan, cfg, reader = open_bundle(bundle, bool(o.get("verify", False)))
        o["backend"] = choose_backend(o, manifest)
        backend = make_backend(o["backend"], o.get("device"), o.get("dtype"),
                               manifest=manifest, threads=o.get("ort_threads"),
                               native_kernels=o.get("native_kernels"))
        kv_dtype, kv_tokens = kv_settings(o, backend.dtype, plan, cfg)
        afd = o.get("afd", False)
        if afd:
            from step3_edge.runtime.afd import attention_rank_count

            ranks = attention_rank_count(plan, o)
            if o.get("kv_tokens") is None:                # the plan's KV, split over ranks
                kv_tokens = max(16, kv_tokens // ranks)
        elif o.get("attention_ranks") not in (None, 1):
            raise ConfigError(f"attention_ranks={o['attention_ranks']!r} without afd",
                              "load with afd=True (or 'env') for several attention ranks")
        check_kv_memory(kv_tokens, kv_dtype, cfg, backend, manifest)
        attn = build_attention(cfg, reader, backend, kv_tokens, kv_dtype,
                               bool(o.get("vision", True)))
        if afd:
            from step3_edge.runtime.afd import start_afd

            engine: Any = start_afd(Path(bundle), plan, attn, o)
            if threads is None and afd is True and backend.device.type == "cpu":
                threads = o["afd_threads"]      # share the cores with the spawned workers
        else:
            ffn = build_ffn(cfg, reader, plan, backend, o, routers=attn.routers())
            engine = Engine(attn, ffn, bool(o.get("sync_timing", False)))
        lim = getattr(backend, "limits", {})          # TensorRT: its engines' profile bounds
        max_batch = int(o.get("max_batch", 32))
        max_prefill = int(o.get("max_prefill_tokens", GRAPH_PREFILL_TOKENS
                                if o["backend"] in GRAPH_BACKENDS else 2048))
        try:
            processor = Step3Processor.from_pretrained(bundle, cfg)
            sched = Scheduler(engine, processor.decode,
                              min(max_batch, lim.get("max_batch", max_batch)),
                              min(max_prefill, lim.get("max_prefill", max_prefill)), threads,
                              bool(o.get("prefix_cache", True)))
        except BaseException:
            engine.close()
            raise
        release_openmp_team()       # loading made this thread a team; steps run on the scheduler's
        return cls(Path(bundle), cfg, plan, processor, engine, sched, o,
                   lim.get("max_context"))

    # ------------------------------------------------------------------ requests
    def submit(self, prompt: str | Sequence[int], images: Sequence[Any] | None = None, *,
               max_new_tokens: int = 64, sampling: SamplingParams | None = None,
               stop: str | Sequence[str] | None = None, seed: int | None = None) -> Request:
        """Queue one prompt (text, or token ids with images already expanded) and return its
        handle at once (`result()`, `stream()`). Prompt errors raise here."""
        return self.scheduler.submit(self._request(prompt, images, max_new_tokens, sampling,
                                                   stop, seed))

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
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise PromptError(f"max_new_tokens={max_new_tokens!r}", "ask for at least 1 token")
        if len(ids) + max_new_tokens > self.max_context:
            raise PromptError(f"{len(ids):,} prompt tokens + {max_new_tokens:,} new tokens "
                              f"exceed the context of {self.max_context:,}",
                              "shorten the prompt or lower max_new_tokens")
        _check_seed(seed)
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
        _check_seed(seed)
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


__all__ = ["Step3Runtime", "Generation", "Request", "OVERRIDES"]
