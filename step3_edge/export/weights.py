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
Shards are written streaming: header first, then each tensor in slices of one expert or a
block of rows, so memory stays bounded by a slice, not a tensor.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from step3_edge.checkpoint import INDEX_NAME, CheckpointReader, check_values
from step3_edge.config import Step3Config
from step3_edge.layout import expected_weights, layer_of
from step3_edge.quantize.schemes import get_scheme

SHARD_BYTES = 2 << 30
CHUNK_BYTES = 64 << 20
_CODES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32",
          torch.float8_e4m3fn: "F8_E4M3", torch.int8: "I8", torch.uint8: "U8"}
EXPERTS_DIR = "experts"


@dataclass
class WeightFile:
    path: str                                   # relative to the bundle
    owner: int | None                           # device that owns it (None: experts/)
    tensors: dict[str, dict] = field(default_factory=dict)   # stored name -> dtype, shape
    bytes: int = 0


def owner_folder(name: str, role: str, plan: dict) -> str:
    """Folder of one checkpoint tensor under the plan (Plan.to_dict())."""
    if role == "experts":
        return EXPERTS_DIR
    devs = plan["device_plans"]
    if len(devs) == 1:
        return "device-0"
    layer = layer_of(name)
    for d in devs:
        if role == "mlp" and layer in d["dense_layers"] or \
                role == "shared_expert" and layer in d["shared_expert_layers"]:
            return f"device-{d['index']}"
    first_attn = min(d["index"] for d in devs if d["role"] in ("attention", "both"))
    return f"device-{first_attn}"


def readers_of(folder: str, plan: dict) -> list[int | str]:
    """Devices that load tensors from `folder` ("cpu" for cold experts)."""
    devs = plan["device_plans"]
    if folder == EXPERTS_DIR:
        hot = [d["index"] for d in devs if d["hot_experts"]]
        return hot + (["cpu"] if plan["cold_experts"] else [])
    idx = int(folder.split("-")[1])
    role = next(d["role"] for d in devs if d["index"] == idx)
    if role == "attention":
        return [d["index"] for d in devs if d["role"] == "attention"]
    return [idx]


class _Source:
    """Stored tensors of a checkpoint folder, readable in slices (memory-mapped), through the
    checkpoint reader (index validated, every file confined to the folder)."""

    def __init__(self, folder: Path, cfg: Step3Config) -> None:
        self.reader = CheckpointReader(folder, cfg)

    def slice(self, name: str):
        return self.reader.get_slice(name)


def write_weights(src_dir: Path, out: Path, cfg: Step3Config, plan: dict,
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
            sl = src.slice(stored)
            nb = math.prod(sl.get_shape()) * _itemsize(sl.get_dtype())
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


def _itemsize(code: str) -> int:
    return {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "I8": 1, "U8": 1}[code]


def _write_shard(src: _Source, out: Path, folder: str, i: int, names: list[str]) -> WeightFile:
    rel = f"{folder}/weights-{i:05d}.safetensors"
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    pos = 0
    wf = WeightFile(rel, None)
    for n in names:
        sl = src.slice(n)
        shape, code = list(sl.get_shape()), sl.get_dtype()
        nb = math.prod(shape) * _itemsize(code)
        header[n] = {"dtype": code, "shape": shape, "data_offsets": [pos, pos + nb]}
        wf.tensors[n] = {"dtype": code, "shape": shape}
        pos += nb
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    (out / folder).mkdir(parents=True, exist_ok=True)
    with open(out / rel, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for n in names:
            sl = src.slice(n)
            shape = sl.get_shape()
            scale = n.endswith(("_scale", "_scale_inv"))
            if not shape:
                t = sl[:]
                check_values(n, t, scale)
                f.write(_bytes(t))
                continue
            row = math.prod(shape[1:]) * _itemsize(sl.get_dtype())
            step = max(1, CHUNK_BYTES // max(row, 1))
            for a in range(0, shape[0], step):
                t = sl[a:a + step]
                check_values(n, t, scale)                     # the chunk in memory
                f.write(_bytes(t))
    wf.bytes = (out / rel).stat().st_size
    assert wf.bytes == 8 + len(raw) + pos, f"{rel}: wrote {wf.bytes}, expected {8 + len(raw) + pos}"
    return wf


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
