"""Continuous batching: a scheduler thread that admits new sequences between forward steps.

Callers (any thread) `submit` a `Request` and wait on it or stream from it. The scheduler
thread owns the engine: each step it admits waiting requests whose whole KV need (prompt +
max_new_tokens) fits the free pool, runs one forward over the decode tokens of every running
sequence plus prefill chunks of the new ones, samples, and hands out text. A request that fails
(a bad image, say) fails alone; the others go on.

With the prefix cache on (the default), a prompt whose leading blocks some finished sequence
wrote (a chat's earlier turns, a shared system prompt; images included) starts its prefill
after them, and skips the vision tower when no image token is left to embed (runtime/kv.py).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from step3_edge.chat import split_reasoning
from step3_edge.errors import RuntimeClosedError
from step3_edge.runtime import native
from step3_edge.runtime.engine import Engine
from step3_edge.runtime.kv import SeqKV, block_keys, images_digest
from step3_edge.runtime.openmp import release_openmp_team
from step3_edge.sampling import SamplingParams, greedy, sample_next

_DONE = object()


@dataclass
class Generation:
    """One finished request: text (stop strings cut off), generated ids (stop token excluded)
    and why it ended: "stop" (stop token or string), "length" (max_new_tokens) or
    "cancelled" (`Request.cancel`). `time_to_first_token_s` runs from `submit` to the first
    sampled token (queueing and prefill); `decode_tokens_per_s` is this request's rate after
    it (0.0 when it sampled fewer than two tokens)."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    time_to_first_token_s: float = 0.0
    decode_tokens_per_s: float = 0.0

    @property
    def reasoning(self) -> str:
        """What the model wrote before `</think>` (`step3_edge.chat.split_reasoning`)."""
        return split_reasoning(self.text)[0]

    @property
    def answer(self) -> str:
        """The text after `</think>` (all of it when the model wrote none)."""
        return split_reasoning(self.text)[1]


@dataclass
class Request:
    """A submitted prompt; `result()` waits for it, `stream()` yields its text pieces."""

    prompt_ids: list[int]
    images: list | None
    max_new_tokens: int
    sampling: SamplingParams
    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    generator: torch.Generator | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: BaseException | None = None
    _events: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    # scheduler state
    kv: SeqKV | None = field(default=None, repr=False)
    embeds: torch.Tensor | None = field(default=None, repr=False)   # prompt from embed_start
    embed_start: int = 0
    prefilled: int = 0
    key_root: bytes = b""                  # prefix-cache keys: images_digest, then block_keys
    prefix_keys: list[bytes] = field(default_factory=list, repr=False)
    emitted: int = 0
    cancelled: bool = False
    detok: IncrementalText | None = field(default=None, repr=False)   # set by submit
    sampled: int = 0                      # tokens sampled, a stop token included
    submitted_at: float = 0.0             # time.perf_counter() at submit, first token, end
    first_token_at: float | None = None
    finished_at: float | None = None

    def result(self, timeout: float | None = None) -> Generation:
        """Block until finished; re-raises the error that failed this request."""
        if not self._done.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        if self.error is not None:
            raise self.error
        first, end = self.first_token_at, self.finished_at
        ttft = 0.0 if first is None else first - self.submitted_at
        rate = (self.sampled - 1) / (end - first) \
            if first is not None and end is not None and self.sampled > 1 else 0.0
        return Generation(self.text, list(self.token_ids), list(self.prompt_ids),
                          self.finish_reason or "length", ttft, rate)

    def stream(self) -> Iterator[str]:
        """Text pieces as they are generated; they concatenate to `result().text`."""
        while True:
            item = self._events.get()
            if item is _DONE:
                break
            yield item
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        """Stop generating (any thread); the request ends with finish_reason "cancelled" and
        the text so far, at the scheduler's next step."""
        self.cancelled = True

    def _finish(self, error: BaseException | None = None) -> None:
        self.finished_at = time.perf_counter()
        self.error = error
        self._events.put(_DONE)
        self._done.set()


