"""`Step3Runtime`: load a bundle, then `generate` / `chat` (batched, streaming, thread-safe)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from step3_edge.checkpoint import INDEX_NAME, CheckpointReader
from step3_edge.config import Step3Config
from step3_edge.errors import BundleError, ConfigError, PromptError
from step3_edge.manifest import load_manifest
from step3_edge.processor import ImageViews, Step3Processor
from step3_edge.runtime.backends import make_backend
from step3_edge.runtime.engine import AttentionWorker, Engine, FFNWorker
from step3_edge.runtime.expert_store import Bandwidths, ExpertStore
from step3_edge.runtime.planner import Plan, expert_order
from step3_edge.runtime.scheduler import Generation, Request, Scheduler, stats
from step3_edge.sampling import SamplingParams

MAX_DEFAULT_KV_TOKENS = 1 << 18   # cap when the plan leaves a whole CPU's memory to KV
RESERVE_BYTES = 2 << 30           # CUDA: left free for activations when capping residents
OVERRIDES: dict[str, str] = {
    "device": "torch device: 'cpu', 'cuda', 'cuda:1' (default: CUDA when present)",
    "dtype": "compute dtype: 'bfloat16' (default) or 'float32' (the reference's numerics)",
    "backend": "'torch' (ONNX Runtime / TensorRT: not yet)",
    "resident": "routed experts on the device: a fraction in [0, 1] or a count "
                "(default: the plan's hot set)",
    "cache": "device expert cache policy: 'static', 'lru' (default) or 'lfu'",
    "miss": "on a miss: 'cpu' (compute there), 'copy' (into the cache) or 'auto' (cost model)",
    "prefetch": "copy the next layer's predicted experts ahead (default: on CUDA with a "
                "dynamic cache)",
    "expert_counts": "profile JSON path or {layer: [count per expert]} to pick the resident set",
    "kv_tokens": "KV pool size in tokens (default: the plan's KV bytes at kv_dtype)",
    "kv_dtype": "KV element type (default: float32 under float32 compute, else the plan's: "
                "fp8 -> float8_e4m3fn, 2 bytes -> bfloat16)",
    "max_batch": "sequences decoded together (default 32)",
    "max_prefill_tokens": "prompt tokens per step (default 2048; longer prompts are chunked)",
    "bandwidths": "Bandwidths or dict to skip the start-up measurement",
    "verify": "check every artifact's sha256 before loading (default False)",
    "vision": "load the vision tower (default True)",
    "sync_timing": "synchronize CUDA around each layer side for exact timings (default False)",
}


def _resident_set(cfg: Step3Config, plan: Plan, resident: float | int | None,
                  counts: dict[int, list[int]] | None) -> set[tuple[int, int]]:
    t = cfg.text_config
    keys = [(L, e) for L in t.moe_layers for e in range(t.moe_num_experts)]
    hot = {k for k in keys if plan.expert_location(*k) != "cpu"}
    if resident is None and counts is None:
        return hot
    n = len(hot) if resident is None else (
        round(resident * len(keys)) if isinstance(resident, float) else int(resident))
    if not 0 <= n <= len(keys):
        raise ConfigError(f"resident={resident!r}", f"give a fraction in [0, 1] or a count in "
                          f"0..{len(keys)}")
    order, _ = expert_order(cfg, counts)
    if counts is None:                    # the plan's hot experts first
        order = sorted(order, key=lambda k: k not in hot)
    return set(order[:n])


def _counts(value: Any) -> dict[int, list[int]] | None:
    if value is None or isinstance(value, dict):
        return value if value is None else {int(k): list(v) for k, v in
                                            value.get("expert_counts", value).items()}
    from step3_edge.runtime.plan_cli import read_counts

    return read_counts(str(value))


class Step3Runtime:
    """A loaded bundle: engine, expert store, KV pool, processor and the scheduler thread."""

    def __init__(self, bundle: Path, cfg: Step3Config, plan: Plan, processor: Step3Processor,
                 engine: Engine, scheduler: Scheduler, options: dict[str, Any]) -> None:
        self.bundle, self.config, self.plan = bundle, cfg, plan
        self.processor, self.engine, self.scheduler = processor, engine, scheduler
        self.options = options

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, bundle: str | Path, **overrides: Any) -> Step3Runtime:
        """Load `bundle` (an export folder with manifest.json). Devices, resident experts and
        KV size come from its plan; `OVERRIDES` lists the keywords that change them."""
        unknown = sorted(set(overrides) - set(OVERRIDES))
        if unknown:
            raise ConfigError(f"unknown runtime option(s) {unknown}",
                              "known options: " + ", ".join(OVERRIDES))
        o = overrides
        bundle = Path(bundle)
        manifest = load_manifest(bundle, verify=bool(o.get("verify", False)))
        plan = Plan.from_dict(manifest.plan)
        manifest.path("config.json")
        index = manifest.path(INDEX_NAME)
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            manifest.path(shard)                         # only files the manifest names
        cfg = Step3Config.from_pretrained(bundle)
        t = cfg.text_config
        if tuple(plan.moe_layers) != tuple(t.moe_layers) or plan.num_experts != \
                t.moe_num_experts:
            raise BundleError("the bundle's plan does not match its config.json (MoE layers "
                              "or experts differ)", "re-export the bundle")
        reader = CheckpointReader(bundle, cfg)
        reader.check()
        backend = make_backend(o.get("backend", "torch"), o.get("device"), o.get("dtype"))
        dev, dtype = backend.device, backend.dtype
        kv_dtype = o.get("kv_dtype") or (dtype if dtype == torch.float32 else
                                         torch.float8_e4m3fn if plan.kv_bytes_per_elem == 1
                                         else torch.bfloat16)
        if isinstance(kv_dtype, str):
            if kv_dtype not in ("float32", "bfloat16", "float16", "float8_e4m3fn"):
                raise ConfigError(f"kv_dtype={kv_dtype!r}", "use float32, bfloat16, float16 "
                                  "or float8_e4m3fn")
            kv_dtype = getattr(torch, kv_dtype)
        per_token = 2 * t.num_hidden_layers * t.head_dim * kv_dtype.itemsize
        planned = sum(d.kv_bytes for d in plan.device_plans)
        kv_tokens = int(o.get("kv_tokens") or min(planned // per_token, MAX_DEFAULT_KV_TOKENS))
        if kv_tokens < 16:
            raise ConfigError(f"kv_tokens={kv_tokens}", "give at least 16 KV tokens")
        attn = AttentionWorker(cfg, reader, backend, kv_tokens, kv_dtype,
                               bool(o.get("vision", True)))
        resident = _resident_set(cfg, plan, o.get("resident"), _counts(o.get("expert_counts")))
        if dev.type == "cuda" and o.get("resident") is None:   # one card holds what it can
            ffn_fixed = sum(d.weight_bytes.get("mlp", 0) + d.weight_bytes.get("shared_expert", 0)
                            for d in plan.device_plans)
            free = torch.cuda.mem_get_info(dev)[0] - RESERVE_BYTES - ffn_fixed
            cap = max(0, free // max(plan.expert_bytes, 1))
            if len(resident) > cap:
                order = [k for k in expert_order(cfg, _counts(o.get("expert_counts")))[0]
                         if k in resident]
                resident = set(order[:cap])
        policy = o.get("cache", "lru")
        bw = o.get("bandwidths")
        store = ExpertStore(t, reader, backend, resident, policy=policy,
                            miss=o.get("miss", "auto"),
                            prefetch=bool(o.get("prefetch", dev.type == "cuda" and
                                                policy != "static")),
                            bandwidths=Bandwidths(**bw) if isinstance(bw, dict) else bw,
                            routers=attn.routers())
        ffn = FFNWorker(cfg, reader, backend, store)
        engine = Engine(attn, ffn, bool(o.get("sync_timing", False)))
        processor = Step3Processor.from_pretrained(bundle, cfg)
        sched = Scheduler(engine, processor.decode, int(o.get("max_batch", 32)),
                          int(o.get("max_prefill_tokens", 2048)))
        return cls(bundle, cfg, plan, processor, engine, sched, dict(o))

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
        if len(ids) + max_new_tokens > t.max_context:
            raise PromptError(f"{len(ids):,} prompt tokens + {max_new_tokens:,} new tokens "
                              f"exceed the context of {t.max_context:,}",
                              "shorten the prompt or lower max_new_tokens")
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
        single = isinstance(prompts, str) or (isinstance(prompts, Sequence) and bool(prompts)
                                              and all(isinstance(i, int) for i in prompts))
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
        store, e = self.engine.ffn.store, self.engine
        exp = store.stats.to_dict()
        exp.update(resident=len(store.resident), policy=store.cache.policy, miss=store.miss,
                   prefetch=store.prefetch_on, expert_bytes=store.expert_bytes,
                   bandwidths=vars(store.bw))
        return {"backend": e.attn.backend.describe(), "experts": exp,
                "time": {"steps": e.steps, "attention_s": list(e.attn_seconds),
                         "ffn_s": list(e.ffn_seconds)},
                "scheduler": stats(self.scheduler)}

    def reset_stats(self) -> None:
        self.engine.ffn.store.reset_stats()
        self.engine.reset_stats()

    def expert_counts(self) -> dict[int, list[int]]:
        """Tokens routed to each expert of each MoE layer since the last reset."""
        return {L: c.tolist() for L, c in self.engine.ffn.store.counts.items()}

    def record_trace(self, on: bool = True) -> list[list[dict[str, Any]]] | None:
        """Start recording the routing trace (on=True) or stop and return it."""
        store = self.engine.ffn.store
        trace, store.trace = store.trace, ([] if on else None)
        return trace

    @property
    def kv_capacity(self) -> int:
        return self.engine.attn.kv.capacity_tokens

    def close(self) -> None:
        """Stop the scheduler thread; queued requests fail."""
        self.scheduler.close()

    def __enter__(self) -> Step3Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Step3Runtime", "Generation", "Request", "OVERRIDES"]
