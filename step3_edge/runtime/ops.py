"""The runtime's ops for the reference layers (`model.Ops`), and its weight pass.

The runtime builds `Step3DecoderLayer`s from shapes with `RuntimeOps`; its weight pass
(`load_runtime_weights`) puts the backend's linears (the stored weight, quantized or not, with
its kernel) in place of the layers' `nn.Linear`s and assigns the norms' weights; then
`RuntimeOps.fuse_qkv` joins each layer's q, k and v projections. The layer code and its math
are the reference's; what differs:

- RMSNorm through the native kernel under bf16 compute (`NativeRMSNorm`);
- q|k|v as one GEMM over the fused weights (bit-identical to three prepacked bf16 GEMMs);
- a decode step's RoPE, KV write and attention in one native call where the KV pool has the
  native kernels (`GroupCache.decode_attention`);
- a later prefill chunk on the CPU as two flash calls merged by their log-sum-exp
  (`causal_after_past`), where the reference takes one masked SDPA call.
"""

from __future__ import annotations

import torch
from torch import nn

from step3_edge.checkpoint import CheckpointReader
from step3_edge.model import DIRECT_QUERIES, Ops, RMSNorm, Step3Attention, mfa_attention
from step3_edge.runtime import native
from step3_edge.runtime.backends import FusedQuant, NativeQuant, PackedBf16, TorchBackend
from step3_edge.runtime.mlp import read_linear

# torch's CPU flash kernel with its log-sum-exp (private; absent -> the reference's SDPA call)
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class NativeRMSNorm(RMSNorm):
    """`RMSNorm` through the native kernel for bf16 inputs (`native.rms_norm`: one call for
    the reference's ~10 ops; the sum of squares in another order, so within a bf16 rounding
    of the reference's, not bit-identical); the reference's ops for other dtypes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            return super().forward(x)
        return native.rms_norm(x, self.weight, self.eps)


class RuntimeOps(Ops):
    """`model.Ops` for the runtime's attention side: native RMSNorm where the backend has the
    native kernels, each layer's fused q|k|v (`fuse_qkv`, after the weight pass), a decode
    step's attention in one native call where the KV pool allows, the CPU flash kernel for a
    later prefill chunk. Everything else is the reference's."""

    def __init__(self, native_kernels: bool) -> None:
        self.native = native_kernels
        self.qkv: dict[int, PackedBf16 | FusedQuant | None] = {}   # layer -> fused q|k|v

    def rms_norm(self, dim: int, eps: float) -> nn.Module:
        return (NativeRMSNorm if self.native else RMSNorm)(dim, eps)

    def fuse_qkv(self, layer: int, attn: Step3Attention) -> None:
        """Layer `layer`'s q_proj, k_proj and v_proj as one matrix [share_q + 2d, h]: one
        prepacked bf16 one (when all three are prepacked; bit-identical to three GEMMs),
        their stored int8 / fp8 bytes (`FusedQuant`, when all three are `NativeQuant` of one
        scheme), else none (three GEMMs)."""
        lins = (attn.q_proj, attn.k_proj, attn.v_proj)
        if all(isinstance(lin, NativeQuant) for lin in lins) and \
                len({lin.scheme.name for lin in lins}) == 1:
            self.qkv[layer] = FusedQuant(list(lins))
        elif all(getattr(lin, "packed", None) is not None for lin in lins):
            for lin in lins:
                lin.packed = None                     # the fused copy replaces theirs
            self.qkv[layer] = lins[0].backend.pack_bf16([lin.weight for lin in lins])
        else:
            self.qkv[layer] = None

    def project_qkv(self, attn: Step3Attention, x: torch.Tensor, layer: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The reference's three projections, or views into one fused GEMM's output."""
        fused = self.qkv.get(layer)
        if fused is None:
            return super().project_qkv(attn, x, layer)
        b, t, _ = x.shape
        d = attn.cfg.head_dim
        y = fused(x.reshape(b * t, -1)).view(b, t, -1)                      # [b, t, sq + 2d]
        q, k, v = y.split([attn.cfg.share_q_dim, d, d], dim=-1)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, mask: torch.Tensor | None, cache, layer: int
               ) -> torch.Tensor:
        """A decode group in one native call where the pool has the kernels (q rotated in
        place), else the reference's RoPE, KV write and MFA (`cache` is a `GroupCache`)."""
        rows = _key_value_rows(k, v)
        if rows is not None:
            b, d = k.shape[0], k.shape[-1]
            out = cache.decode_attention(layer, rows, 0, q.view(b, -1), q.shape[-1] // d,
                                         d ** -0.5)
            if out is not None:
                return out
        return super().attend(q, k, v, cos, sin, mask, cache, layer)

    def mfa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        t, s = q.shape[2], k.shape[1]
        if mask is None and DIRECT_QUERIES < t < s and q.device.type == "cpu" and \
                _FLASH_CPU is not None:
            return causal_after_past(q, k, v, scale)
        return mfa_attention(q, k, v, mask, scale)


def _key_value_rows(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """For one new token per sequence (k, v [b, 1, d]) whose value follows its key in memory
    (slices of one fused q|k|v output), the rows [b, 2d] holding both (what the native decode
    attention reads); else None."""
    b, t, d = k.shape
    if t != 1 or k.stride() != v.stride() or k.stride(-1) != 1 or \
            v.data_ptr() != k.data_ptr() + d * k.element_size():
        return None
    return k.as_strided((b, 2 * d), (k.stride(0), 1))


def causal_after_past(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                      ) -> torch.Tensor:
    """A later prefill chunk (q [B, n, T, d] after S - T cached keys of k, v [B, S, d], all
    valid) on the CPU: the cached keys unmasked and the chunk's own keys causal, as two flash
    calls merged by their log-sum-exp. The CPU kernel cannot skip blocks of a T < S
    lower-right causal mask, so this is ~1.4x one masked call (T = 2,048 after 1,952 cached
    keys: 124 -> 87 ms a layer); `mfa_attention` within float32 rounding."""
    b, n, t, d = q.shape
    s = k.shape[1]
    k = k.to(q.dtype)[:, None].expand(b, n, s, d)                         # no copies
    v = v.to(q.dtype)[:, None].expand(b, n, s, d)
    past = s - t
    o1, l1 = _FLASH_CPU(q, k[:, :, :past], v[:, :, :past], 0.0, False, scale=scale)
    o2, l2 = _FLASH_CPU(q, k[:, :, past:], v[:, :, past:], 0.0, True, scale=scale)
    lse = torch.logaddexp(l1, l2)                                        # [B, n, T] float32
    out = o1.float() * (l1 - lse).exp_()[..., None] + o2.float() * (l2 - lse).exp_()[..., None]
    return out.to(q.dtype)


def load_runtime_weights(module: nn.Module, prefix: str, reader: CheckpointReader,
                 backend: TorchBackend) -> nn.Module:
    """The runtime's weight pass over a module built from shapes (on the meta device): each
    `nn.Linear` replaced by the backend's linear over its stored weight `prefix + name`
    (`read_linear`: kept as stored where a kernel takes it), every other parameter read in
    float32 onto the backend's device. Strict, as the reference's `model.load_weights`."""
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.Linear):
            parent, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(parent), leaf,
                    read_linear(reader, backend, f"{prefix}{name}.weight"))
    state = {n: reader.read(prefix + n, torch.float32).to(backend.device).contiguous()
             for n in module.state_dict()}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)