class IncrementalText:
    """The text of a growing list of token ids, decoding only the last few ids per step (as
    vLLM does): the ids from `prefix` on, less the text of those before `read`, is what the
    new ids add. Decoding the whole list every step costs O(length) per token (0.7 ms at
    4,000 tokens, per sequence). Both decodes start at the ids of the previous update, so a
    tokenizer that treats a decode's first token specially (a stripped leading space) treats
    them alike; new text that ends in an incomplete UTF-8 character (U+FFFD) waits for the
    next id."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode, self.text, self.prefix, self.read = decode, "", 0, 0

    def update(self, ids: list[int], final: bool = False) -> str:
        """The text of `ids` (the list this object has seen grow); `final` takes an
        incomplete character at the end too."""
        before = self.decode(ids[self.prefix:self.read])
        now = self.decode(ids[self.prefix:])
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(ids)
        return self.text


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` not safe to emit yet: the longest suffix that could start
    a stop string (an incomplete UTF-8 character never reaches `text`: `IncrementalText`)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


class Scheduler:
    """Owns the engine; one daemon thread runs forward steps while there is work."""

    def __init__(self, engine: Engine, decode: Callable[[list[int]], str], max_batch: int = 32,
                 max_prefill_tokens: int = 2048, threads: int | None = None,
                 prefix_cache: bool = True) -> None:
        """`threads`: the engine thread's intra-op threads (default: the creating thread's;
        torch fixes a thread's count at its first parallel op, so it is set there)."""
        self.engine, self.decode, self.prefix_cache = engine, decode, prefix_cache
        self.image_token = engine.attn.cfg.image_token_id
        # greedy picks of CPU logits through the native kernel where the backend runs them
        self.greedy = native.argmax if engine.attn.backend.caps.native else greedy
        self.threads = threads or torch.get_num_threads()
        self.max_batch, self.max_prefill = max_batch, max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.cond = threading.Condition()
        self.engine_lock = threading.Lock()      # held while a step (or a stats call) runs
        self.stopped = False
        self.tokens_generated = 0
        self.prompt_tokens = self.hit_tokens = 0        # admitted, and found in the prefix cache
        self.thread = threading.Thread(target=self._loop, name="step3-edge-scheduler",
                                       daemon=True)
        self.thread.start()

    def submit(self, req: Request) -> Request:
        self.engine.attn.kv.check(len(req.prompt_ids) + req.max_new_tokens)
        release_openmp_team()       # the caller's (image preprocessing made one): runtime/openmp.py
        req.detok = IncrementalText(self.decode)
        req.submitted_at = time.perf_counter()
        if self.prefix_cache:                   # here, off the engine thread
            req.key_root = images_digest(req.images)
            req.prefix_keys = block_keys(req.prompt_ids, req.key_root)
        with self.cond:
            if self.stopped:
                raise RuntimeClosedError()
            self.waiting.append(req)
            self.cond.notify()
        return req

    def reset_stats(self) -> None:
        """Zero the prefix-cache counters (the caller holds `engine_lock`)."""
        self.prompt_tokens = self.hit_tokens = 0

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()
        self.thread.join(timeout=30)

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        torch.get_num_threads()     # torch's once-per-thread init (takes the process-wide count)
        torch.set_num_threads(self.threads)                  # then this thread's own count
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not self.stopped and not self.waiting and not self.running:
                        release_openmp_team()       # idle: leave the cores to whoever works
                        self.cond.wait()
                    if self.stopped:
                        for r in [*self.waiting, *self.running]:
                            r._finish(RuntimeClosedError("the runtime was closed before "
                                                         "this request finished"))
                        return
                    self._admit()
                try:
                    with self.engine_lock:
                        self._step()
                except Exception as e:  # noqa: BLE001 - fail the step's requests, keep serving
                    for r in list(self.running):
                        self._retire(r, e)

    def _admit(self) -> None:
        pool = self.engine.attn.kv
        for r in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(r)
            r.finish_reason = "cancelled"
            r._finish()
        while self.waiting and len(self.running) < self.max_batch:
            r = self.waiting[0]
            kv = pool.allocate(len(r.prompt_ids) + r.max_new_tokens, r.prefix_keys,
                               len(r.prompt_ids))
            if kv is None:
                break                                   # wait for running sequences to end
            self.waiting.popleft()
            r.kv, r.prefilled = kv, kv.length           # a cached prefix is already written
            self.prompt_tokens += len(r.prompt_ids)
            self.hit_tokens += kv.length
            self.running.append(r)

    def _retire(self, r: Request, error: BaseException | None = None) -> None:
        if r.kv is not None:
            keys = block_keys(r.prompt_ids + r.token_ids, r.key_root, r.prefix_keys) \
                if self.prefix_cache else ()
            self.engine.attn.kv.release(r.kv, keys)     # its full blocks stay cached
            r.kv = None
        r.embeds = None
        if r in self.running:
            self.running.remove(r)
        r._finish(error)

    def _step(self) -> None:
        attn = self.engine.attn
        for r in [r for r in self.running if r.cancelled]:
            if len(r.text) > r.emitted:           # what was held back, so pieces add up
                r._events.put(r.text[r.emitted:])
            r.finish_reason = "cancelled"
            self._retire(r)
        decode = [r for r in self.running if r.prefilled == len(r.prompt_ids)]
        prefill: list[tuple[Request, int]] = []
        budget = self.max_prefill
        for r in self.running:
            if r.prefilled == len(r.prompt_ids) or (budget <= 0 and prefill):
                continue
            if r.embeds is None:
                # after a cached prefix only the rest is embedded, and without the vision
                # tower unless an image token is left
                rest = r.prompt_ids[r.prefilled:]
                start = 0 if r.images and self.image_token in rest else r.prefilled
                try:
                    r.embeds = attn.embed(r.prompt_ids[start:], r.images if start == 0
                                          else None)                    # [T - start, h]
                except Exception as e:  # noqa: BLE001 - a bad prompt fails its request only
                    self._retire(r, e)
                    continue
                r.embed_start = start
            n = min(len(r.prompt_ids) - r.prefilled, max(budget, 1))
            prefill.append((r, n))
            budget -= n
        if not decode and not prefill:
            return
        parts = []
        if decode:
            parts.append(attn.embed_tokens([r.token_ids[-1] for r in decode]))
        parts += [r.embeds[r.prefilled - r.embed_start:r.prefilled - r.embed_start + n]
                  for r, n in prefill]
        segs = [(r.kv, 1) for r in decode] + [(r.kv, n) for r, n in prefill]
        logits = self.engine.run(segs, torch.cat(parts) if len(parts) > 1 else parts[0])
        for r, n in prefill:
            r.prefilled += n
        live = [(i, r) for i, r in enumerate(decode + [r for r, _ in prefill])
                if r.prefilled == len(r.prompt_ids)]   # not mid-prompt: a token is due
        rows = [i for i, r in live if r.sampling.temperature == 0]
        picked = logits if len(rows) == len(logits) else logits[rows]
        best = dict(zip(rows, self.greedy(picked).tolist())) if rows else {}  # one call for all
        for i, r in live:
            r.embeds = None
            if i in best:
                tok = best[i]
            else:
                row = logits[i:i + 1]
                if r.generator is not None and row.device != r.generator.device:
                    row = row.cpu()             # a seeded request samples with its CPU
                tok = int(sample_next(row, r.sampling, r.generator)[0])  # generator anywhere
            self.tokens_generated += 1
            self._advance(r, tok)

    def _advance(self, r: Request, tok: int) -> None:
        r.sampled += 1
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
        done = tok in r.stop_ids
        if not done:
            r.token_ids.append(tok)
        reason = "stop" if done else None
        if not done and len(r.token_ids) >= r.max_new_tokens:
            done, reason = True, "length"
        assert r.detok is not None                                      # set by submit
        text = r.detok.update(r.token_ids, final=done)
        cut = min((i for i in (text.find(s) for s in r.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            text, done, reason = text[:cut], True, "stop"
        safe = len(text) if done else len(text) - _held_back(text, r.stop_strings)
        if safe > r.emitted:
            r._events.put(text[r.emitted:safe])
            r.emitted = safe
        r.text = text
        if done:
            r.finish_reason = reason
            self._retire(r)


def stats(s: Scheduler) -> dict[str, Any]:
    """Queue and KV use of a scheduler, and its engine thread's intra-op threads."""
    pool = s.engine.attn.kv
    return {"running": len(s.running), "waiting": len(s.waiting), "threads": s.threads,
            "tokens_generated": s.tokens_generated,
            "kv_capacity_tokens": pool.capacity_tokens,
            "kv_used_tokens": pool.capacity_tokens - pool.free_tokens,
            "kv_cached_tokens": pool.cached_tokens,
            "prefix_cache": {"enabled": s.prefix_cache, "prompt_tokens": s.prompt_tokens,
                             "hit_tokens": s.hit_tokens,
                             "hit_rate": s.hit_tokens / max(s.prompt_tokens, 1)}}
