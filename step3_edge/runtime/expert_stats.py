"""What the expert store counts: `StoreStats` (hits, misses and where they were computed,
bytes moved, prefetches, stacked calls) and `RoutingLog` (tokens routed to each expert, and
the routing trace while one is recorded). The store's parts add to one shared `StoreStats`;
`Step3Runtime.stats` shows both."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class StoreStats:
    accesses: int = 0          # (layer, expert) uses per forward step
    hits: int = 0              # ... found on the device
    cpu_computed: int = 0      # misses computed on the CPU
    copied: int = 0            # experts copied to the device (misses and prefetches)
    bytes_copied: int = 0      # weight bytes moved host -> device
    bytes_activations: int = 0  # activation bytes moved for CPU compute (both ways)
    prefetched: int = 0
    prefetch_used: int = 0
    evictions: int = 0
    stacked: int = 0           # layer calls served by the stacked experts (StackedExperts)
    miss_choices: dict[str, int] = field(default_factory=lambda: {"cpu": 0, "copy": 0})

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 1.0

    def reset(self) -> None:
        """Every counter back to zero, in place (the store's parts hold this object)."""
        zero = StoreStats()
        for f in fields(self):
            setattr(self, f.name, getattr(zero, f.name))

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "misses": self.accesses - self.hits, "hit_rate": self.hit_rate}


Trace = list[list[dict[str, object]]]   # per step, per MoE layer call: experts used, predicted


class RoutingLog:
    """Tokens routed to each expert of each MoE layer (a shard counts its own experts; the
    ranks sum up), and, while recording, the routing trace that `expert_cache.replay` reads."""

    def __init__(self, moe_layers: list[int], num_experts: int) -> None:
        self.counts = {L: [0] * num_experts for L in moe_layers}
        self.trace: Trace | None = None

    def reset(self) -> None:
        for c in self.counts.values():
            c[:] = [0] * len(c)

    def record_trace(self, on: bool) -> Trace | None:
        """Start recording the routing trace (on=True) or stop and return it."""
        trace, self.trace = self.trace, ([] if on else None)
        return trace

    def begin_step(self) -> None:
        if self.trace is not None:
            self.trace.append([])

    def routed(self, layer: int, per: list[int], experts: list[int]) -> None:
        """One layer call: `per[e]` (token, slot) pairs chose expert e; `experts` are the
        chosen ones this store serves."""
        counts = self.counts[layer]
        for e in experts:
            counts[e] += per[e]
        if self.trace:
            self.trace[-1].append({"layer": layer, "experts": experts})

    def predicted(self, experts: set[int]) -> None:
        """The next layer's experts as its router predicts them from this call's input."""
        if self.trace and self.trace[-1]:
            self.trace[-1][-1]["next"] = sorted(experts)
