"""Routed experts in their stored (quantized) form: a resident set on the device, the rest in
CPU memory, and a policy for misses. `ExpertStore` puts three parts together, each with one
job:

* `ExpertResidency` (expert_residency.py): which experts live where, copies into the device
  cache (on a miss or ahead of use: prefetch), and the miss policy (compute a missing expert
  on the CPU, moving the activations rather than the weights as Fiddler / KTransformers do, or
  copy it in);
* a compute strategy (expert_compute.py), chosen once at load: per expert, the layer's
  experts stacked, or one native call for decode-sized batches;
* the statistics (expert_stats.py): hit rate, bytes moved, CPU-computed experts, tokens per
  expert and the routing trace.
"""

from __future__ import annotations

import torch

from step3_edge.checkpoint import CheckpointReader
from step3_edge.config import Step3TextConfig
from step3_edge.runtime.backends import TorchBackend
from step3_edge.runtime.cost_model import Bandwidths
from step3_edge.runtime.expert_cache import Key
from step3_edge.runtime.expert_compute import Routing, choose_strategy, histogram
from step3_edge.runtime.expert_residency import ExpertResidency, Router
from step3_edge.runtime.expert_stats import RoutingLog, StoreStats, Trace
from step3_edge.runtime.mlp import RuntimeMLP


class ExpertStore:
    """Every routed expert of every MoE layer (or of one shard); `compute` runs one layer's
    routed experts."""

    def __init__(self, cfg: Step3TextConfig, reader: CheckpointReader, backend: TorchBackend,
                 resident: set[Key], *, policy: str = "lfu", miss: str = "auto",
                 prefetch: bool = False, bandwidths: Bandwidths | None = None,
                 routers: dict[int, Router] | None = None, owned: set[Key] | None = None,
                 stacked: bool | None = None) -> None:
        """`owned`: the experts this store serves (an FFN rank's shard; default: all).
        `stacked`: stack the layers' experts for decode-sized batches where that is exact
        and nothing can miss (`StackedExperts`); None: unless the backend's native GEMV runs
        the experts (`expert_compute.choose_strategy`)."""
        self.cfg = cfg
        self.stats = StoreStats()
        self.log = RoutingLog(cfg.moe_layers, cfg.moe_num_experts)
        self.residency = ExpertResidency(cfg, reader, backend, resident, self.stats,
                                         policy=policy, miss=miss, prefetch=prefetch,
                                         bandwidths=bandwidths, routers=routers, owned=owned)
        self.strategy, self.stacked_off = choose_strategy(cfg, self.residency, self.stats,
                                                          stacked)

    @property
    def resident(self) -> set[Key]:
        return self.residency.resident

    @property
    def expert_bytes(self) -> int:
        """Stored bytes of one routed expert (what a copy moves)."""
        return self.residency.expert_bytes

    @property
    def counts(self) -> dict[int, list[int]]:
        """Tokens routed to each expert of each MoE layer since the last reset."""
        return self.log.counts

    def summary(self) -> dict[str, object]:
        """Counters (`StoreStats`) plus the store's settings, as `Step3Runtime.stats` shows."""
        return {**self.stats.to_dict(), **self.residency.describe(),
                **self.strategy.describe(), "stacked_off": self.stacked_off}

    def reset_stats(self) -> None:
        self.stats.reset()
        self.log.reset()

    def record_trace(self, on: bool) -> Trace | None:
        """Start recording the routing trace (on=True) or stop and return it."""
        return self.log.record_trace(on)

    def begin_step(self) -> None:
        """Mark the start of one forward step (for the routing trace and prefetch)."""
        self.log.begin_step()
        self.residency.begin_step()

    def compute(self, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                next_layer: int | None = None, shared: RuntimeMLP | None = None
                ) -> torch.Tensor:
        """shared(x) + sum_k w_k * expert_{ids_k}(x) for x [N, h], ids / w [N, k] -> [N, h]
        in x's dtype, as the reference's `Step3MoE` (without `shared`, the routed sum alone;
        a shard sums its own experts). With `next_layer`, that layer's experts are predicted
        from x and prefetched first."""
        res = self.residency
        flat = ids.reshape(-1)
        per, pairs = histogram(flat, self.cfg.moe_num_experts)              # [E]
        experts = [e for e, n in enumerate(per) if n and res.serves((layer, e))]
        self.log.routed(layer, per, experts)
        res.prefetch_used(layer, experts)
        protect = frozenset((layer, e) for e in experts)
        if next_layer is not None:
            protect = self._look_ahead(next_layer, x, protect)
        where = res.place(layer, experts, per)
        return self.strategy(Routing(layer, flat, pairs, per, experts, where, protect),
                             x, w, shared)

    def _look_ahead(self, layer: int, x: torch.Tensor, protect: frozenset[Key]
                    ) -> frozenset[Key]:
        """Predict `layer`'s experts from x [N, h] (the current layer's input) for the
        routing trace and, with prefetch, copy them in -> `protect` with them added."""
        res = self.residency
        if not res.prefetch_on and self.log.trace is None:
            return protect
        pred = res.predict(layer, x)
        if pred is None:
            return protect
        self.log.predicted(pred)
        return res.prefetch(layer, pred, protect) if res.prefetch_on else protect


# engine.py imports the MLP helpers (mlp.py) from here
__all__ = ["ExpertStore", "Router"]
