"""One engine interface with two builders. An `EngineBuilder` builds a load's two model sides
on its backend: the attention side (`AttentionSide`) and the FFN side (`FFNSide`), which the
engines (`engine.Engine`, the AFD pipeline) and the scheduler drive without knowing what runs
them. `TorchBuilder` builds torch modules over the stored weights (engine.py, with the expert
store); `GraphBuilder` builds the workers that run the bundle's subgraphs in ONNX Runtime or
TensorRT (ort_backend.py). `make_builder` makes the backend a load's decisions name and picks
its builder: the one place that tells torch and graph backends apart. The single-process
runtime (`Step3Runtime.load`) and the AFD ranks (`afd_protocol.open_worker_bundle`) both build
through it, so that a worker in another process builds exactly what one process would."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol

import psutil
import torch

from step3_edge.checkpoint import CheckpointReader
from step3_edge.config import Step3Config
from step3_edge.errors import PlanError
from step3_edge.manifest import Manifest
from step3_edge.plan import Plan
from step3_edge.runtime.backends import TorchBackend, make_backend
from step3_edge.runtime.cost_model import Bandwidths
from step3_edge.runtime.decisions import LoadDecisions
from step3_edge.runtime.engine import AttentionWorker, FFNWorker, Shard
from step3_edge.runtime.expert_residency import Router
from step3_edge.runtime.expert_store import ExpertStore
from step3_edge.runtime.kv import KVPool, StepBatch, kv_bytes_per_token
from step3_edge.runtime.loading import (load_routers, measure_with_threads, read_counts,
                                        resident_set)
from step3_edge.runtime.options import ExpertOptions
from step3_edge.runtime.ort_backend import GraphBackend, OrtAttentionWorker, OrtFFNWorker
from step3_edge.runtime.planner import expert_order

Backend = TorchBackend | GraphBackend
RESERVE_BYTES = 2 << 30           # CUDA: left free for activations when capping residents
LayerOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class AttentionSide(Protocol):
    """Embeddings, every layer's attention side and router, final norm and lm_head, and the
    paged KV pool of its sequences."""

    cfg: Step3Config
    kv: KVPool

    @property
    def backend(self) -> Backend: ...

    @property
    def layers(self) -> Sequence[object]: ...

    def routers(self) -> dict[int, Any]:
        """layer -> its router (the FFN side's prefetch predictor), where the side has them."""

    def embed(self, ids: list[int], images: list | None = None) -> torch.Tensor:
        """One sequence's token embeddings [T, h] (image features in place)."""

    def embed_tokens(self, ids: list[int]) -> torch.Tensor:
        """Embeddings [len(ids), h] of plain tokens (decode steps)."""

    def layer(self, L: int, h: torch.Tensor, batch: StepBatch) -> LayerOut:
        """Residual h [N, h] -> (new residual, normed FFN input [N, h], top-k ids / weights
        [N, k] on MoE layers, else None)."""

    def logits(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm and lm_head on residual rows [S, h] -> float32 logits [S, vocab]."""

    def logits_buffer(self, rows: int) -> torch.Tensor:
        """A float32 [rows, vocab] buffer for `logits`."""


class FFNSide(Protocol):
    """Every layer's FFN side (or one shard's part): dense MLPs, shared and routed experts."""

    def layer(self, L: int, x: torch.Tensor, ids: torch.Tensor | None,
              w: torch.Tensor | None) -> torch.Tensor:
        """FFN output [N, h] for normed input x [N, h] (and top-k ids / weights on MoE
        layers)."""

    def begin_step(self) -> None: ...

    def expert_stats(self) -> dict[str, Any]: ...

    def reset_stats(self) -> None: ...

    def expert_counts(self) -> dict[int, list[int]]: ...

    def record_trace(self, on: bool) -> list | None: ...


class EngineBuilder(ABC):
    """Builds the two sides of a load on `backend`."""

    backend: Backend

    @property
    def limits(self) -> dict[str, int]:
        """The backend's engine bounds (`LoadDecisions.within`); none but TensorRT's."""
        return {}

    @abstractmethod
    def kv_host_dtype(self, kv_dtype: torch.dtype) -> torch.dtype | None:
        """The element type of the KV pool the attention side keeps in CPU memory for a
        pool of `kv_dtype`, or None where the pool is on a GPU."""

    @abstractmethod
    def build_attention(self, cfg: Step3Config, reader: CheckpointReader, kv_tokens: int,
                        kv_dtype: torch.dtype, vision: bool = True) -> AttentionSide:
        """The attention side with a KV pool of `kv_tokens` tokens."""

    @abstractmethod
    def build_ffn(self, cfg: Step3Config, reader: CheckpointReader, plan: Plan,
                  experts: ExpertOptions, bandwidths: Bandwidths | None = None,
                  threads: int | None = None, shard: Shard | None = None,
                  routers: dict[int, Router] | None = None) -> FFNSide:
        """The FFN side (all of it, or one shard), with its experts as the options ask;
        `bandwidths` None measures them (on a CPU at `threads` intra-op threads, if given);
        `routers` are the attention side's (else read for prefetch where it is used)."""

    def check_kv_memory(self, kv_tokens: int, kv_dtype: torch.dtype, cfg: Step3Config,
                        manifest: Manifest) -> None:
        """Refuse, before any weight is read, a KV pool in CPU memory that does not fit in the
        memory available now, beside the bundle's weights when they are computed on the CPU
        too (torch would fail to allocate it, or the kernel would kill the process while it is
        zeroed)."""
        pool_dtype = self.kv_host_dtype(kv_dtype)
        if pool_dtype is None:
            return
        per_token = kv_bytes_per_token(cfg.text_config, pool_dtype)
        weights = sum(a.bytes for a in manifest.artifacts if a.kind == "weights") \
            if self.backend.device.type == "cpu" else 0
        free = psutil.virtual_memory().available
        if kv_tokens * per_token + weights > free:
            fit = max(0, (free - weights) // per_token)
            raise PlanError(f"a KV pool of {kv_tokens:,} tokens needs "
                            f"{kv_tokens * per_token / 2**30:.2f} GiB beside "
                            f"{weights / 2**30:.2f} GiB of weights, but {free / 2**30:.2f} GiB "
                            "of CPU memory is available",
                            f"load with kv_tokens <= {fit:,}, or free memory" if fit >= 16 else
                            "free memory, or use a machine with more")


class TorchBuilder(EngineBuilder):
    """Torch modules over the stored weights (`AttentionWorker`, `FFNWorker` with its
    `ExpertStore`)."""

    def __init__(self, backend: TorchBackend) -> None:
        self.backend = backend

    def kv_host_dtype(self, kv_dtype: torch.dtype) -> torch.dtype | None:
        return kv_dtype if self.backend.device.type == "cpu" else None

    def build_attention(self, cfg: Step3Config, reader: CheckpointReader, kv_tokens: int,
                        kv_dtype: torch.dtype, vision: bool = True) -> AttentionWorker:
        return AttentionWorker(cfg, reader, self.backend, kv_tokens, kv_dtype, vision)

    def build_ffn(self, cfg: Step3Config, reader: CheckpointReader, plan: Plan,
                  experts: ExpertOptions, bandwidths: Bandwidths | None = None,
                  threads: int | None = None, shard: Shard | None = None,
                  routers: dict[int, Router] | None = None) -> FFNWorker:
        backend, dev = self.backend, self.backend.device
        counts = read_counts(experts.expert_counts)
        resident = resident_set(cfg, plan, experts, counts)
        if shard is not None:
            resident &= shard.experts
        if dev.type == "cuda" and experts.resident_experts is None and \
                experts.resident_fraction is None:        # one card holds what it can
            ffn_fixed = sum(d.weight_bytes.get("mlp", 0) +
                            d.weight_bytes.get("shared_expert", 0) for d in plan.device_plans)
            free = torch.cuda.mem_get_info(dev)[0] - RESERVE_BYTES - ffn_fixed
            cap = max(0, free // max(plan.expert_bytes, 1))
            if len(resident) > cap:
                order = [k for k in expert_order(cfg, counts)[0] if k in resident]
                resident = set(order[:cap])
        policy = experts.cache
        bw = bandwidths
        if bw is None and dev.type == "cpu" and threads:
            bw = measure_with_threads(dev, backend, threads)
        if routers is None:               # prefetch, and the trace's next-layer predictions
            routers = load_routers(cfg, reader, backend)
        prefetch = experts.prefetch if experts.prefetch is not None else \
            dev.type == "cuda" and policy != "static"
        store = ExpertStore(cfg.text_config, reader, backend, resident, policy=policy,
                            miss=experts.miss, prefetch=prefetch, bandwidths=bw,
                            routers=routers, owned=None if shard is None else set(shard.experts),
                            stacked=experts.stacked_experts)
        return FFNWorker(cfg, reader, backend, store, shard)


class GraphBuilder(EngineBuilder):
    """The bundle's subgraphs in ONNX Runtime or TensorRT (`OrtAttentionWorker`,
    `OrtFFNWorker`): float32 at the graph boundary, the KV pool in CPU memory, every expert
    resident (its session holds its weights)."""

    def __init__(self, backend: GraphBackend) -> None:
        self.backend = backend

    @property
    def limits(self) -> dict[str, int]:
        return self.backend.limits

    def kv_host_dtype(self, kv_dtype: torch.dtype) -> torch.dtype | None:
        return torch.float32

    def build_attention(self, cfg: Step3Config, reader: CheckpointReader, kv_tokens: int,
                        kv_dtype: torch.dtype, vision: bool = True) -> OrtAttentionWorker:
        return OrtAttentionWorker(cfg, self.backend, kv_tokens, vision)

    def build_ffn(self, cfg: Step3Config, reader: CheckpointReader, plan: Plan,
                  experts: ExpertOptions, bandwidths: Bandwidths | None = None,
                  threads: int | None = None, shard: Shard | None = None,
                  routers: dict[int, Router] | None = None) -> OrtFFNWorker:
        return OrtFFNWorker(cfg, self.backend, shard)


def make_builder(d: LoadDecisions, manifest: Manifest, device: str | None = None
                 ) -> EngineBuilder:
    """The backend `d` names, on `device` (default: `d.device`), and its builder."""
    o = d.options
    backend = make_backend(d.backend, device or d.device, d.dtype, manifest=manifest,
                           threads=o.ort_threads, native_kernels=o.native_kernels,
                           dtype_reason=d.dtype_reason)
    if isinstance(backend, TorchBackend):
        return TorchBuilder(backend)
    return GraphBuilder(backend)
