"""`export_bundle`: checkpoint -> engine bundle for one target and device count.

Quantize for the target (the quantize stage's converter and recipe) -> plan placement (the
runtime planner) -> lay the weights out per device -> export every subgraph to ONNX ->
validate each against the reference -> TensorRT engines where possible -> manifest.json with
every artifact's sha256. All of it is written to `.BUNDLE.partial` and renamed into place only
when complete (docs/bundle.md).
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import psutil
from tqdm import tqdm

from step3_edge.checkpoint import INDEX_NAME, SINGLE_NAME, CheckpointReader
from step3_edge.config import Step3Config
from step3_edge.errors import CheckpointError
from step3_edge.export.binding import plan_bindings, precision_of, signature
from step3_edge.export.onnx_export import OPSET, apply_bindings, export_base, save
from step3_edge.export.subgraphs import REGISTRY, Instance
from step3_edge.export.weights import EXPERTS_DIR, readers_of, write_weights
from step3_edge.fsutil import staged_dir
from step3_edge.manifest import (Artifact, DeviceEntry, Engines, ExportInfo, Manifest,
                                 OnnxSettings, Source, Subgraph, TrtInfo, Validation,
                                 WeightsInfo, bundle_owned, write_manifest)
from step3_edge.plan import Plan
from step3_edge.quantize.convert import convert_checkpoint, side_files
from step3_edge.quantize.recipe import build_recipe
from step3_edge.runtime.planner import plan_placement
from step3_edge.targets import Target, get_target

ATTN_KINDS = ("embed", "attn_dense", "attn_moe", "lm_head")


def export_bundle(model_dir: str | Path, target: str | Target, devices: int, out: str | Path,
                  *, cpu_mem_bytes: int | None = None, scheme: str | None = None,
                  attn_scheme: str | None = None, kv_tokens: int | None = None,
                  onnx: bool = True, validate: bool = True, trt: bool = True,
                  overwrite: bool = False, progress: bool = True,
                  validate_all: bool = False) -> Path:
    """Export checkpoint `model_dir` for `devices` cards of `target` into bundle `out`.

    `scheme` / `attn_scheme` override the target's weight schemes (e.g. "bf16" keeps the
    weights unquantized: an fp32 ONNX bundle). `cpu_mem_bytes` bounds the cold experts kept in
    CPU memory (default: the memory available now). Validation checks the first and last
    instance of every graph file (`validate_all`: every layer and expert)."""
    t0 = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out)
    tgt = get_target(target) if isinstance(target, str) else target
    src = CheckpointReader(model_dir)
    src.check()
    side_src = side_files(model_dir)             # tokenizer files checked before any weight
    if not any(n == "tokenizer.json" for n, _ in side_src):
        raise CheckpointError(f"{model_dir} has no tokenizer.json",
                              "copy the tokenizer files of the checkpoint into the folder")
    cfg = src.cfg
    recipe = build_recipe(tgt, scheme, attn_scheme)
    modules = recipe.resolve(src.expected.values())
    cpu_mem = cpu_mem_bytes if cpu_mem_bytes is not None else \
        psutil.virtual_memory().available
    expert_scheme = scheme or tgt.default_scheme
    plan = plan_placement(cfg, tgt, devices, cpu_mem_bytes=cpu_mem, scheme=expert_scheme,
                          attn_scheme=attn_scheme or expert_scheme,
                          kv_tokens=kv_tokens)
    src_qc = cfg.quantization_config or {}
    with staged_dir(out, overwrite, bundle_owned, [model_dir]) as tmp:
        if src_qc.get("quant_method") == "step3_edge" and src_qc.get("modules") == modules:
            qdir = model_dir                     # already quantized with this recipe
        else:
            qdir = tmp / ".quantized"
            convert_checkpoint(model_dir, qdir, tgt, recipe, progress=progress)
        qcfg = Step3Config.from_pretrained(qdir)
        weight_map, wfiles = write_weights(qdir, tmp, qcfg, plan)
        qcfg.save(tmp)
        side = _copy_side_files(side_src, tmp)
        if qdir != model_dir:
            shutil.rmtree(qdir)
        reader = CheckpointReader(tmp, qcfg)
        subgraphs = _export_subgraphs(qcfg, reader, tmp, tgt, plan, validate, validate_all,
                                      progress) if onnx else {}
        trt_info = TrtInfo(False, "not requested")
        trt_files: list[tuple[str, int, dict]] = []
        if onnx and trt and tgt.is_gpu:
            from step3_edge.export.trt import build_bundle_engines

            trt_info, trt_files = build_bundle_engines(tmp, subgraphs, reader, qcfg, tgt)
        elif onnx and tgt.is_gpu and not trt:
            trt_info = TrtInfo(False, "--no-trt")
        elif not tgt.is_gpu:
            trt_info = TrtInfo(False, "cpu target: ONNX Runtime runs the graphs")
        arts = [Artifact.of(tmp, "config.json", "config")]
        arts.append(Artifact.of(tmp, INDEX_NAME, "config"))
        arts += [Artifact.of(tmp, rel, kind) for rel, kind in side]
        for f in wfiles:
            arts.append(Artifact(f.path, "weights", *_hash(tmp / f.path), f.owner,
                                 {"tensors": f.tensors,
                                  "devices": readers_of(f.path.split("/")[0], plan)}))
        for name, sg in subgraphs.items():
            arts.append(Artifact.of(tmp, sg.file, "onnx", None, subgraph=name,
                                    precision=sg.precision, devices=list(sg.devices)))
        arts += [Artifact.of(tmp, rel, "trt", dev, **meta) for rel, dev, meta in trt_files]
        src_format = {None: "bf16", "fp8": "block-fp8"}.get(src_qc.get("quant_method"),
                                                            src_qc.get("quant_method"))
        write_manifest(Manifest(
            tmp, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            step3_edge_version=_version(),
            source=Source(str(model_dir.resolve()), src_format,
                          _hash(model_dir / "config.json")[0]),
            config=qcfg, target=tgt, plan=plan,
            weights=WeightsInfo(INDEX_NAME, recipe.to_json(), _count(modules),
                                sum(f.bytes for f in wfiles), EXPERTS_DIR),
            devices=_device_table(plan, wfiles, subgraphs), subgraphs=subgraphs,
            engines=Engines(OnnxSettings(OPSET, _flavour(tgt), "float32") if onnx else None,
                            trt_info),
            export=ExportInfo(round(time.perf_counter() - t0, 2), bool(onnx and validate),
                              validate_all),
            artifacts=tuple(arts)))
    return out


def _flavour(tgt: Target) -> str:
    return "gpu" if tgt.is_gpu else "cpu"


def _export_subgraphs(cfg: Step3Config, reader: CheckpointReader, tmp: Path, tgt: Target,
                      plan: Plan, validate: bool, validate_all: bool, progress: bool
                      ) -> dict[str, Subgraph]:
    from step3_edge.export.validate import TOLERANCES, validate_subgraph

    modules = (cfg.quantization_config or {}).get("modules", {})
    out: dict[str, Subgraph] = {}
    kinds = [d for d in REGISTRY.values() if d.instances(cfg)]
    for decl in tqdm(kinds, desc="export subgraphs", unit="graph", disable=not progress):
        groups: dict[tuple, list[Instance]] = {}
        plans = {}
        for inst in decl.instances(cfg):
            b = plan_bindings(decl, cfg, modules, inst, _flavour(tgt))
            groups.setdefault(signature(b), []).append(inst)
            plans.setdefault(signature(b), b)
        base = export_base(decl, cfg)
        for j, (sig, insts) in enumerate(groups.items()):
            name = decl.kind if len(groups) == 1 else f"{decl.kind}.{j}"
            bindings = plans[sig]
            model = apply_bindings(base, bindings)
            rel = f"onnx/{name}.onnx"
            save(model, tmp / rel)
            precision = precision_of(bindings)
            checked = insts if validate_all else list(dict.fromkeys([insts[0], insts[-1]]))
            result = validate_subgraph(name, decl, cfg, tmp / rel, bindings, reader, checked,
                                       precision) if validate else None
            out[name] = Subgraph(
                rel, decl.kind, decl.doc, tuple((i.layer, i.expert) for i in insts),
                decl.inputs(cfg), decl.outputs(cfg), precision, _flavour(tgt), OPSET,
                asdict(TOLERANCES[precision]),
                Validation.from_dict(result.to_dict()) if result else None,
                tuple(b.to_dict() for b in bindings), subgraph_devices(decl.kind, plan))
    return out


def subgraph_devices(kind: str, plan: Plan) -> tuple[int | str, ...]:
    """Devices that run a subgraph kind under the plan ("cpu": cold experts)."""
    devs = plan.device_plans
    attn = plan.attention_devices
    if kind in ATTN_KINDS:
        return attn
    if kind.startswith("vision"):
        return attn[:1]
    if kind == "dense_mlp":
        return tuple(d.index for d in devs if d.dense_layers)
    if kind == "shared_expert":
        return tuple(d.index for d in devs if d.shared_expert_layers)
    return tuple(d.index for d in devs if d.hot_experts) + (("cpu",) if plan.cold_experts
                                                             else ())


def _device_table(plan: Plan, wfiles: list, subgraphs: dict[str, Subgraph]
                  ) -> tuple[DeviceEntry, ...]:
    table = []
    for d in plan.device_plans:
        reads = tuple(f.path for f in wfiles
                      if d.index in readers_of(f.path.split("/")[0], plan))
        runs = tuple(n for n, sg in subgraphs.items() if d.index in sg.devices)
        table.append(DeviceEntry(d.index, d.role, reads, runs, len(d.hot_experts)))
    if plan.cold_experts:
        table.append(DeviceEntry(
            "cpu", "cold experts", tuple(f.path for f in wfiles
                                         if f.path.startswith(EXPERTS_DIR)),
            tuple(n for n, sg in subgraphs.items() if "cpu" in sg.devices), 0,
            len(plan.cold_experts)))
    return tuple(table)


def _copy_side_files(side: list[tuple[str, Path]], dst: Path) -> list[tuple[str, str]]:
    """Copy the checked tokenizer, processor and generation files (`side_files`)."""
    out = []
    for name, path in side:
        shutil.copyfile(path, dst / name)
        out.append((name, "tokenizer" if name.startswith("tokenizer") else "config"))
    return out


def _hash(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest(), path.stat().st_size


def _count(modules: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in modules.values():
        out[s] = out.get(s, 0) + 1
    return out


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("step3-edge")
    except PackageNotFoundError:
        return "unknown"
