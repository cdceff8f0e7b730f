"""The runtime's SwiGLU MLP (a routed expert, a shared expert or a dense MLP) over runtime
linears (`backends.Linear`), and the reading of one stored weight into such a linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from step3_edge.checkpoint import CheckpointReader
from step3_edge.model import Step3MLP
from step3_edge.runtime import native
from step3_edge.runtime.backends import Linear, TorchBackend


class RuntimeMLP(Step3MLP):
    """The reference SwiGLU module (`Step3MLP`) around three runtime linears; `native` is its
    one-call native MLP where it has one (`FusedSwiGLU`), else None."""

    native: native.SwiGLU | None = None


def make_mlp(gate: Linear, up: Linear, down: Linear) -> RuntimeMLP:
    """`RuntimeMLP` around three runtime linears; with oneDNN prepacked bf16 gate and up,
    gate and up become one GEMM (`FusedSwiGLU`)."""
    if getattr(gate, "packed", None) is not None and getattr(up, "packed", None) is not None:
        return FusedSwiGLU(gate, up, down)
    with torch.device("meta"):
        mlp = RuntimeMLP(1, 1)
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = gate, up, down
    return mlp


class FusedSwiGLU(RuntimeMLP):
    """`Step3MLP` with gate and up as one prepacked bf16 matrix [2m, h] (`PackedBf16`;
    bit-identical to two GEMMs under oneDNN; tests/runtime/test_backends.py). The separate
    linears are kept for their stored parts (copies, byte counts) but drop their own packed
    copies. Where the backend has the native kernels, calls of at most `native.MAX_ROWS` rows
    run the whole MLP in one native call (`native.SwiGLU`, also what the expert store's
    native strategy sums a layer's routed experts with)."""

    def __init__(self, gate: Linear, up: Linear, down: Linear) -> None:
        nn.Module.__init__(self)
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down
        self.m = gate.shape[0]
        self.packed = gate.backend.pack_bf16([gate.weight, up.weight])   # [2m, h]
        gate.packed = up.packed = None
        self.native = native.SwiGLU(gate.weight, up.weight, down.weight) \
            if self.packed.native is not None and down.gemv is not None else None
        # without oneDNN's blocked GEMM the native MLP is the fastest path up to its 16 rows
        self.native_rows = native.MAX_ROWS if self.packed.packed is not None else \
            native.GEMV_MAX_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:                 # [n, h] -> [n, h]
        if self.native is not None and x.dim() == 2 and x.shape[0] <= self.native_rows and \
                x.dtype == torch.bfloat16:
            return self.native(x)
        gu = self.packed(x)                                              # [n, 2m]
        return self.down_proj(F.silu(gu[..., :self.m]) * gu[..., self.m:])


def read_linear(reader: CheckpointReader, backend: TorchBackend, name: str,
                expert: int | None = None) -> Linear:
    """One stored weight (or one expert of a stacked weight) as a Linear of `backend`."""
    parts = {k: v.to(backend.device) for k, v in reader.read_parts(name, expert).items()}
    spec = reader.spec(name)
    shape = spec.shape[1:] if expert is not None else spec.shape
    return backend.linear(reader.scheme_of(name), parts, shape)
