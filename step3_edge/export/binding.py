"""Which ONNX op each weight becomes, and the arrays bound to a graph for one layer / expert.

One graph file serves every layer (and every expert) of its kind: its weights are placeholder
initializers (external data, location `BOUND`) that get their values when a session is created
(`onnxruntime.SessionOptions.add_external_initializers`), so ORT prepacks them like constants.
`plan_bindings` decides the op per weight from its stored scheme and the target's flavour;
`bind` turns the stored tensors of one instance into those initializers.

| stored scheme    | flavour `cpu` (ORT CPU)                | flavour `gpu` (TensorRT / ORT CUDA) |
|------------------|----------------------------------------|-------------------------------------|
| bf16             | MatMul, fp32 weight [K, N]             | same                                |
| int8_block       | MatMulNBits bits 8, block 128, acc 4   | DequantizeLinear axis 0, block 128  |
| int4_block       | MatMulNBits bits 4, block 128, acc 4   | not supported (no int4 DQ here)     |
| int8_per_channel | MatMulNBits bits 8, row scale per block| DequantizeLinear axis 1 (per column)|
| fp8_per_channel  | DequantizeLinear axis 1 (fp8)          | same                                |
| block_fp8        | DequantizeLinear axis 0 block 128 (fp8)| same                                |
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from step3_edge.checkpoint import CheckpointReader
from step3_edge.config import Step3Config
from step3_edge.errors import QuantizationError
from step3_edge.export.subgraphs import (Instance, SubgraphDecl, graph_weight_shape,
                                         resized_position_table)
from step3_edge.quantize.schemes import get_scheme, to_matmul_nbits

BOUND = "__bound_at_session_creation__"  # external-data location of every placeholder
BLOCK = 128
NBITS = {"int8_block": 8, "int4_block": 4, "int8_per_channel": 8}
# ONNX TensorProto element types
FLOAT, UINT8, INT8, INT64, BOOL, FLOAT8E4M3FN = 1, 2, 3, 7, 9, 17
_NP_TYPES = {np.dtype(np.float32): FLOAT, np.dtype(np.uint8): UINT8, np.dtype(np.int8): INT8}
PRECISION_OF = {"bf16": "fp32", "int8_block": "int8", "int8_per_channel": "int8",
                "int4_block": "int4", "fp8_per_channel": "fp8", "block_fp8": "fp8"}
PRECISION_RANK = ("fp32", "fp8", "int8", "int4")  # worst (loosest tolerance) last


@dataclass(frozen=True)
class Bound:
    """One initializer value: a numpy array and its ONNX element type (fp8 travels as uint8)."""

    array: np.ndarray
    onnx_type: int


@dataclass(frozen=True)
class WeightBinding:
    """How one graph weight is stored in the graph and where its values come from."""

    name: str                   # graph weight name (= checkpoint name minus the prefix)
    tensor: str                 # checkpoint tensor, `{layer}` filled per instance
    layout: str                 # linear ([out, in] -> [in, out]) | dense | position
    expert: bool                # a slice [expert] of a stacked [E, ...] tensor
    scheme: str                 # how the bundle stores it
    op: str                     # matmul | matmul_nbits | dequantize_linear | none
    initializers: tuple[str, ...]
    shape: tuple[int, ...]      # fp32 graph shape ([in, out] for linear)
    attrs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["initializers"], d["shape"] = list(self.initializers), list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WeightBinding:
        return cls(**{**d, "initializers": tuple(d["initializers"]), "shape": tuple(d["shape"])})


def plan_bindings(decl: SubgraphDecl, cfg: Step3Config, schemes: dict[str, str],
                  inst: Instance, flavour: str) -> list[WeightBinding]:
    """Bindings of `decl`'s weights given the stored scheme of each tensor (name -> scheme,
    as in quantization_config.modules) for the instance `inst` (schemes may differ by layer:
    a different signature gets its own graph file)."""
    out = []
    for name in decl.weight_names(cfg):
        tensor = decl.tensor(name, inst)
        scheme = schemes.get(tensor, "bf16")
        shape = graph_weight_shape(decl, cfg, name)
        pattern = decl.prefix + name
        attrs: dict[str, Any] = {}
        if "position_embedding" in name and decl.image_size:
            layout, op, inits = "position", "none", (name,)
            attrs["image_size"] = decl.image_size(cfg)
        elif not decl.linear(name) or scheme == "bf16":
            if scheme != "bf16":
                raise QuantizationError(f"{tensor} is stored as {scheme}, but the {decl.kind} "
                                        "graph takes it unquantized",
                                        "keep norms, embeddings and convs bf16 in the recipe")
            layout = "linear" if decl.linear(name) else "dense"
            op, inits = ("matmul" if layout == "linear" else "none"), (name,)
        else:
            layout, inits = "linear", (name + "_q", name + "_scale")
            if flavour == "cpu" and scheme in NBITS:
                op, attrs = "matmul_nbits", {"bits": NBITS[scheme], "block_size": BLOCK,
                                             "accuracy_level": 4}
            elif scheme in ("int8_per_channel", "fp8_per_channel"):
                op, attrs = "dequantize_linear", {"axis": 1}
            elif scheme in ("int8_block", "block_fp8"):
                op, attrs = "dequantize_linear", {"axis": 0, "block_size": BLOCK}
            else:
                raise QuantizationError(f"{tensor} is stored as {scheme}, which has no ONNX "
                                        f"form for {flavour} targets",
                                        "use int8_block / int8_per_channel / fp8 schemes for "
                                        "GPU targets (int4 runs on the cpu target)")
            attrs["qtype"] = "float8e4m3fn" if "fp8" in scheme else "int8" \
                if op == "dequantize_linear" else "uint8"
        out.append(WeightBinding(name, pattern, layout, decl.expert, scheme, op, inits, shape,
                                 attrs))
    return out


def precision_of(bindings: list[WeightBinding]) -> str:
    """The lowest weight precision in a graph (decides its validation tolerance)."""
    ranks = [PRECISION_RANK.index(PRECISION_OF[b.scheme]) for b in bindings]
    return PRECISION_RANK[max(ranks, default=0)]


def signature(bindings: list[WeightBinding]) -> tuple[tuple[str, str], ...]:
    """What makes two instances share one graph file: the op and scheme of every weight."""
    return tuple((b.name, b.op, b.scheme) for b in bindings)


def placeholder_specs(b: WeightBinding) -> list[tuple[str, int, tuple[int, ...]]]:
    """(initializer name, ONNX type, shape) of the placeholders one binding puts in the graph."""
    if b.op in ("matmul", "none"):
        return [(b.name, FLOAT, b.shape)]
    k, n = b.shape
    if b.op == "matmul_nbits":
        nb = -(-k // BLOCK)
        return [(b.initializers[0], UINT8, (n, nb, BLOCK * b.attrs["bits"] // 8)),
                (b.initializers[1], FLOAT, (n * nb,))]
    qtype = FLOAT8E4M3FN if b.attrs["qtype"] == "float8e4m3fn" else INT8
    scale = (n,) if b.attrs["axis"] == 1 else (-(-k // BLOCK), n)
    return [(b.initializers[0], qtype, (k, n)), (b.initializers[1], FLOAT, scale)]


def bind(bindings: list[WeightBinding], reader: CheckpointReader, cfg: Step3Config,
         inst: Instance) -> dict[str, Bound]:
    """Initializer values of one instance (layer / expert), read from the bundle's weights."""
    out: dict[str, Bound] = {}
    for b in bindings:
        tensor = b.tensor.format(layer=inst.layer)
        expert = inst.expert if b.expert else None
        if b.op in ("matmul", "none"):
            if b.layout == "linear":             # [out, in] -> [in, out] in one blocked copy
                as_stored = reader.scheme_of(tensor).name == "bf16"
                w = reader.read(tensor, reader.stored_dtype(tensor) if as_stored else
                                torch.float32, expert)
                out[b.name] = Bound(torch.empty(w.shape[::-1]).copy_(w.T).numpy(), FLOAT)
                continue
            w = reader.read(tensor, torch.float32, expert)
            if b.layout == "position":
                w = resized_position_table(cfg, w, b.attrs["image_size"])
            out[b.name] = _f32(w)
            continue
        parts = reader.read_parts(tensor, expert)
        scheme = get_scheme(b.scheme)
        k, n = b.shape
        if b.op == "matmul_nbits":
            if b.scheme == "int8_per_channel":       # a row scale is every block's scale
                q = parts[""].to(torch.int16) + 128                              # [N, K]
                nb = -(-k // BLOCK)
                packed = torch.full((n, nb * BLOCK), 128, dtype=torch.uint8)
                packed[:, :k] = q.to(torch.uint8)
                qb = packed.view(n, nb, BLOCK)
                scales = parts["_scale"].float().expand(n, nb).reshape(-1)
            else:
                qb, scales, _ = to_matmul_nbits(scheme, parts, (n, k))
            out[b.initializers[0]] = Bound(qb.contiguous().numpy(), UINT8)
            out[b.initializers[1]] = _f32(scales)
            continue
        q = parts[""].T.contiguous()                                             # [K, N]
        if b.scheme == "block_fp8":                  # 128x128 blocks -> per (k block, column)
            s = parts["_scale_inv"].float().T.repeat_interleave(BLOCK, dim=1)[:, :n]
        elif b.attrs["axis"] == 1:
            s = parts["_scale"].float().reshape(n)                               # [N]
        else:
            s = parts["_scale"].float().T                                        # [K/128, N]
        if q.dtype == torch.float8_e4m3fn:
            out[b.initializers[0]] = Bound(q.view(torch.uint8).numpy(), FLOAT8E4M3FN)
        else:
            out[b.initializers[0]] = Bound(q.numpy(), INT8)
        out[b.initializers[1]] = _f32(s)
    return out


def _f32(t: torch.Tensor) -> Bound:
    return Bound(np.ascontiguousarray(t.detach().float().numpy()), FLOAT)
