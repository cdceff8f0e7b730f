"""Building the two sides of the runtime from a bundle and the load options, shared by the
single-process runtime (`Step3Runtime.load`) and the AFD FFN ranks (`afd_ffn.serve`), so that a
worker in another process builds exactly what the one-process engine would."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psutil
import torch

from step3_edge.checkpoint import INDEX_NAME, CheckpointReader
from step3_edge.config import Step3Config
from step3_edge.errors import BundleError, PlanError
from step3_edge.manifest import Manifest, load_manifest
from step3_edge.model import Step3MoE
from step3_edge.runtime.backends import TorchBackend, resolve_dtype
from step3_edge.runtime.engine import AttentionWorker, FFNWorker, Shard
from step3_edge.runtime.cost_model import Bandwidths, measure_bandwidths
from step3_edge.runtime.expert_store import ExpertStore, Router, read_linear
from step3_edge.runtime.decisions import GRAPH_BACKENDS
from step3_edge.runtime.kv import kv_bytes_per_token
from step3_edge.runtime.options import ExpertOptions
from step3_edge.runtime.planner import Plan, expert_order

RESERVE_BYTES = 2 << 30           # CUDA: left free for activations when capping residents


def measure_with_threads(dev: torch.device, backend: Any, threads: int) -> Bandwidths:
    """`measure_bandwidths` at the engine thread's intra-op count (`threads`): a CPU's copy
    rate, which the cost model (and the stacked experts' choice) reads, grows with the
    threads that copy."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return measure_bandwidths(dev, backend.dtype, backend=backend)
    finally:
        torch.set_num_threads(before)


def open_bundle(bundle: str | Path, verify: bool = False
                ) -> tuple[Manifest, Plan, Step3Config, CheckpointReader]:
    """Manifest, plan, config and a checked weight reader of `bundle` (only files the manifest
    names are read)."""
    bundle = Path(bundle)
    manifest = load_manifest(bundle, verify=verify)
    plan = Plan.from_dict(manifest.plan)
    manifest.path("config.json")
    index = manifest.path(INDEX_NAME)
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        manifest.path(shard)                         # only files the manifest names
    cfg = Step3Config.from_pretrained(bundle)
    t = cfg.text_config
    if tuple(plan.moe_layers) != tuple(t.moe_layers) or plan.num_experts != t.moe_num_experts:
        raise BundleError("the bundle's plan does not match its config.json (MoE layers "
                          "or experts differ)", "re-export the bundle")
    reader = CheckpointReader(bundle, cfg)
    reader.check()
    return manifest, plan, cfg, reader


def check_kv_memory(kv_tokens: int, kv_dtype: torch.dtype, cfg: Step3Config, backend: Any,
                    manifest: Manifest) -> None:
    """Refuse, before any weight is read, a KV pool in CPU memory that does not fit in the
    memory available now, beside the bundle's weights when they are computed on the CPU too
    (torch would fail to allocate it, or the kernel would kill the process while it is
    zeroed). The graph backends keep a float32 pool in host memory (`build_attention`)."""
    graphs = backend.name in GRAPH_BACKENDS
    if not graphs and backend.device.type != "cpu":
        return
    per_token = kv_bytes_per_token(cfg.text_config, torch.float32 if graphs else kv_dtype)
    weights = sum(a.bytes for a in manifest.artifacts if a.kind == "weights") \
        if backend.device.type == "cpu" else 0
    free = psutil.virtual_memory().available
    if kv_tokens * per_token + weights > free:
        fit = max(0, (free - weights) // per_token)
        raise PlanError(f"a KV pool of {kv_tokens:,} tokens needs "
                        f"{kv_tokens * per_token / 2**30:.2f} GiB beside "
                        f"{weights / 2**30:.2f} GiB of weights, but {free / 2**30:.2f} GiB of "
                        "CPU memory is available",
                        f"load with kv_tokens <= {fit:,}, or free memory" if fit >= 16 else
                        "free memory, or use a machine with more")


def resident_set(cfg: Step3Config, plan: Plan, experts: ExpertOptions,
                 counts: dict[int, list[int]] | None) -> set[tuple[int, int]]:
    """The routed experts to keep on the device: the plan's hot set, or `resident_experts`
    (a count) / `resident_fraction` of them chosen by the profile `counts` (else the plan's
    hot experts first)."""
    t = cfg.text_config
    keys = [(L, e) for L in t.moe_layers for e in range(t.moe_num_experts)]
    hot = {k for k in keys if plan.expert_location(*k) != "cpu"}
    count, fraction = experts.resident_experts, experts.resident_fraction
    if count is None and fraction is None and counts is None:
        return hot
    n = count if count is not None else (len(hot) if fraction is None
                                         else round(fraction * len(keys)))
    assert 0 <= n <= len(keys), n          # options and `decide` checked the range
    order, _ = expert_order(cfg, counts)
    if counts is None:                    # the plan's hot experts first
        order = sorted(order, key=lambda k: k not in hot)
    return set(order[:n])


def read_counts(value: Any) -> dict[int, list[int]] | None:
    """Expert counts from a profile JSON path or a {layer: [count per expert]} dict."""
    if value is None or isinstance(value, dict):
        return value if value is None else {int(k): list(v) for k, v in
                                            value.get("expert_counts", value).items()}
    from step3_edge.runtime.plan_cli import read_counts as read_file

    return read_file(str(value))


def load_routers(cfg: Step3Config, reader: CheckpointReader, backend: TorchBackend
                 ) -> dict[int, Router]:
    """layer -> the reference router of each MoE layer (an FFN rank's prefetch predictor;
    in one process the attention side's routers are shared instead)."""
    t = cfg.text_config
    out: dict[int, Router] = {}
    for L in t.moe_layers:
        with torch.device("meta"):
            moe = Step3MoE(t)
        moe.gate = read_linear(reader, backend, f"model.layers.{L}.moe.gate.weight")
        out[L] = moe.route
    return out


def build_attention(cfg: Step3Config, reader: CheckpointReader, backend: Any,
                    kv_tokens: int, kv_dtype: torch.dtype, vision: bool = True) -> Any:
    """The attention side (torch modules, or the bundle's subgraphs in ONNX Runtime /
    TensorRT)."""
    if backend.name in GRAPH_BACKENDS:
        from step3_edge.runtime.ort_backend import OrtAttentionWorker

        return OrtAttentionWorker(cfg, backend, kv_tokens, vision)
    return AttentionWorker(cfg, reader, backend, kv_tokens, kv_dtype, vision)


def build_ffn(cfg: Step3Config, reader: CheckpointReader, plan: Plan, backend: TorchBackend,
              experts: ExpertOptions, bandwidths: Bandwidths | None = None,
              threads: int | None = None, shard: Shard | None = None,
              routers: dict[int, Router] | None = None) -> FFNWorker:
    """The FFN side (all of it, or one shard) with its expert store, as the expert options
    ask; `bandwidths` None measures them (on a CPU at `threads` intra-op threads, if given)."""
    if backend.name in GRAPH_BACKENDS:
        from step3_edge.runtime.ort_backend import OrtFFNWorker

        return OrtFFNWorker(cfg, backend, shard)
    t = cfg.text_config
    dev = backend.device
    counts = read_counts(experts.expert_counts)
    resident = resident_set(cfg, plan, experts, counts)
    if shard is not None:
        resident &= shard.experts
    if dev.type == "cuda" and experts.resident_experts is None and \
            experts.resident_fraction is None:        # one card holds what it can
        ffn_fixed = sum(d.weight_bytes.get("mlp", 0) + d.weight_bytes.get("shared_expert", 0)
                        for d in plan.device_plans)
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
    store = ExpertStore(t, reader, backend, resident, policy=policy, miss=experts.miss,
                        prefetch=prefetch, bandwidths=bw, routers=routers,
                        owned=None if shard is None else set(shard.experts),
                        stacked=experts.stacked_experts)
    return FFNWorker(cfg, reader, backend, store, shard)
