"""Quantized weights laid out per device, as the plan says.

Every tensor is stored once, under HF names and in the quantize stage's stored form, in the
folder of the device that owns it; the root `model.safetensors.index.json` maps every name to
its file, so `CheckpointReader(bundle)` reads the bundle like a checkpoint.

- attention side (attention projections, norms, routers, embed_tokens, lm_head, final norm)
  and the vision tower: `device-<a>/`, a = the first attention device (the other attention
  devices hold replicas: the manifest lists the files each device reads);
- dense MLP of layer L / shared expert of layer L: `device-<f>/` of the FFN device the plan
  gives that layer;
- routed experts: `experts/`, one stacked [E, out, in] tensor per projection and layer (the
  checkpoint layout). The plan says which device holds each (layer, expert) hot and which
  stay cold in CPU memory; one expert is read alone with `CheckpointReader.read_parts(name,
  expert=e)` (a memory-mapped slice).
Shards are written streaming (`ShardWriter`): header first, then each tensor in slices of one
expert or a block of rows, so memory stays bounded by a slice, not a tensor.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from step3_edge.checkpoint import INDEX_NAME, CheckpointReader, check_values
from step3_edge.config import Step3Config
from step3_edge.layout import expected_weights, layer_of
from step3_edge.plan import Plan
from step3_edge.quantize.schemes import get_scheme
from step3_edge.shard_writer import ST_CODES, ShardWriter

SHARD_BYTES = 2 << 30
CHUNK_BYTES = 64 << 20
EXPERTS_DIR = "experts"


@dataclass
class WeightFile:
    path: str                                   # relative to the bundle
    owner: int | None                           # device that owns it (None: experts/)
    tensors: dict[str, dict] = field(default_factory=dict)   # stored name -> dtype, shape
    bytes: int = 0


def owner_folder(name: str, role: str, plan: Plan) -> str:
    """Folder of one checkpoint tensor under the plan."""
    if role == "experts":
        return EXPERTS_DIR
    devs = plan.device_plans
    if len(devs) == 1:
        return "device-0"
    layer = layer_of(name)
    for d in devs:
        if role == "mlp" and layer in d.dense_layers or \
                role == "shared_expert" and layer in d.shared_expert_layers:
            return f"device-{d.index}"
    return f"device-{min(plan.attention_devices)}"


def readers_of(folder: str, plan: Plan) -> list[int | str]:
    """Devices that load tensors from `folder` ("cpu" for cold experts)."""
    devs = plan.device_plans
    if folder == EXPERTS_DIR:
        hot: list[int | str] = [d.index for d in devs if d.hot_experts]
        return hot + (["cpu"] if plan.cold_experts else [])
    idx = int(folder.split("-")[1])
    role = next(d.role for d in devs if d.index == idx)
    if role == "attention":
        return [d.index for d in devs if d.role == "attention"]
    return [idx]


class _Source:
    """Stored tensors of a checkpoint folder, readable in slices (memory-mapped), through the
    checkpoint reader (index validated, every file confined to the folder)."""

    def __init__(self, folder: Path, cfg: Step3Config) -> None:
        self.reader = CheckpointReader(folder, cfg)

    def slice(self, name: str):
        return self.reader.get_slice(name)


def write_weights(src_dir: Path, out: Path, cfg: Step3Config, plan: Plan,
                  shard_bytes: int = SHARD_BYTES) -> tuple[dict[str, str], list[WeightFile]]:
    """Copy the stored tensors of quantized checkpoint `src_dir` into per-device folders
    of bundle `out`; write the root index. Returns (weight_map, files)."""
    src = _Source(src_dir, cfg)
    qc = cfg.quantization_config or {}
    modules = qc.get("modules", {}) if qc.get("quant_method") == "step3_edge" else {}
    groups: dict[str, list[str]] = {}
    for spec in expected_weights(cfg).values():
        scheme = get_scheme(modules.get(spec.name, "bf16"))
        for stored in [spec.name + s for s in ("",) + scheme.suffixes]:
            groups.setdefault(owner_folder(spec.name, spec.role, plan), []).append(stored)
    weight_map: dict[str, str] = {}
    files: list[WeightFile] = []
    for folder in sorted(groups):
        shard: list[str] = []
        size, first = 0, len(files)
        for stored in groups[folder]:
            nb = math.prod(src.reader.stored_shape(stored)) * \
                src.reader.stored_dtype(stored).itemsize
            if shard and size + nb > shard_bytes:
                files.append(_write_shard(src, out, folder, len(files) - first + 1, shard))
                shard, size = [], 0
            shard.append(stored)
            size += nb
        if shard:
            files.append(_write_shard(src, out, folder, len(files) - first + 1, shard))
    for f in files:
        owner = f.path.split("/")[0]
        f.owner = None if owner == EXPERTS_DIR else int(owner.split("-")[1])
        weight_map.update({n: f.path for n in f.tensors})
    total = sum(f.bytes for f in files)
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total},
                                              "weight_map": weight_map}, indent=2) + "\n")
    return weight_map, files


def _write_shard(src: _Source, out: Path, folder: str, i: int, names: list[str]) -> WeightFile:
    rel = f"{folder}/weights-{i:05d}.safetensors"
    wf = WeightFile(rel, None)
    entries = []
    for n in names:
        shape, dtype = src.reader.stored_shape(n), src.reader.stored_dtype(n)
        entries.append((n, dtype, shape))
        wf.tensors[n] = {"dtype": ST_CODES[dtype], "shape": list(shape)}
    (out / folder).mkdir(parents=True, exist_ok=True)
    with ShardWriter(out / rel, entries) as shard:
        for n, dtype, shape in entries:
            sl = src.slice(n)
            scale = n.endswith(("_scale", "_scale_inv"))
            if not shape:
                t = sl[:]
                check_values(n, t, scale)
                shard.write(n, 0, t)
                continue
            row = math.prod(shape[1:]) * dtype.itemsize
            step = max(1, CHUNK_BYTES // max(row, 1))
            for a in range(0, shape[0], step):
                t = sl[a:a + step]
                check_values(n, t, scale)                     # the chunk in memory
                shard.write(n, a * row, t)
    wf.bytes = (out / rel).stat().st_size
    return wf
