"""How a layer's routed experts are computed, one strategy per store, chosen once at load
(`choose_strategy`):

* `PerExpert`: each chosen expert's own module on its rows, where the residency placed it
  (resident, copied in, or its CPU home copy, the activations moved rather than the weights);
* `StackedExperts` per layer (`Stacked`): every expert of the layer as two stacked GEMMs for
  decode-sized batches on a CPU, where every expert is resident and prepacked bf16;
* `NativeSum`: the shared expert and the routed pairs of a few rows in one native call
  (`native.swiglu`) on a CPU where every expert has the native SwiGLU.

Batches past a strategy's reach (too many rows, or for the stack too few distinct experts)
take the per-expert path. Every path gives the reference's sums: see `PerExpert.__call__`.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from step3_edge.config import Step3TextConfig
from step3_edge.runtime import native
from step3_edge.runtime.expert_cache import Key
from step3_edge.runtime.expert_residency import ExpertResidency
from step3_edge.runtime.expert_stats import StoreStats
from step3_edge.runtime.mlp import FusedSwiGLU, RuntimeMLP
from step3_edge.runtime.stacked_experts import StackedExperts

STACK_HEADROOM = 2 << 30     # CPU memory left free after the stacked experts' second copy


def histogram(flat: torch.Tensor, n_exp: int) -> tuple[list[int], list[int] | None]:
    """(token, slot) pairs flat [N*k] of expert ids -> the pairs per expert, and for
    decode-sized batches the ids as a list (counted on the host: two tensor ops cost more there
    than the Python). One sync either way."""
    if flat.numel() > 256:
        return torch.bincount(flat, minlength=n_exp).tolist(), None
    pairs = flat.tolist()
    per = [0] * n_exp
    for e in pairs:
        per[e] += 1
    return per, pairs


def _sort_pairs(flat: torch.Tensor, pairs: list[int] | None) -> torch.Tensor:
    """The order of the pairs flat [N*k] (their ids as a list where `histogram` gave one)
    sorted by expert, stable."""
    if pairs is None:
        return torch.argsort(flat, stable=True)
    return torch.tensor(sorted(range(len(pairs)), key=pairs.__getitem__), device=flat.device)


@dataclass(frozen=True)
class Routing:
    """One layer call's routed (token, slot) pairs, as the store prepared them."""

    layer: int
    flat: torch.Tensor           # [N*k] expert ids
    pairs: list[int] | None      # the same as a list, for decode-sized batches
    per: list[int]               # pairs per expert [E]
    experts: list[int]           # the chosen experts this store serves, ascending
    where: dict[int, str]        # expert -> "device" / "copy" / "cpu" (`ExpertResidency.place`)
    protect: frozenset[Key]      # experts no copy may evict during this call


