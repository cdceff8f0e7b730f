"""Opening a bundle, and what the torch builder (`builders.TorchBuilder`) reads from it and
the load options: the resident experts, a profile's expert counts, the routers an FFN rank
predicts with, the bandwidths the expert store's cost model reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from step3_edge.checkpoint import INDEX_NAME, CheckpointReader
from step3_edge.config import Step3Config
from step3_edge.errors import BundleError
from step3_edge.manifest import Manifest, load_manifest
from step3_edge.model import Step3MoE
from step3_edge.plan import Plan
from step3_edge.runtime.backends import TorchBackend
from step3_edge.runtime.cost_model import Bandwidths, measure_bandwidths
from step3_edge.runtime.expert_residency import Router
from step3_edge.runtime.ops import load_runtime_weights
from step3_edge.runtime.options import ExpertOptions
from step3_edge.runtime.planner import expert_order


def measure_with_threads(dev: torch.device, backend: TorchBackend, threads: int
                         ) -> Bandwidths:
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
    plan = manifest.plan
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
            moe = Step3MoE(t, experts=False)
        out[L] = load_runtime_weights(moe, f"model.layers.{L}.moe.", reader, backend).route
    return out
