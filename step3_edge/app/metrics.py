"""`GET /metrics` of `step3-edge serve`: the server's counters and the runtime's statistics in
the Prometheus text exposition format (version 0.0.4), with no client library.

The server counts HTTP requests, tokens and per-answer latencies here (`ServerMetrics`); the
expert cache, bytes moved, CPU-computed experts, KV and queue state are read from
`Step3Runtime.stats()` at scrape time (`render`).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "step3_edge_"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# runtime stats -> metric: (section, key, name, type, help)
RUNTIME_METRICS: tuple[tuple[str, str, str, str, str], ...] = (
    ("experts", "accesses", "expert_accesses_total", "counter",
     "routed-expert uses (tokens x top-k) seen by the expert cache"),
    ("experts", "hits", "expert_hits_total", "counter",
     "routed-expert uses whose weights were on the device"),
    ("experts", "hit_rate", "expert_hit_rate", "gauge",
     "expert-cache hit rate since start (hits / accesses)"),
    ("experts", "cpu_computed", "experts_cpu_computed_total", "counter",
     "routed-expert uses computed on the CPU (cache misses left in CPU memory)"),
    ("experts", "copied", "experts_copied_total", "counter",
     "routed experts copied to the device on a miss"),
    ("experts", "evictions", "expert_evictions_total", "counter",
     "experts evicted from the device cache"),
    ("experts", "resident", "experts_resident", "gauge",
     "routed experts whose weights are on the device now"),
    ("scheduler", "running", "sequences_running", "gauge", "sequences being decoded"),
    ("scheduler", "waiting", "sequences_waiting", "gauge", "sequences waiting to start"),
    ("scheduler", "tokens_generated", "runtime_generated_tokens_total", "counter",
     "tokens the runtime generated (all requests)"),
    ("scheduler", "kv_capacity_tokens", "kv_capacity_tokens", "gauge",
     "tokens the KV cache holds"),
    ("scheduler", "kv_used_tokens", "kv_used_tokens", "gauge",
     "KV cache tokens in use by running sequences"),
)
BYTES_MOVED = (("bytes_copied", "expert_weights"), ("bytes_activations", "activations"))


def _label_value(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str] | None) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items()) + "}"


def _num(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float) and math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    return repr(v) if isinstance(v, float) else str(v)


class Histogram:
    """Cumulative buckets, sum and count (not thread-safe: `ServerMetrics` holds the lock)."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.bounds):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> Iterable[str]:
        for b, c in zip(self.bounds, self.counts, strict=True):
            yield f'{name}_bucket{{le="{_num(float(b))}"}} {c}'
        yield f'{name}_bucket{{le="+Inf"}} {self.count}'
        yield f"{name}_sum {_num(self.sum)}"
        yield f"{name}_count {self.count}"


class ServerMetrics:
    """What the HTTP server counts itself (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.in_progress = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finished: dict[str, int] = {}
        self.ttft = Histogram(TTFT_BUCKETS)
        self.per_token = Histogram(TOKEN_BUCKETS)
        self.duration = Histogram(DURATION_BUCKETS)

    def count_request(self, route: str, method: str, status: int) -> None:
        with self._lock:
            key = (route, method, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def in_flight(self, delta: int) -> None:
        """A chat-completion request started (+1) or its response ended (-1)."""
        with self._lock:
            self.in_progress += delta

    def finished_completion(self, stats: Any | None) -> None:
        """One chat completion's answer ended; `stats` is its `app.engine.AnswerStats`."""
        with self._lock:
            if stats is None:
                return
            self.prompt_tokens += stats.prompt_tokens
            self.completion_tokens += stats.completion_tokens
            reason = stats.finish_reason
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.duration.observe(stats.total_s)
            if stats.first_token_s is not None:
                self.ttft.observe(stats.first_token_s)
                if stats.completion_tokens > 1:
                    span = stats.total_s - stats.first_token_s
                    self.per_token.observe(max(span, 0.0) / (stats.completion_tokens - 1))

    def render(self, runtime_stats: dict[str, Any], info: dict[str, str]) -> str:
        """The whole exposition: server metrics, then the runtime's."""
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: Iterable[str]) -> None:
            out.append(f"# HELP {PREFIX}{name} {help_}")
            out.append(f"# TYPE {PREFIX}{name} {kind}")
            out.extend(samples)

        p = PREFIX
        with self._lock:
            metric("info", "gauge", "the model served and the runtime's backend",
                   [f"{p}info{_labels(info)} 1"])
            metric("uptime_seconds", "gauge", "seconds since the server started",
                   [f"{p}uptime_seconds {_num(round(time.monotonic() - self.started, 3))}"])
            metric("http_requests_total", "counter", "HTTP requests by route, method and status",
                   [f"{p}http_requests_total"
                    f"{_labels({'route': r, 'method': m, 'status': str(s)})} {n}"
                    for (r, m, s), n in sorted(self.requests.items())])
            metric("requests_in_progress", "gauge", "chat completions being answered",
                   [f"{p}requests_in_progress {self.in_progress}"])
            metric("completions_total", "counter", "chat completions answered, by finish reason",
                   [f"{p}completions_total{_labels({'finish_reason': r})} {n}"
                    for r, n in sorted(self.finished.items())])
            metric("prompt_tokens_total", "counter", "prompt tokens of answered completions",
                   [f"{p}prompt_tokens_total {self.prompt_tokens}"])
            metric("completion_tokens_total", "counter", "tokens generated for completions",
                   [f"{p}completion_tokens_total {self.completion_tokens}"])
            metric("time_to_first_token_seconds", "histogram",
                   "seconds from the request to its first piece of text",
                   self.ttft.lines(p + "time_to_first_token_seconds"))
            metric("time_per_output_token_seconds", "histogram",
                   "seconds per generated token after the first (decode latency)",
                   self.per_token.lines(p + "time_per_output_token_seconds"))
            metric("request_duration_seconds", "histogram",
                   "seconds from the request to its last token",
                   self.duration.lines(p + "request_duration_seconds"))
        for section, key, name, kind, help_ in RUNTIME_METRICS:
            value = (runtime_stats.get(section) or {}).get(key)
            if isinstance(value, (int, float)):
                metric(name, kind, help_, [f"{p}{name} {_num(value)}"])
        experts = runtime_stats.get("experts") or {}
        moved = [(label, experts[key]) for key, label in BYTES_MOVED
                 if isinstance(experts.get(key), (int, float))]
        if moved:
            metric("bytes_moved_total", "counter",
                   "bytes moved between CPU memory and the device for routed experts: "
                   "expert weights copied in, activations sent to CPU-computed experts and back",
                   [f"{p}bytes_moved_total{_labels({'kind': k})} {_num(v)}" for k, v in moved])
        return "\n".join(out) + "\n"