class PerExpert:
    """Each chosen expert's module on its own rows."""

    name = "per expert"

    def __init__(self, residency: ExpertResidency, stats: StoreStats) -> None:
        self.residency, self.stats = residency, stats

    def describe(self) -> dict[str, object]:
        return {"strategy": self.name, "stacked_layers": 0, "stacked_bytes": 0}

    def __call__(self, r: Routing, x: torch.Tensor, w: torch.Tensor,
                 shared: RuntimeMLP | None) -> torch.Tensor:
        """shared(x) + sum_k w_k * expert_{ids_k}(x) for x [N, h], w [N, k] -> [N, h] in x's
        dtype (the float32 routed sum rounded once, then added to the shared expert's output,
        as the reference's `Step3MoE` and `share_expert`; without `shared`, the routed sum
        alone).

        The (token, slot) pairs are sorted by expert (stable), gathered once, each expert runs
        on its slice, and one accumulating index_put_ adds in expert order per row: the same
        sums, bit for bit, as the reference's loop of one index_add_ per expert."""
        routed = self._routed(r, x, w) if r.experts else \
            torch.zeros_like(x, dtype=torch.float32)
        return routed.to(x.dtype) if shared is None else shared(x) + routed.to(x.dtype)

    def _routed(self, r: Routing, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The float32 routed sum [N, h] of the experts `r.experts`."""
        k = w.shape[1]
        start = [0] * (len(r.per) + 1)
        for e, n in enumerate(r.per):
            start[e + 1] = start[e] + n
        order = _sort_pairs(r.flat, r.pairs)                             # [N*k]
        rows = order // k                                                # [N*k] token rows
        wf = w.reshape(-1).index_select(0, order)                        # [N*k]
        y, rows, wf = self._outputs(r, x, order, rows, wf, start)
        # index_put_ accumulates serially in index order, like the reference's index_add_,
        # without the OpenMP region CPU index_add_ opens (~0.3 ms from the scheduler thread)
        out = torch.zeros_like(x, dtype=torch.float32)                   # [N, h]
        return out.index_put_((rows,), y.float() * wf[:, None], accumulate=True)

    def _outputs(self, r: Routing, x: torch.Tensor, order: torch.Tensor, rows: torch.Tensor,
                 wf: torch.Tensor, start: list[int]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The expert outputs [pairs, h] of the sorted pairs, with their token rows and
        weights (a shard keeps only its own experts' pairs)."""
        y = self._each_expert(r, x, rows, start)
        if len(r.experts) < sum(1 for n in r.per if n):
            keep = torch.cat([torch.arange(start[e], start[e + 1])
                              for e in r.experts]).to(x.device)
            rows, wf = rows.index_select(0, keep), wf.index_select(0, keep)
        return y, rows, wf

    def _each_expert(self, r: Routing, x: torch.Tensor, rows: torch.Tensor, start: list[int]
                     ) -> torch.Tensor:
        """Each expert of `r.experts` on its rows of x (`rows`, sorted by expert; expert e's
        are rows[start[e]:start[e+1]]) where `r.where` says -> outputs [pairs, h] in that
        order."""
        dev, res = x.device, self.residency
        xs = x.index_select(0, rows)                                     # [N*k, h]
        # activations for the CPU experts first (waits only for the attention side), then
        # the device experts are queued, then the CPU computes while the device works
        on_cpu = {e: xs[start[e]:start[e + 1]].to("cpu", res.host.dtype)
                  for e in r.experts if r.where[e] == "cpu"}
        ys: dict[int, torch.Tensor] = {}
        for e in r.experts:
            if r.where[e] != "cpu":
                ys[e] = res.module((r.layer, e), r.where[e], r.protect)(
                    xs[start[e]:start[e + 1]])
        for e, xc in on_cpu.items():
            y = res.on_host[(r.layer, e)](xc)
            if dev.type != "cpu":
                self.stats.bytes_activations += 2 * xc.numel() * x.element_size()
                y = y.to(dev, x.dtype, non_blocking=True)
            self.stats.cpu_computed += 1
            ys[e] = y
        return ys[r.experts[0]] if len(r.experts) == 1 else torch.cat([ys[e] for e in r.experts])


class Stacked(PerExpert):
    """Each layer's experts stacked (`StackedExperts`) for the batches where the stack pays
    (`StackedExperts.wanted`), one by one otherwise."""

    name = "stacked"

    def __init__(self, residency: ExpertResidency, stats: StoreStats,
                 stacks: dict[int, StackedExperts]) -> None:
        super().__init__(residency, stats)
        self.stacks = stacks

    def describe(self) -> dict[str, object]:
        return {"strategy": self.name, "stacked_layers": len(self.stacks),
                "stacked_bytes": sum(s.nbytes for s in self.stacks.values())}

    def _outputs(self, r: Routing, x: torch.Tensor, order: torch.Tensor, rows: torch.Tensor,
                 wf: torch.Tensor, start: list[int]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        stack = self.stacks[r.layer]
        if not stack.wanted(x.shape[0], len(r.experts)):
            return super()._outputs(r, x, order, rows, wf, start)
        self.stats.stacked += 1
        return stack(x, r.flat.index_select(0, order), rows), rows, wf   # [N*k, h]


class NativeSum(PerExpert):
    """A call of at most `native.EXPERT_MAX_ROWS` bf16 rows in one native call; larger ones
    one expert at a time."""

    name = "native"

    def __call__(self, r: Routing, x: torch.Tensor, w: torch.Tensor,
                 shared: RuntimeMLP | None) -> torch.Tensor:
        base = None if shared is None else shared.native
        if r.experts and (shared is None or base is not None) and r.pairs is not None and \
                x.shape[0] <= native.EXPERT_MAX_ROWS and x.dtype == torch.bfloat16:
            return self._native_sum(r, x, w, base)
        return super().__call__(r, x, w, shared)

    def _native_sum(self, r: Routing, x: torch.Tensor, w: torch.Tensor,
                    shared: native.SwiGLU | None) -> torch.Tensor:
        """The shared expert, then the routed pairs in the same order (by expert, then row
        and slot), each expert's module where `r.where` says (on a CPU-only machine all are
        CPU memory)."""
        assert r.pairs is not None
        mlps = [] if shared is None else [shared]
        for e in r.experts:
            if r.where[e] == "cpu":
                self.stats.cpu_computed += 1
            mlps.append(self.residency.module((r.layer, e), r.where[e], r.protect).native)
        base = [] if shared is None else [(0, row, 1.0) for row in range(x.shape[0])]
        slot = {e: len(mlps) - len(r.experts) + i for i, e in enumerate(r.experts)}
        k, wf = w.shape[1], w.reshape(-1).tolist()
        terms = sorted((slot[e], i // k, wf[i]) for i, e in enumerate(r.pairs) if e in slot)
        return native.swiglu(x, mlps, base + terms, x.dtype, len(base))


def choose_strategy(cfg: Step3TextConfig, residency: ExpertResidency, stats: StoreStats,
                    stacked: bool | None) -> tuple[PerExpert, str]:
    """The store's strategy, and why the experts are not stacked ("" where they are).
    `stacked`: stack where that is exact and nothing can miss; None: unless the backend's
    native GEMV runs the experts (per expert it beats the stack: docs/runtime.md, "Decode
    speed"). Without the stack, CPU experts that all have the native SwiGLU take `NativeSum`."""
    why = _why_not_stacked(cfg, residency, stacked)
    if not why:
        stacks = {L: StackedExperts([residency.on_device[(L, e)]
                                     for e in range(cfg.moe_num_experts)], residency.bw)
                  for L in cfg.moe_layers}
        return Stacked(residency, stats, stacks), why
    if residency.backend.device.type == "cpu" and \
            all(m.native is not None for m in residency.modules()):
        return NativeSum(residency, stats), why
    return PerExpert(residency, stats), why


def _why_not_stacked(cfg: Step3TextConfig, residency: ExpertResidency, asked: bool | None
                     ) -> str:
    """Why each MoE layer's experts are not stacked, or "" where they can be: when asked
    (None: unless the native GEMV runs the experts), on the CPU, every expert is resident
    (none can miss or leave), bf16-prepacked, and a second copy leaves free memory."""
    backend, resident = residency.backend, residency.resident
    if asked is False:
        return "stacked_experts=False"
    if backend.device.type != "cpu":
        return "the device is not the CPU"
    if asked is None and backend.caps.native:
        return "the native GEMV runs the experts (faster per expert than the stack)"
    if len(resident) < len(cfg.moe_layers) * cfg.moe_num_experts:
        return "this store does not hold every routed expert resident"
    need = len(resident) * residency.expert_bytes
    free = psutil.virtual_memory().available
    if need > free - STACK_HEADROOM:
        return (f"a second copy of the experts ({need / 2**30:.2f} GiB) would leave less "
                f"than {STACK_HEADROOM / 2**30:.0f} GiB of {free / 2**30:.2f} GiB free")
    if not all(isinstance(residency.on_device[(L, e)], FusedSwiGLU)
               for L in cfg.moe_layers for e in range(cfg.moe_num_experts)):
        return "the experts are not oneDNN-prepacked bf16"
    if not backend.caps.fast_bf16_gemm:
        return "the experts are not oneDNN-prepacked bf16 (no fast bf16 GEMM on this CPU)"
    return ""
