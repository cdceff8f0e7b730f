"""Where the routed experts live: a CPU home copy of each (page-locked when CUDA is present),
a device copy of the resident ones (`ExpertCache` says which: static, LRU or LFU), copies into
the cache on a miss or ahead of use (prefetch: on CUDA on a side stream, so that the copy
overlaps this layer's compute), and the miss policy that says, per call, whether a missing
expert is computed on the CPU or copied in (`miss="auto"`: `CostModel`, fed by bandwidths
measured at start-up).

On a CPU-only machine "device" and "CPU" are the same memory: a copy is a memcpy into a cache
slot (done for real, so the copy path costs what a copy costs), and an expert's home copy is
also its device copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from tqdm import tqdm

from step3_edge.checkpoint import CheckpointReader
from step3_edge.config import Step3TextConfig
from step3_edge.errors import ConfigError
from step3_edge.runtime.backends import Linear, TorchBackend
from step3_edge.runtime.cost_model import Bandwidths, CostModel, measure_bandwidths
from step3_edge.runtime.expert_cache import ExpertCache, Key
from step3_edge.runtime.expert_stats import StoreStats
from step3_edge.runtime.mlp import RuntimeMLP, make_mlp, read_linear
from step3_edge.runtime.options import MISS_POLICIES

Router = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]   # x -> (ids, weights)


class ExpertResidency:
    """The routed experts a store serves (`owned`: an FFN rank's shard; None: all), where each
    one's weights are, and where a layer call finds or computes each one (`place`, `module`).
    Copies, evictions and the miss policy's choices are counted in `stats`."""

    def __init__(self, cfg: Step3TextConfig, reader: CheckpointReader, backend: TorchBackend,
                 resident: set[Key], stats: StoreStats, *, policy: str = "lfu",
                 miss: str = "auto", prefetch: bool = False,
                 bandwidths: Bandwidths | None = None, routers: dict[int, Router] | None = None,
                 owned: set[Key] | None = None) -> None:
        if miss not in MISS_POLICIES:
            raise ConfigError(f"unknown miss policy {miss!r}",
                              f"choose one of: {', '.join(MISS_POLICIES)}")
        self.cfg, self.backend, self.stats = cfg, backend, stats
        self.miss, self.prefetch_on, self.owned = miss, prefetch, owned
        self.routers = routers or {}
        resident = resident if owned is None else resident & owned
        dev = backend.device
        self.host = backend if dev.type == "cpu" else \
            TorchBackend("cpu", backend.dtype, backend.native_kernels)
        pinned = resident if policy == "static" else ()
        self.cache = ExpertCache(0 if policy == "static" else len(resident), policy, pinned,
                                 initial=sorted(resident))
        self.bw = bandwidths or measure_bandwidths(dev, backend.dtype, backend=backend)
        self.cost = CostModel(self.bw, cfg.hidden_size, torch.finfo(backend.dtype).bits // 8,
                              dev.type == "cpu")
        self.on_device: dict[Key, RuntimeMLP] = {}
        self.on_host: dict[Key, RuntimeMLP] = {}
        self.ready: dict[Key, torch.cuda.Event] = {}
        self.copy_stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        self.predicted: dict[int, set[int]] = {}       # layer -> experts prefetched for it
        names = [f"moe.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
        for L in tqdm(cfg.moe_layers, desc="load experts", unit="layer", disable=None,
                      leave=False):                # progress on a terminal
            for e in range(cfg.moe_num_experts):
                key = (L, e)
                if owned is not None and key not in owned:
                    continue
                home = None
                if key not in self.cache or policy != "static":    # a CPU home copy
                    lins = [read_linear(reader, self.host, f"model.layers.{L}.{n}", e)
                            for n in names]
                    if dev.type == "cuda":
                        lins = [lin.pin() for lin in lins]
                    home = self.on_host[key] = make_mlp(*lins)
                if key in self.cache:                    # same memory on a CPU-only machine
                    self.on_device[key] = home if home is not None and dev.type == "cpu" \
                        else make_mlp(*(read_linear(reader, backend, f"model.layers.{L}.{n}", e)
                                        for n in names))
        one = next(iter({**self.on_host, **self.on_device}.values()), None)
        self.expert_bytes = 0 if one is None else \
            sum(m.nbytes for m in (one.gate_proj, one.up_proj, one.down_proj))
        home = next(iter(self.on_host.values()), None)    # what CPU compute of a miss reads
        self.host_expert_bytes = self.expert_bytes if home is None else \
            sum(m.compute_nbytes for m in (home.gate_proj, home.up_proj, home.down_proj))

    @property
    def resident(self) -> set[Key]:
        return self.cache.resident

    def serves(self, key: Key) -> bool:
        return self.owned is None or key in self.owned

    def modules(self) -> Iterator[RuntimeMLP]:
        """Every expert module held (device copies, then home copies)."""
        yield from self.on_device.values()
        yield from self.on_host.values()

    def describe(self) -> dict[str, object]:
        return {"resident": len(self.resident), "policy": self.cache.policy, "miss": self.miss,
                "prefetch": self.prefetch_on, "expert_bytes": self.expert_bytes,
                "host_expert_bytes": self.host_expert_bytes, "bandwidths": vars(self.bw)}

    def begin_step(self) -> None:
        self.predicted.clear()

    # ------------------------------------------------------------------ one layer call
    def place(self, layer: int, experts: list[int], per: list[int]) -> dict[int, str]:
        """Where each of `experts` (chosen by `per[e]` pairs) is computed in this call:
        "device" (resident), "copy" (copied into the cache first) or "cpu" (its home copy),
        as the miss policy says; every one counts as a use of the cache."""
        where: dict[int, str] = {}
        for e in experts:
            key = (layer, e)
            self.stats.accesses += 1
            hit = key in self.cache
            self.cache.touch(key)
            if hit:
                self.stats.hits += 1
                where[e] = "device"
                continue
            choice = self.miss if self.miss != "auto" else self.cost.choose(
                per[e], self.expert_bytes, self._flops(per[e]), self.host_expert_bytes)
            self.stats.miss_choices[choice] += 1
            where[e] = "copy" if choice == "copy" else "cpu"
        return where

    def module(self, key: Key, where: str, protect: frozenset[Key]) -> RuntimeMLP:
        """The module that computes `key` where `place` said (copying it in for "copy")."""
        if where == "cpu":
            return self.on_host[key]
        return self._device_mlp(key) if where == "device" else self.copy_in(key, protect)

    def _flops(self, n: int) -> float:
        return 6.0 * n * self.cfg.hidden_size * self.cfg.moe_intermediate_size

    # ------------------------------------------------------------------ moving weights
    def copy_in(self, key: Key, protect: frozenset[Key], wait: bool = True) -> RuntimeMLP:
        """A device copy of a host expert, kept in the cache when the policy lets it in
        (evicting a victim not in `protect`), else used once and dropped. On CUDA the copy
        runs on a side stream; `wait` makes the compute stream wait for it now (else at first
        use)."""
        src = self.on_host[key]
        linears = (src.gate_proj, src.up_proj, src.down_proj)
        same = self.backend.device.type == "cpu"
        if self.copy_stream is not None:
            with torch.cuda.stream(self.copy_stream):
                lins = [lin.remake(self.backend, non_blocking=True) for lin in linears]
                ev = torch.cuda.Event()
                ev.record(self.copy_stream)
            main = torch.cuda.current_stream(self.backend.device)
            for lin in lins:
                for t in [*lin.parts.values(), *(v for v in vars(lin).values()
                                                 if isinstance(v, torch.Tensor))]:
                    t.record_stream(main)
        else:
            lins = [_cloned(lin, self.backend) if same else lin.remake(self.backend)
                    for lin in linears]
            ev = None
        mlp = make_mlp(*lins)
        self.stats.copied += 1
        self.stats.bytes_copied += sum(lin.nbytes for lin in linears)
        ok, out = self.cache.admit(key, protect)
        if out is not None:
            self.stats.evictions += 1
            self.on_device.pop(out, None)
            self.ready.pop(out, None)
        if ok:
            self.on_device[key] = mlp
            if ev is not None:
                self.ready[key] = ev
        if ev is not None and (wait or key not in self.ready):
            torch.cuda.current_stream(self.backend.device).wait_event(ev)
            self.ready.pop(key, None)
        return mlp

    def _device_mlp(self, key: Key) -> RuntimeMLP:
        ev = self.ready.pop(key, None)
        if ev is not None:
            torch.cuda.current_stream(self.backend.device).wait_event(ev)
        return self.on_device[key]

    def predict(self, layer: int, x: torch.Tensor) -> set[int] | None:
        """The experts of `layer` this store serves that its router picks for `x` [N, h] (the
        current layer's input), or None where the layer's router is not known here."""
        route = self.routers.get(layer)
        if route is None:
            return None
        ids, _ = route(x)
        return {e for e in ids.unique().tolist() if self.serves((layer, e))}

    def prefetch(self, layer: int, experts: set[int], protect: frozenset[Key]
                 ) -> frozenset[Key]:
        """Copy the predicted `experts` of `layer` into the cache before that layer runs
        (evicting none of `protect`) -> `protect` with them added."""
        self.predicted[layer] = experts
        protect = protect | frozenset((layer, e) for e in experts)
        c = self.cache
        for e in sorted(experts):
            room = len(c.slots) < c.capacity or c.victim(protect) is not None
            if (layer, e) not in c and c.policy != "static" and room:
                self.copy_in((layer, e), protect, wait=False)
                self.stats.prefetched += 1
        return protect

    def prefetch_used(self, layer: int, experts: list[int]) -> None:
        """Count the experts of this call of `layer` that were prefetched for it."""
        self.stats.prefetch_used += len(self.predicted.pop(layer, set()) & set(experts))


def _cloned(lin: Linear, backend: TorchBackend) -> Linear:
    """Same-memory 'copy' (CPU-only machines): a real memcpy of the stored parts."""
    return backend.linear(lin.scheme, {k: v.clone() for k, v in lin.parts.items()}, lin.shape)
