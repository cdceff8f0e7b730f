"""TensorRT engines for a bundle's subgraphs (the real `tensorrt` Python API, imported lazily).

One engine per subgraph, written to `device-<d>/trt/<subgraph>.plan` for every device that
runs it. Engines are built refittable and weight-stripped (`REFIT` + `STRIP_PLAN`) from the
ONNX graph with its first instance's weights, so one small plan serves every layer: the
runtime deserializes it once per layer / expert and refits it with that instance's weights
(`refit_engine`, the same arrays `binding.bind` gives ONNX Runtime). Precision follows the
target: FP8 allowed on sm89+ (fp8 tensor cores), INT8 below, FP16 for everything else; the
graphs carry explicit (weight) DequantizeLinear, so TensorRT takes the quantized types from
them. Two optimisation profiles per engine: prefill (many tokens) and decode (one token per
sequence, up to `max_batch` sequences).

Without `tensorrt` or without a GPU, `build_bundle_engines` prints one line and the bundle
ships the ONNX subgraphs, which ONNX Runtime's CUDA / TensorRT providers also run.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from step3_edge.checkpoint import CheckpointReader
from step3_edge.config import Step3Config
from step3_edge.errors import MissingExtraError
from step3_edge.export.binding import FLOAT8E4M3FN, WeightBinding, bind
from step3_edge.export.subgraphs import Instance
from step3_edge.manifest import GraphIO, Subgraph, TrtInfo
from step3_edge.targets import Target
from step3_edge.vision import CROPS_PER_CALL


@dataclass(frozen=True)
class TrtShapes:
    """Bounds of the optimisation profiles."""

    max_batch: int = 16
    prefill_tokens: int = 512        # opt sequence length of the prefill profile
    max_prefill: int = 4096
    max_context: int = 8192
    max_crops: int = CROPS_PER_CALL  # the runtime runs an image's crops in calls of this many


def import_tensorrt() -> ModuleType:
    """`tensorrt`, or MissingExtraError naming the extra."""
    try:
        import tensorrt
    except ImportError:
        raise MissingExtraError("tensorrt", "trt", "building TensorRT engines") from None
    return tensorrt


def gpu_capability() -> tuple[int, int] | None:
    """Compute capability of the first visible CUDA GPU, or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(0)


