"""Every routed expert of one MoE layer as two stacked GEMMs, for decode-sized batches on the
CPU.

A decode step of 16 sequences touches ~30 of a layer's 48 experts with 1-3 rows each; run one
by one, each expert costs two oneDNN calls whose fixed cost (~25-35 us here) and cold, small
weight reads (~8 GB/s for a 0.5 MB matrix) dwarf its bytes. Stacked, gate|up of all experts is
one prepacked GEMM [E*2m, h] and down one batched GEMM over [E, m, h]: every expert runs on
every row (up to `MAX_ROWS` rows the extra FLOPs are cheap), both calls stream their weights
at the memory bandwidth, and the (expert, row) pairs the router chose are gathered from the
result. `mini`, 16 rows, 2 threads: 5.2 -> 2.7 ms per layer (1 thread: 7.1 -> 5.5 ms).

Which path a layer call takes follows `CostModel`'s terms, from the bandwidths measured at
start-up: the stack reads all E experts at half the copy rate; one by one, each chosen expert
costs `cpu_overhead` plus its own read. With 2 threads here the stack pays from ~18-20 chosen
experts of 48, with 1 thread (half the bandwidth) from ~27.

Each (expert, row) output is the same oneDNN reduction as that expert's own `FusedSwiGLU`, so
on the shapes tested (`tiny`, `mini`) the bits equal the per-expert path's and the
reference's (tests/runtime/test_stacked_experts.py); at other shapes oneDNN may block K
differently, which changes results only in the last bf16 bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from step3_edge.runtime.cost_model import Bandwidths
from step3_edge.runtime.mlp import FusedSwiGLU

MAX_ROWS = 32           # rows (tokens) up to which every expert may run on every row


class StackedExperts:
    """All E experts of one layer (each a `FusedSwiGLU`, in expert order) stacked: gate|up
    prepacked [E*2m, h], down [E, m, h]. A second copy of the layer's expert weights."""

    def __init__(self, mlps: list[FusedSwiGLU], bw: Bandwidths) -> None:
        self.experts, self.m = len(mlps), mlps[0].m
        gate_up = torch.cat([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in mlps])
        self.gate_up = torch.ops.mkldnn._reorder_linear_weight(gate_up, 1)   # [E*2m, h]
        self.down = torch.stack([e.down_proj.weight.t() for e in mlps])      # [E, m, h]
        self.nbytes = sum(t.numel() * t.element_size() for t in (gate_up, self.down))
        stacked_s = 2 * self.nbytes / bw.host_memory
        expert_s = bw.cpu_overhead + stacked_s / self.experts
        self.min_touched = stacked_s / expert_s       # chosen experts from which it pays

    def wanted(self, rows: int, touched: int) -> bool:
        """Whether `rows` rows that chose `touched` distinct experts take the stacked path."""
        return rows <= MAX_ROWS and touched >= self.min_touched

    def __call__(self, x: torch.Tensor, experts: torch.Tensor, rows: torch.Tensor
                 ) -> torch.Tensor:
        """x [N, h]; chosen (expert, row) pairs as experts, rows [P] -> each pair's expert
        output [P, h]."""
        n, m = x.shape[0], self.m
        gu = torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.gate_up, None, "none",
                                                [], "").view(n, self.experts, 2 * m)
        act = F.silu(gu[..., :m]) * gu[..., m:]                                   # [N, E, m]
        y = torch.bmm(act.transpose(0, 1).contiguous(), self.down)                # [E, N, h]
        return y[experts, rows]
