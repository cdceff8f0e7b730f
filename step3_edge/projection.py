"""Time of the offline stages and of the runtime load for any config, projected from costs
measured on real-width slices of Step3 (`bench/bench_scale.py` fits them and writes
`assets/scale-costs.json`: fixed seconds, seconds per MoE layer without its experts, per routed
expert, per dense layer and per ViT layer of each stage, and load seconds per bundle GB).

The projection is linear in the layer and expert counts, which is what the stages are: each
streams one tensor at a time and validates the first and last instance of each graph, except
the vision graph, validated whole (its cost grows with the ViT's depth).
"""

from __future__ import annotations

import json
from pathlib import Path

from step3_edge.config import Step3Config

COSTS = Path(__file__).parent / "assets" / "scale-costs.json"
STAGES = ("synth", "quantize", "export")


def measured_costs(path: Path = COSTS) -> dict | None:
    """The shipped (or given) cost table, None where there is none or it is unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and all(s in data for s in STAGES) else None


def project_stages(cfg: Step3Config, costs: dict) -> dict[str, float]:
    """Seconds per stage for `cfg` on the host the costs were measured on, and the export's
    seconds per MoE layer."""
    t = cfg.text_config
    n_moe, n_dense = len(t.moe_layers), t.num_hidden_layers - len(t.moe_layers)
    vit = cfg.vision_config.num_hidden_layers
    out = {}
    for stage in STAGES:
        c = costs[stage]
        out[f"{stage}_s"] = (c["fixed_s"] + n_moe * (c["per_moe_layer_s"] + t.moe_num_experts
                                                     * c["per_expert_s"])
                             + n_dense * c["per_dense_layer_s"] + vit * c["per_vit_layer_s"])
    out["export_per_moe_layer_s"] = (costs["export"]["per_moe_layer_s"]
                                     + t.moe_num_experts * costs["export"]["per_expert_s"])
    return out


def project_load(bundle_bytes: int, costs: dict) -> float:
    """Seconds of `Step3Runtime.load` for a bundle of `bundle_bytes` (files in the page cache,
    as measured; add the disk's read time on a cold start)."""
    return bundle_bytes / 1e9 * costs["load"]["s_per_bundle_GB"]


def describe(cfg: Step3Config, bundle_bytes: int, host_bytes: int,
             costs: dict | None) -> list[str]:
    """Lines for `step3-edge plan`: projected export and load time (from `costs`, e.g.
    `measured_costs()`), host memory."""
    if costs is None:
        return ["projection: no measured costs (run bench/bench_scale.py on this host)"]
    p = project_stages(cfg, costs)
    h = costs.get("host", {})
    where = f"{h.get('cpu', '?')}, {h.get('cores', '?')} cores"
    return [f"projected from real-width slices measured on {where} "
            "(bench/bench_scale.py; compute-bound parts shrink with more cores):",
            f"  export {p['export_s'] / 3600:.1f} h ({p['export_per_moe_layer_s'] / 60:.1f} min "
            f"per MoE layer; quantize alone {p['quantize_s'] / 3600:.1f} h)",
            f"  runtime load {project_load(bundle_bytes, costs) / 60:.1f} min for "
            f"{bundle_bytes / 1e9:.0f} GB of bundle (from the page cache)",
            f"  host memory {host_bytes / 2**30:.1f} GiB (cold experts, and for the cpu "
            "target every weight and the KV cache)"]
