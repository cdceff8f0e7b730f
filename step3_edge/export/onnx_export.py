"""Subgraph -> ONNX through `torch.onnx.export(dynamo=True)`, with weights as placeholders.

Each declared graph is traced on the meta device with its weights as extra inputs (no weight
is ever allocated, whatever the model size), then:
1. the weight inputs become placeholder initializers (external data at `BOUND`, no bytes);
   sessions bind the real values per layer / expert (`binding.bind`);
2. dynamic axes get the declared names (batch, seq, past, total, tokens);
3. each quantized Linear's MatMul is rewritten to the op its binding names (`MatMulNBits`, or
   `DequantizeLinear` + `MatMul`), so the file is the graph ORT / TensorRT will run.
The traced fp32 graph depends only on the config, so it is cached per process.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from step3_edge.config import Step3Config
from step3_edge.errors import MissingExtraError
from step3_edge.export.binding import BOUND, WeightBinding, placeholder_specs
from step3_edge.export.subgraphs import SubgraphDecl, graph_weight_shape

if TYPE_CHECKING:
    from onnx import ModelProto

OPSET = 21                 # blocked and fp8 DequantizeLinear need >= 21
MS_DOMAIN = "com.microsoft"
EXPORT_DIMS = {"batch": 2, "seq": 3, "past": 4, "tokens": 5}  # distinct, > 1: stay symbolic
_CACHE: dict[tuple[str, str], bytes] = {}


def _onnx():
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx.export(dynamo=True) needs it)
    except ImportError as e:
        raise MissingExtraError(e.name or "onnx", "cpu", "ONNX export") from None
    return onnx


def export_base(decl: SubgraphDecl, cfg: Step3Config) -> ModelProto:
    """The fp32 graph of `decl` with placeholder weights and named dynamic axes (cached)."""
    onnx = _onnx()
    key = (decl.kind, json.dumps(cfg.with_quantization(None).to_dict(), sort_keys=True))
    if key not in _CACHE:
        _CACHE[key] = _trace(decl, cfg).SerializeToString()
    return onnx.load_from_string(_CACHE[key])


def _trace(decl: SubgraphDecl, cfg: Step3Config) -> ModelProto:
    graph = decl.build(cfg).eval()
    data = decl.sample(cfg, EXPORT_DIMS, device="meta")
    names = list(graph.data)
    weights = {n: torch.empty(graph_weight_shape(decl, cfg, n), device="meta")
               for n in graph.weights}
    ios = {io.name: io for io in decl.inputs(cfg)}
    dyn = tuple({i: torch.export.Dim.DYNAMIC for i, d in enumerate(ios[n].shape)
                 if isinstance(d, str)} or None for n in names) + (None,) * len(weights)
    outputs = [io.name for io in decl.outputs(cfg)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = logging.getLogger("torch").level
        logging.getLogger("torch").setLevel(logging.ERROR)
        try:
            prog = torch.onnx.export(_Flat(graph), tuple(data[n] for n in names) + tuple(
                weights.values()), dynamo=True, dynamic_shapes=(dyn,),
                input_names=names + list(weights), output_names=outputs,
                opset_version=OPSET, verbose=False, optimize=True)
        finally:
            logging.getLogger("torch").setLevel(level)
    model = prog.model_proto
    _to_placeholders(model, set(weights))
    _name_axes(model, decl, cfg)
    model.doc_string = f"step3-edge {decl.kind}: {decl.doc}"
    return model


class _Flat(torch.nn.Module):
    """All inputs as one varargs tuple, so one dynamic_shapes structure fits every graph."""

    def __init__(self, graph: torch.nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, *args: torch.Tensor):
        return self.graph(*args)


def _placeholder(name: str, elem_type: int, shape: tuple[int, ...]):
    onnx = _onnx()
    t = onnx.TensorProto(name=name, data_type=elem_type, dims=list(shape))
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value=BOUND)
    return t


def _to_placeholders(model, weights: set[str]) -> None:
    g = model.graph
    keep = [i for i in g.input if i.name not in weights]
    for i in g.input:
        if i.name in weights:
            tt = i.type.tensor_type
            g.initializer.append(_placeholder(i.name, tt.elem_type,
                                              tuple(d.dim_value for d in tt.shape.dim)))
    del g.input[:]
    g.input.extend(keep)
    big = [i.name for i in g.initializer if i.name not in weights and len(i.raw_data) > 1 << 20]
    assert not big, f"weights were constant-folded into new initializers: {big}"


def _name_axes(model, decl: SubgraphDecl, cfg: Step3Config) -> None:
    ios = {io.name: io for io in decl.inputs(cfg) + decl.outputs(cfg)}
    for vi in list(model.graph.input) + list(model.graph.output):
        io = ios[vi.name]
        dims = vi.type.tensor_type.shape.dim
        assert len(dims) == len(io.shape), (vi.name, dims, io.shape)
        for d, want in zip(dims, io.shape):
            if isinstance(want, str):
                d.dim_param = want
            else:
                d.dim_value = want
    del model.graph.value_info[:]   # intermediate shapes keep tracer names; ORT re-infers


def apply_bindings(base: ModelProto, bindings: list[WeightBinding]) -> ModelProto:
    """A copy of `base` where every quantized weight's MatMul becomes its bound op and the
    weight placeholders become that op's initializers."""
    _onnx()
    from onnx import helper

    model = copy.deepcopy(base)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    new_nodes = []
    by_weight = {b.name: b for b in bindings if b.op in ("matmul_nbits", "dequantize_linear")}
    for node in g.node:
        hit = [b for i in node.input if (b := by_weight.get(i))]
        if not hit:
            new_nodes.append(node)
            continue
        b = hit[0]
        assert node.op_type == "MatMul" and node.input[1] == b.name and len(hit) == 1, \
            f"{b.name} feeds {node.op_type}, not the B input of a MatMul"
        k, n = b.shape
        if b.op == "matmul_nbits":
            new_nodes.append(helper.make_node(
                "MatMulNBits", [node.input[0], *b.initializers], list(node.output),
                name=node.name + "_nbits", domain=MS_DOMAIN, K=k, N=n, bits=b.attrs["bits"],
                block_size=b.attrs["block_size"], accuracy_level=b.attrs["accuracy_level"]))
        else:
            kw = {"axis": b.attrs["axis"]}
            if "block_size" in b.attrs:
                kw["block_size"] = b.attrs["block_size"]
            dq = b.name + "_dq"
            new_nodes.append(helper.make_node("DequantizeLinear", list(b.initializers), [dq],
                                              name=node.name + "_dq", **kw))
            new_nodes.append(helper.make_node("MatMul", [node.input[0], dq],
                                              list(node.output), name=node.name))
    for b in bindings:
        if b.op in ("matmul_nbits", "dequantize_linear"):
            g.initializer.remove(inits[b.name])
            for name, typ, shape in placeholder_specs(b):
                g.initializer.append(_placeholder(name, typ, shape))
        used = [i.name for i in g.initializer]
        assert all(i in used for i in b.initializers), b
    del g.node[:]
    g.node.extend(new_nodes)
    if any(b.op == "matmul_nbits" for b in bindings) and \
            not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model


def save(model: ModelProto, path: Path) -> Path:
    """Write one graph file (weights are placeholders, so files are small)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def export_subgraph(decl: SubgraphDecl, cfg: Step3Config, bindings: list[WeightBinding],
                    path: Path) -> Path:
    """Export `decl` for `cfg` with the ops `bindings` name and write it to `path`."""
    return save(apply_bindings(export_base(decl, cfg), bindings), path)
