"""Which routed experts hold a device slot: cache policies, and their replay on a routing trace.

The same `ExpertCache` decides for the live expert store and for `replay`, so hit rates measured
offline on a recorded trace (`step3-edge profile --trace`) are those the runtime would get.

Policies: `static` (the resident set never changes: frequency-pinned when it was chosen from a
profile), `lru` (least recently used slot is evicted) and `lfu`, the default (frequency-weighted:
the slot with the fewest uses is evicted, least recent first among equals; every use count
halves after each AGING x capacity uses, so a shift in what is popular takes over). LRU thrashes
when one step needs more experts than there are slots (it cycles through the layers in order,
LRU's worst case: hit rate 0 at batch 16 on `mini`); LFU keeps the often used ones. Pinned
experts never leave. Prefetch (`replay(..., prefetch=True)`) admits the experts that the next
layer's router predicts from the current hidden state before that layer runs.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from step3_edge.errors import ConfigError

Key = tuple[int, int]  # (layer, expert)
POLICIES = ("static", "lru", "lfu")
AGING = 64             # lfu: use counts halve every AGING x capacity uses


class ExpertCache:
    """`capacity` device slots for routed experts, managed by `policy`; `pinned` keys hold
    slots of their own that are never evicted (they do not count against `capacity`)."""

    def __init__(self, capacity: int, policy: str = "lfu", pinned: Iterable[Key] = (),
                 initial: Iterable[Key] = ()) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"unknown expert cache policy {policy!r}",
                              f"choose one of: {', '.join(POLICIES)}")
        if capacity < 0:
            raise ConfigError(f"expert cache capacity {capacity}", "use a capacity >= 0")
        self.capacity, self.policy = capacity, policy
        self.pinned = frozenset(pinned)
        self.slots: OrderedDict[Key, None] = OrderedDict()   # oldest use first
        self.uses: Counter[Key] = Counter()
        self._until_aging = AGING * max(capacity, 1)
        for k in initial:
            if k not in self.pinned and len(self.slots) < capacity:
                self.slots[k] = None

    def __contains__(self, key: Key) -> bool:
        return key in self.pinned or key in self.slots

    def __len__(self) -> int:
        return len(self.pinned) + len(self.slots)

    @property
    def resident(self) -> set[Key]:
        return set(self.pinned) | set(self.slots)

    def touch(self, key: Key) -> None:
        """Record one use of `key` (hit or miss)."""
        self.uses[key] += 1
        if key in self.slots:
            self.slots.move_to_end(key)
        self._until_aging -= 1
        if self._until_aging == 0:
            self._until_aging = AGING * max(self.capacity, 1)
            self.uses = Counter({k: n // 2 for k, n in self.uses.items() if n > 1})

    def victim(self, protect: frozenset[Key] = frozenset()) -> Key | None:
        """The slot `admit` would free next (None: a free slot exists or nothing may go)."""
        if len(self.slots) < self.capacity:
            return None
        cands = (k for k in self.slots if k not in protect)          # oldest use first
        if self.policy == "lfu":                     # min keeps LRU order among ties
            return min(cands, key=self.uses.__getitem__, default=None)
        return next(cands, None)

    def admit(self, key: Key, protect: frozenset[Key] = frozenset()) -> tuple[bool, Key | None]:
        """Give `key` a slot if the policy allows: (admitted, evicted key or None). Keys in
        `protect` (e.g. the experts of the layer being computed) are not evicted."""
        if key in self or self.policy == "static" or self.capacity == 0:
            return False, None
        out = self.victim(protect)
        if out is None and len(self.slots) >= self.capacity:
            return False, None
        if out is not None:
            del self.slots[out]
        self.slots[key] = None
        return True, out


def replay(trace: Sequence[Sequence[dict[str, Any]]], capacity: int, policy: str = "lfu",
           prefetch: bool = False, pinned: Iterable[Key] = (), initial: Iterable[Key] = ()
           ) -> dict[str, float]:
    """Hit rate of a cache on a routing trace: a list of steps, each a list of per-MoE-layer
    records `{"layer": L, "experts": [ids used], "next": [ids the next layer's router predicts
    from this layer's input] }` (`next` only needed with `prefetch`)."""
    cache = ExpertCache(capacity, policy, pinned, initial)
    hits = accesses = prefetched = useful = 0
    for step in trace:
        predicted: set[Key] = set()
        for rec in step:
            layer = int(rec["layer"])
            used = {(layer, int(e)) for e in rec["experts"]}
            useful += len(used & predicted)
            for key in sorted(used):
                accesses += 1
                hits += key in cache
                cache.touch(key)
                cache.admit(key, protect=frozenset(used))
            predicted = set()
            if prefetch and rec.get("next") is not None:
                nxt = layer + 1
                predicted = {(nxt, int(e)) for e in rec["next"]}
                for key in sorted(predicted):
                    prefetched += cache.admit(key, protect=frozenset(predicted))[0]
    return {"hits": hits, "accesses": accesses, "hit_rate": hits / max(accesses, 1),
            "prefetched": prefetched, "prefetch_used": useful}


def top_experts(counts: dict[int, Sequence[float]], n: int) -> list[Key]:
    """The `n` most used (layer, expert) pairs of a profile (ties: lower layer, lower id)."""
    keys = [(L, e) for L, c in counts.items() for e in range(len(c))]
    keys.sort(key=lambda k: (-counts[k[0]][k[1]], k))
    return keys[:n]


def trace_counts(trace: Sequence[Sequence[dict[str, Any]]], num_experts: int
                 ) -> dict[int, list[int]]:
    """Per-layer expert use counts of a trace (one count per step and layer that used it)."""
    out: dict[int, Counter[int]] = {}
    for step in trace:
        for rec in step:
            out.setdefault(int(rec["layer"]), Counter()).update(int(e) for e in rec["experts"])
    return {L: [c[e] for e in range(num_experts)] for L, c in sorted(out.items())}