def profiles(inputs: Sequence[GraphIO], shapes: TrtShapes, cfg: Step3Config
             ) -> list[dict[str, tuple[tuple[int, ...], ...]]]:
    """(min, opt, max) per input for the prefill and the decode profile."""
    s = shapes
    k = cfg.text_config.moe_top_k
    ranges = {  # axis -> (prefill min/opt/max, decode min/opt/max)
        "batch": ((1, 1, s.max_batch), (1, s.max_batch, s.max_batch)),
        "seq": ((1, s.prefill_tokens, s.max_prefill), (1, 1, 1)),
        "past": ((0, 0, s.max_context - 1), (0, s.max_context // 2, s.max_context - 1)),
        "total": ((1, s.prefill_tokens, s.max_context), (1, s.max_context // 2,
                                                         s.max_context)),
        "tokens": ((1, s.prefill_tokens, s.max_batch * s.max_prefill),
                   (1, s.max_batch, s.max_batch * k)),
    }
    out = []
    for which in (0, 1):
        prof = {}
        for io in inputs:
            dims = [(d, d, d) if isinstance(d, int) else ranges[d][which] for d in io.shape]
            if io.name == "pixel_values":
                dims[0] = (1, 1, s.max_crops) if which == 0 else (1, 1, 1)
            prof[io.name] = tuple(tuple(d[i] for d in dims) for i in range(3))
        out.append(prof)
    return out


def materialize(onnx_path: Path, bindings: list[WeightBinding], reader: CheckpointReader,
                cfg: Step3Config, inst: Instance, out: Path) -> Path:
    """A self-contained copy of a graph with one instance's weights (external data file)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    values = bind(bindings, reader, cfg, inst)
    for init in model.graph.initializer:
        if init.name in values:
            v = values[init.name]
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT
            init.raw_data = v.array.tobytes()
            assert v.onnx_type == init.data_type, init.name
    onnx.save(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
              location=out.name + ".data", size_threshold=1024)
    return out


def build_engine(onnx_file: Path, inputs: Sequence[GraphIO], cfg: Step3Config, target: Target,
                 shapes: TrtShapes = TrtShapes(), workspace_bytes: int = 4 << 30) -> bytes:
    """Serialized, refittable, weight-stripped engine for one graph file (with its data)."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)          # explicit batch is the only mode in TRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_file.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.FP8 if target.fp8_math else trt.BuilderFlag.INT8)
    config.set_flag(trt.BuilderFlag.REFIT)
    config.set_flag(trt.BuilderFlag.STRIP_PLAN)
    for prof in profiles(inputs, shapes, cfg):
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT could not build an engine for {onnx_file.name}")
    return bytes(plan)


def refit_engine(plan: bytes, values: dict, logger: Any = None, runtime: Any = None) -> Any:
    """Deserialize a weight-stripped plan and refit it with one instance's weights
    (`binding.bind` output). Returns the ready ICudaEngine. Pass the `runtime` (a
    `trt.Runtime`, which must outlive its engines) when deserializing many."""
    trt = import_tensorrt()
    import numpy as np

    logger = logger or trt.Logger(trt.Logger.WARNING)
    engine = (runtime or trt.Runtime(logger)).deserialize_cuda_engine(plan)
    refitter = trt.Refitter(engine, logger)
    keep = []                                    # TensorRT copies on refit; keep until then
    for name in refitter.get_all_weights():
        v = values[name]
        arr = np.ascontiguousarray(v.array)
        keep.append(arr)
        if v.onnx_type == FLOAT8E4M3FN:          # numpy has no fp8: pass the raw bytes typed
            w = trt.Weights(trt.DataType.FP8, arr.ctypes.data, arr.size)
        else:
            w = trt.Weights(arr)
        refitter.set_named_weights(name, w)
    if not refitter.refit_cuda_engine():
        raise RuntimeError("TensorRT refit failed: weights do not match the engine")
    return engine


def build_bundle_engines(bundle: Path, subgraphs: dict[str, Subgraph],
                         reader: CheckpointReader, cfg: Step3Config, target: Target,
                         shapes: TrtShapes = TrtShapes(),
                         log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)
                         ) -> tuple[TrtInfo, list[tuple[str, int, dict]]]:
    """Build every subgraph's engine for the devices that run it; returns (manifest info,
    [(path, device, meta)]). Prints one line and builds nothing when TensorRT or a GPU is
    missing."""
    try:
        trt = import_tensorrt()
    except MissingExtraError:
        reason = "tensorrt is not installed (pip install 'step3-edge[trt]')"
        log(f"TensorRT: {reason}; shipping the ONNX subgraphs (ONNX Runtime's CUDA / TensorRT "
            "providers run them)")
        return TrtInfo(False, reason), []
    cap = gpu_capability()
    if cap is None:
        reason = "no CUDA GPU is visible"
        log(f"TensorRT {trt.__version__}: {reason}; shipping the ONNX subgraphs")
        return TrtInfo(False, reason), []
    if target.compute_capability and tuple(cap) != tuple(target.compute_capability):
        log(f"TensorRT: building on sm_{cap[0]}{cap[1]} for a {target.name} "
            f"(sm_{target.compute_capability[0]}{target.compute_capability[1]}); engines "
            "only run on the GPU model they were built on")
    files: list[tuple[str, int, dict]] = []
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, sg in subgraphs.items():
            bindings = [WeightBinding.from_dict(w) for w in sg.weights]
            inst = Instance(*sg.instances[0])
            try:
                src = materialize(bundle / sg.file, bindings, reader, cfg, inst,
                                  Path(tmp) / f"{name}.onnx")
                engine = build_engine(src, sg.inputs, cfg, target, shapes)
            except RuntimeError as e:          # unsupported op / precision on this TRT
                failed[name] = str(e)
                continue
            for dev in (d for d in sg.devices if isinstance(d, int)):
                rel = f"device-{dev}/trt/{name}.plan"
                (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
                (bundle / rel).write_bytes(engine)
                files.append((rel, dev, {"subgraph": name, "refit": True, "profiles":
                                         ["prefill", "decode"]}))
    if failed:
        log(f"TensorRT: {len(failed)} subgraph(s) not built ({', '.join(failed)}); their ONNX "
            "files are in the bundle")
    return TrtInfo(bool(files), version=trt.__version__, gpu=f"sm_{cap[0]}{cap[1]}",
                   precision="fp8" if target.fp8_math else "int8", shapes=asdict(shapes),
                   failed=failed), files
