"""Routed experts in their stored (quantized) form: a resident set on the device, the rest in
CPU memory (page-locked when CUDA is present), and a policy for misses.

On a miss the store either computes the expert on the CPU, moving the activations rather than
the weights (Fiddler / KTransformers), or copies the expert into the device cache (`ExpertCache`:
static, LRU or frequency-weighted) and computes it there. `miss="auto"` asks `CostModel`, which
is fed by bandwidths measured at start-up (`measure_bandwidths`). With `prefetch`, the FFN side
applies the next layer's router to the current layer's input and copies the predicted experts
ahead (on CUDA on a side stream, so that the copy overlaps this layer's compute).

On a CPU-only machine "device" and "CPU" are the same memory: a copy is a memcpy into a cache
slot (done for real, so the copy path costs what a copy costs), and CPU compute is plain compute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import psutil
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from step3_edge.checkpoint import CheckpointReader
from step3_edge.config import Step3TextConfig
from step3_edge.errors import ConfigError
from step3_edge.model import Step3MLP
from step3_edge.runtime import native
from step3_edge.runtime.backends import Linear, TorchBackend
from step3_edge.runtime.cost_model import Bandwidths, CostModel, measure_bandwidths
from step3_edge.runtime.expert_cache import ExpertCache, Key
from step3_edge.runtime.stacked_experts import StackedExperts

MISS_POLICIES = ("cpu", "copy", "auto")
STACK_HEADROOM = 2 << 30     # CPU memory left free after the stacked experts' second copy
Router = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]   # x -> (ids, weights)


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

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "misses": self.accesses - self.hits, "hit_rate": self.hit_rate}


class RuntimeMLP(Step3MLP):
    """The reference SwiGLU module (`Step3MLP`) around three runtime linears; `native` is its
    one-call native MLP where it has one (`FusedSwiGLU`), else None."""

    native: native.SwiGLU | None = None


def make_mlp(gate: Linear, up: Linear, down: Linear) -> RuntimeMLP:
    """`RuntimeMLP` around three runtime linears; with oneDNN prepacked bf16 gate and up,
    gate and up become one GEMM (`FusedSwiGLU`)."""
    if getattr(gate, "packed", None) is not None and getattr(up, "packed", None) is not None:
        return FusedSwiGLU(gate, up, down)
    with torch.device("meta"):
        mlp = RuntimeMLP(1, 1)
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = gate, up, down
    return mlp


class FusedSwiGLU(RuntimeMLP):
    """`Step3MLP` with gate and up as one prepacked bf16 matrix [2m, h] (`PackedBf16`;
    bit-identical to two GEMMs under oneDNN; tests/runtime/test_backends.py). The separate
    linears are kept for their stored parts (copies, byte counts) but drop their own packed
    copies. Where the backend has the native kernels, calls of at most `native.MAX_ROWS` rows
    run the whole MLP in one native call (`native.SwiGLU`, also what `ExpertStore` sums a
    layer's routed experts with)."""

    def __init__(self, gate: Linear, up: Linear, down: Linear) -> None:
        nn.Module.__init__(self)
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down
        self.m = gate.shape[0]
        self.packed = gate.backend.pack_bf16([gate.weight, up.weight])   # [2m, h]
        gate.packed = up.packed = None
        self.native = native.SwiGLU(gate.weight, up.weight, down.weight) \
            if self.packed.native is not None and down.gemv is not None else None
        # without oneDNN's blocked GEMM the native MLP is the fastest path up to its 8 rows
        self.native_rows = native.MAX_ROWS if self.packed.packed is not None else \
            native.GEMV_MAX_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:                 # [n, h] -> [n, h]
        if self.native is not None and x.dim() == 2 and x.shape[0] <= self.native_rows and \
                x.dtype == torch.bfloat16:
            return self.native(x)
        gu = self.packed(x)                                              # [n, 2m]
        return self.down_proj(F.silu(gu[..., :self.m]) * gu[..., self.m:])


def _histogram(flat: torch.Tensor, n_exp: int) -> tuple[list[int], list[int] | None]:
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
    """The order of the pairs flat [N*k] (their ids as a list where `_histogram` gave one)
    sorted by expert, stable."""
    if pairs is None:
        return torch.argsort(flat, stable=True)
    return torch.tensor(sorted(range(len(pairs)), key=pairs.__getitem__), device=flat.device)


def read_linear(reader: CheckpointReader, backend: TorchBackend, name: str,
                expert: int | None = None) -> Linear:
    """One stored weight (or one expert of a stacked weight) as a Linear of `backend`."""
    parts = {k: v.to(backend.device) for k, v in reader.read_parts(name, expert).items()}
    spec = reader.spec(name)
    shape = spec.shape[1:] if expert is not None else spec.shape
    return backend.linear(reader.scheme_of(name), parts, shape)


class ExpertStore:
    """Every routed expert of every MoE layer; `compute` runs one layer's routed experts."""

    def __init__(self, cfg: Step3TextConfig, reader: CheckpointReader, backend: TorchBackend,
                 resident: set[Key], *, policy: str = "lfu", miss: str = "auto",
                 prefetch: bool = False, bandwidths: Bandwidths | None = None,
                 routers: dict[int, Router] | None = None, owned: set[Key] | None = None,
                 stacked: bool | None = None) -> None:
        """`owned`: the experts this store serves (an FFN rank's shard; default: all).
        `stacked`: stack the layers' experts for decode-sized batches where that is exact
        and nothing can miss (`StackedExperts`); None: unless the backend's native GEMV runs
        the experts (per expert it beats the stack: docs/runtime.md, "Decode speed")."""
        if miss not in MISS_POLICIES:
            raise ConfigError(f"unknown miss policy {miss!r}",
                              f"choose one of: {', '.join(MISS_POLICIES)}")
        self.cfg, self.backend, self.miss, self.prefetch_on = cfg, backend, miss, prefetch
        self.routers = routers or {}
        self.owned = owned
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
        self.stacked: dict[int, StackedExperts] = {}
        self.stacked_off = self._stack(cfg, resident, stacked)
        # one native call per layer for a few rows (`_native_sum`): CPU experts with the
        # native SwiGLU, unless the experts were stacked on request
        self._native = dev.type == "cpu" and not self.stacked and all(
            m.native is not None
            for m in [*self.on_device.values(), *self.on_host.values()])
        home = next(iter(self.on_host.values()), None)    # what CPU compute of a miss reads
        self.host_expert_bytes = self.expert_bytes if home is None else \
            sum(m.compute_nbytes for m in (home.gate_proj, home.up_proj, home.down_proj))
        self.stats = StoreStats()
        self.counts = {L: [0] * cfg.moe_num_experts for L in cfg.moe_layers}   # pairs routed
        self.trace: list[list[dict[str, object]]] | None = None
        self._predicted: dict[int, set[int]] = {}

    def _stack(self, cfg: Step3TextConfig, resident: set[Key], asked: bool | None) -> str:
        """Stack each MoE layer's experts (`StackedExperts`) when asked (None: unless the
        native GEMV runs the experts), on the CPU, every expert is resident (none can miss or
        leave), bf16-prepacked, and a second copy leaves free memory; else the reason it does
        not."""
        if asked is False:
            return "stacked_experts=False"
        if self.backend.device.type != "cpu":
            return "the device is not the CPU"
        if asked is None and self.backend.caps.native:
            return "the native GEMV runs the experts (faster per expert than the stack)"
        if len(resident) < len(cfg.moe_layers) * cfg.moe_num_experts:
            return "this store does not hold every routed expert resident"
        need = len(resident) * self.expert_bytes
        free = psutil.virtual_memory().available
        if need > free - STACK_HEADROOM:
            return (f"a second copy of the experts ({need / 2**30:.2f} GiB) would leave less "
                    f"than {STACK_HEADROOM / 2**30:.0f} GiB of {free / 2**30:.2f} GiB free")
        mlps = {L: [self.on_device[(L, e)] for e in range(cfg.moe_num_experts)]
                for L in cfg.moe_layers}
        if not all(isinstance(m, FusedSwiGLU) for ms in mlps.values() for m in ms):
            return "the experts are not oneDNN-prepacked bf16"
        if not self.backend.caps.fast_bf16_gemm:
            return "the experts are not oneDNN-prepacked bf16 (no fast bf16 GEMM on this CPU)"
        self.stacked = {L: StackedExperts(ms, self.bw) for L, ms in mlps.items()}
        return ""

    # ------------------------------------------------------------------ bookkeeping
    def reset_stats(self) -> None:
        self.stats = StoreStats()
        for c in self.counts.values():
            c[:] = [0] * len(c)

    def summary(self) -> dict[str, object]:
        """Counters (`StoreStats`) plus the store's settings, as `Step3Runtime.stats` shows."""
        out = self.stats.to_dict()
        out.update(resident=len(self.resident), policy=self.cache.policy, miss=self.miss,
                   stacked_layers=len(self.stacked), stacked_off=self.stacked_off,
                   stacked_bytes=sum(s.nbytes for s in self.stacked.values()),
                   prefetch=self.prefetch_on, expert_bytes=self.expert_bytes,
                   host_expert_bytes=self.host_expert_bytes,
                   bandwidths=vars(self.bw))
        return out

    def record_trace(self, on: bool) -> list[list[dict[str, object]]] | None:
        """Start recording the routing trace (on=True) or stop and return it."""
        trace, self.trace = self.trace, ([] if on else None)
        return trace

    def begin_step(self) -> None:
        """Mark the start of one forward step (for the routing trace)."""
        if self.trace is not None:
            self.trace.append([])
        self._predicted.clear()

    @property
    def resident(self) -> set[Key]:
        return self.cache.resident

    def _flops(self, n: int) -> float:
        return 6.0 * n * self.cfg.hidden_size * self.cfg.moe_intermediate_size

    # ------------------------------------------------------------------ moving weights
    def _copy_in(self, key: Key, admit: bool, protect: frozenset[Key], wait: bool = True
                 ) -> RuntimeMLP:
        """A device copy of a host expert; kept in the cache when `admit` and the policy lets
        it in (evicting a victim), else used once and dropped. On CUDA the copy runs on a side
        stream; `wait` makes the compute stream wait for it now (else at first use)."""
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
        if admit:
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

    def _prefetch(self, layer: int, x: torch.Tensor, protect: frozenset[Key]) -> None:
        """Apply layer `layer`'s router to `x` [N, h] (the current layer's input) and copy the
        experts it predicts into the cache before that layer runs."""
        route = self.routers.get(layer)
        if route is None or (not self.prefetch_on and self.trace is None):
            return
        ids, _ = route(x)
        pred = {e for e in ids.unique().tolist()
                if self.owned is None or (layer, e) in self.owned}
        if self.trace is not None and self.trace and self.trace[-1]:
            self.trace[-1][-1]["next"] = sorted(pred)
        if not self.prefetch_on:
            return
        self._predicted[layer] = pred
        protect = protect | frozenset((layer, e) for e in pred)
        c = self.cache
        for e in sorted(pred):
            room = len(c.slots) < c.capacity or c.victim(protect) is not None
            if (layer, e) not in c and c.policy != "static" and room:
                self._copy_in((layer, e), True, protect, wait=False)
                self.stats.prefetched += 1

    # ------------------------------------------------------------------ compute
    def compute(self, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                next_layer: int | None = None, shared: nn.Module | None = None
                ) -> torch.Tensor:
        """shared(x) + sum_k w_k * expert_{ids_k}(x) for x [N, h], ids / w [N, k] -> [N, h]
        in x's dtype (the float32 routed sum rounded once, then added to the shared expert's
        output, as the reference's `Step3MoE` and `share_expert`; without `shared`, the routed
        sum alone). With `next_layer`, that layer's experts are predicted from x and
        prefetched first.

        The (token, slot) pairs are sorted by expert (stable), gathered once, each expert runs
        on its slice, and one accumulating index_put_ adds in expert order per row: the same
        sums, bit for bit, as the reference's loop of one index_add_ per expert."""
        n_exp = self.cfg.moe_num_experts
        flat = ids.reshape(-1)
        per, pairs = _histogram(flat, n_exp)                                # [E]
        uniq = [e for e in range(n_exp) if per[e] and
                (self.owned is None or (layer, e) in self.owned)]
        counts = self.counts[layer]       # a shard counts its own experts (ranks sum up)
        for e in uniq:
            counts[e] += per[e]
        if self.trace is not None and self.trace:
            self.trace[-1].append({"layer": layer, "experts": uniq})
        pred = self._predicted.pop(layer, set())
        self.stats.prefetch_used += len(pred & set(uniq))
        protect = frozenset((layer, e) for e in uniq)
        if next_layer is not None:
            self._prefetch(next_layer, x, protect)
            protect |= frozenset((next_layer, e) for e in self._predicted.get(next_layer, ()))
        kinds: dict[int, str] = {}
        for e in uniq:
            key = (layer, e)
            self.stats.accesses += 1
            hit = key in self.cache
            self.cache.touch(key)
            if hit:
                self.stats.hits += 1
                kinds[e] = "device"
                continue
            choice = self.miss if self.miss != "auto" else self.cost.choose(
                per[e], self.expert_bytes, self._flops(per[e]), self.host_expert_bytes)
            self.stats.miss_choices[choice] += 1
            kinds[e] = "copy" if choice == "copy" else "cpu"
        base = None if shared is None else shared.native
        if uniq and self._native and (shared is None or base is not None) and \
                pairs is not None and x.shape[0] <= native.EXPERT_MAX_ROWS and \
                x.dtype == torch.bfloat16:
            return self._native_sum(layer, x, pairs, w, uniq, kinds, protect, base)
        routed = self._routed(layer, x, flat, pairs, w, uniq, kinds, per, protect) if uniq \
            else torch.zeros_like(x, dtype=torch.float32)
        return routed.to(x.dtype) if shared is None else shared(x) + routed.to(x.dtype)

    def _routed(self, layer: int, x: torch.Tensor, flat: torch.Tensor, pairs: list[int] | None,
                w: torch.Tensor, uniq: list[int], kinds: dict[int, str], per: list[int],
                protect: frozenset[Key]) -> torch.Tensor:
        """`compute`'s float32 routed sum [N, h] of the experts `uniq`."""
        k = w.shape[1]
        start = [0] * (len(per) + 1)
        for e, n in enumerate(per):
            start[e + 1] = start[e] + n
        order = _sort_pairs(flat, pairs)                                 # [N*k]
        rows = order // k                                                # [N*k] token rows
        wf = w.reshape(-1).index_select(0, order)                        # [N*k]
        stack = self.stacked.get(layer)
        if stack is not None and stack.wanted(x.shape[0], len(uniq)):
            self.stats.stacked += 1
            y = stack(x, flat.index_select(0, order), rows)              # [N*k, h]
        else:
            y = self._each_expert(layer, x, rows, uniq, kinds, start, protect)
            if len(uniq) < sum(1 for n in per if n):  # a shard: keep only its experts' pairs
                keep = torch.cat([torch.arange(start[e], start[e + 1])
                                  for e in uniq]).to(x.device)
                rows, wf = rows.index_select(0, keep), wf.index_select(0, keep)
        # index_put_ accumulates serially in index order, like the reference's index_add_,
        # without the OpenMP region CPU index_add_ opens (~0.3 ms from the scheduler thread)
        out = torch.zeros_like(x, dtype=torch.float32)                   # [N, h]
        return out.index_put_((rows,), y.float() * wf[:, None], accumulate=True)

    def _native_sum(self, layer: int, x: torch.Tensor, pairs: list[int], w: torch.Tensor,
                    uniq: list[int], kinds: dict[int, str], protect: frozenset[Key],
                    shared: native.SwiGLU | None) -> torch.Tensor:
        """`compute` for a few rows in one native call (`native.swiglu`): the shared expert,
        then the routed pairs in the same order (by expert, then row and slot), each expert's
        module where `kinds` says (on a CPU-only machine all are CPU memory)."""
        mlps = [] if shared is None else [shared]
        for e in uniq:
            key, kind = (layer, e), kinds[e]
            if kind == "cpu":
                self.stats.cpu_computed += 1
                module = self.on_host[key]
            else:
                module = self._device_mlp(key) if kind == "device" \
                    else self._copy_in(key, True, protect)
            mlps.append(module.native)
        base = [] if shared is None else [(0, r, 1.0) for r in range(x.shape[0])]
        slot = {e: len(mlps) - len(uniq) + i for i, e in enumerate(uniq)}   # after shared
        k, wf = w.shape[1], w.reshape(-1).tolist()
        terms = sorted((slot[e], i // k, wf[i]) for i, e in enumerate(pairs) if e in slot)
        return native.swiglu(x, mlps, base + terms, x.dtype, len(base))

    def _each_expert(self, layer: int, x: torch.Tensor, rows: torch.Tensor, uniq: list[int],
                     kinds: dict[int, str], start: list[int], protect: frozenset[Key]
                     ) -> torch.Tensor:
        """Each expert of `uniq` on its rows of x (`rows`, sorted by expert; expert e's are
        rows[start[e]:start[e+1]]) where `kinds` says: on the device, copied in, or on the
        CPU -> outputs [pairs, h] in that order."""
        dev = x.device
        xs = x.index_select(0, rows)                                     # [N*k, h]
        # activations for the CPU experts first (waits only for the attention side), then
        # the device experts are queued, then the CPU computes while the device works
        on_cpu = {e: xs[start[e]:start[e + 1]].to("cpu", self.host.dtype)
                  for e in uniq if kinds[e] == "cpu"}
        ys: dict[int, torch.Tensor] = {}
        for e in uniq:
            if kinds[e] != "cpu":
                mlp = self._device_mlp((layer, e)) if kinds[e] == "device" else \
                    self._copy_in((layer, e), True, protect)
                ys[e] = mlp(xs[start[e]:start[e + 1]])
        for e, xc in on_cpu.items():
            y = self.on_host[(layer, e)](xc)
            if dev.type != "cpu":
                self.stats.bytes_activations += 2 * xc.numel() * x.element_size()
                y = y.to(dev, x.dtype, non_blocking=True)
            self.stats.cpu_computed += 1
            ys[e] = y
        return ys[uniq[0]] if len(uniq) == 1 else torch.cat([ys[e] for e in uniq])


def _cloned(lin: Linear, backend: TorchBackend) -> Linear:
    """Same-memory 'copy' (CPU-only machines): a real memcpy of the stored parts."""
    return backend.linear(lin.scheme, {k: v.clone() for k, v in lin.parts.items()}, lin.shape)
