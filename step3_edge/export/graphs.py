"""The math of every exported subgraph, written with explicit weight tensors.

These are the export-time twins of the reference modules in `step3_edge.model` and
`step3_edge.vision`: the same formulas (docs/model.md), but every weight is a forward argument named
like its checkpoint tensor, Linear weights come pre-transposed ([in, out], so `x @ w`
exports as ONNX MatMul, which ORT's quantized MatMul ops replace) and nothing depends on data
values, so `torch.onnx.export(dynamo=True)` traces them on the meta device without ever
allocating a weight. The attention graph takes RoPE and the MFA math from the reference itself
(`model.apply_rope`, `model.mfa_math`); `validate.py` checks each graph against the reference
module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from step3_edge.config import Step3Config
from step3_edge.model import apply_rope, mfa_math
from step3_edge.vision import PAD_TP_SIZE

def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm in fp32 (no 1+w offset), as `step3_edge.model.RMSNorm`."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
           ) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with [in, out] weights."""
    return (F.silu(x @ gate) * (x @ up)) @ down


class Graph(nn.Module):
    """Base: `data` names the data inputs, `weights` the weight inputs, in forward order."""

    data: tuple[str, ...] = ()
    weights: tuple[str, ...] = ()

    def __init__(self, cfg: Step3Config) -> None:
        super().__init__()
        self.cfg = cfg


class EmbedGraph(Graph):
    data, weights = ("input_ids",), ("model.embed_tokens.weight",)

    def forward(self, input_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, table)                          # [B, T, h]


class AttentionGraph(Graph):
    """Input RMSNorm -> MFA with the KV cache in and out -> residual add -> post-attention
    RMSNorm (-> router softmax top-k on MoE layers). One K/V head (MFA)."""

    data = ("hidden", "positions", "key_valid", "past_k", "past_v")
    weights = tuple(f"{n}.weight" for n in (
        "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
        "self_attn.inter_norm", "self_attn.wq", "self_attn.o_proj", "post_attention_layernorm"))

    def __init__(self, cfg: Step3Config, moe: bool) -> None:
        super().__init__(cfg)
        self.moe = moe
        if moe:
            self.weights = AttentionGraph.weights + ("moe.gate.weight",)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor,
                past_k: torch.Tensor, past_v: torch.Tensor, *w: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        t = self.cfg.text_config
        eps, n, d = t.rms_norm_eps, t.num_attention_heads, t.head_dim
        ln_in, wq_low, wk, wv, inter, wq, wo, ln_post = w[:8]
        b, s_new = hidden.shape[0], hidden.shape[1]
        x = rms_norm(hidden, ln_in, eps)                                   # [B, T, h]
        # RoPE tables from absolute positions; inv_freq is constant-folded (fp64 -> fp32)
        idx = torch.arange(0, d, 2, dtype=torch.float64, device=hidden.device)
        inv_freq = (1.0 / t.rope_theta ** (idx / d)).float()               # [d/2]
        ang = (positions.float() / t.rope_factor)[..., None] * inv_freq    # [B, T, d/2]
        ang = torch.cat([ang, ang], dim=-1)                                # [B, T, d]
        cos, sin = ang.cos(), ang.sin()
        q = rms_norm(x @ wq_low, inter, eps) @ wq                          # [B, T, n*d]
        q = apply_rope(q.view(b, s_new, n, d).transpose(1, 2), cos, sin)   # [B, n, T, d]
        k = apply_rope((x @ wk)[:, None], cos, sin)[:, 0]                  # [B, T, d]
        v = x @ wv                                                         # [B, T, d]
        k = torch.cat([past_k, k], dim=1)                                  # [B, S, d]
        v = torch.cat([past_v, v], dim=1)                                  # [B, S, d]
        s = k.shape[1]
        q_slot = torch.arange(s_new, device=hidden.device)[:, None] + (s - s_new)  # [T, 1]
        causal = torch.arange(s, device=hidden.device)[None, :] <= q_slot      # [T, S]
        allowed = causal[None] & key_valid[:, None, :]                          # [B, T, S]
        o = mfa_math(q, k, v, allowed[:, None], d ** -0.5)                 # [B, n, T, d]
        o = o.transpose(1, 2).reshape(b, s_new, n * d)                     # [B, T, n*d]
        h = hidden + o @ wo                                                # [B, T, h]
        normed = rms_norm(h, ln_post, eps)                                 # [B, T, h]
        if not self.moe:
            return h, normed, k, v
        probs = torch.softmax(normed @ w[8], dim=-1)                       # [B, T, E]
        weights, ids = probs.topk(t.moe_top_k, dim=-1)                     # [B, T, k]
        if t.norm_expert_weight:
            weights = weights / weights.sum(-1, keepdim=True)
        return h, normed, k, v, ids, weights


class SwiGLUGraph(Graph):
    """One routed expert, the shared expert or a dense MLP: x [N, h] -> [N, h]."""

    data = ("x",)

    def __init__(self, cfg: Step3Config, prefix: str) -> None:
        super().__init__(cfg)
        self.weights = tuple(f"{prefix}.{p}_proj.weight" for p in ("gate", "up", "down"))

    def forward(self, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
        return swiglu(x, gate, up, down)                                   # [N, h]


class LMHeadGraph(Graph):
    data, weights = ("hidden",), ("model.norm.weight", "lm_head.weight")

    def forward(self, hidden: torch.Tensor, norm: torch.Tensor, head: torch.Tensor
                ) -> torch.Tensor:
        eps = self.cfg.text_config.rms_norm_eps
        return rms_norm(hidden, norm, eps) @ head                          # [B, T, vocab]


VISION_LAYER = ("self_attn.qkv_proj.weight", "self_attn.qkv_proj.bias",
                "self_attn.out_proj.weight", "self_attn.out_proj.bias",
                "layer_norm1.weight", "layer_norm1.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                "mlp.fc2.weight", "mlp.fc2.bias", "layer_norm2.weight", "layer_norm2.bias")


class VisionGraph(Graph):
    """ViT (LayerNorm on branch outputs, 3 CLS pad copies) -> two convs -> projector, for one
    view size. The position table comes in already sized for that view (a crop's table is
    resized bicubically when the weights are bound, as `resize_position_embedding` does)."""

    data = ("pixel_values",)

    def __init__(self, cfg: Step3Config) -> None:
        super().__init__(cfg)
        v = cfg.vision_config
        names = ["embeddings.class_embedding", "embeddings.patch_embedding.weight",
                 "embeddings.patch_embedding.bias", "embeddings.position_embedding.weight"]
        for i in range(v.num_hidden_layers):
            names += [f"transformer.layers.{i}.{n}" for n in VISION_LAYER]
        heads = ["vit_downsampler.weight", "vit_downsampler.bias", "vit_downsampler2.weight",
                 "vit_downsampler2.bias", "vit_large_projector.weight"]
        if cfg.projector_bias:
            heads.append("vit_large_projector.bias")
        self.weights = tuple(f"vision_model.{n}" for n in names) + tuple(heads)

    def forward(self, pixel_values: torch.Tensor, *w: torch.Tensor) -> torch.Tensor:
        v = self.cfg.vision_config
        cls_e, patch_w, patch_b, pos = w[:4]
        b = pixel_values.shape[0]
        x = F.conv2d(pixel_values, patch_w, patch_b, stride=v.patch_size)  # [B, w, g, g]
        patches = x.flatten(2).transpose(1, 2)                             # [B, N, w]
        h = torch.cat([cls_e.expand(b, 1, -1), patches], dim=1) + pos      # [B, 1+N, w]
        h = torch.cat([h[:, :1].expand(b, PAD_TP_SIZE - 1, -1), h], dim=1)  # [B, 4+N, w]
        nh, hd = v.num_attention_heads, v.head_dim
        for i in range(v.num_hidden_layers):
            qkv_w, qkv_b, out_w, out_b, ln1_w, ln1_b, fc1_w, fc1_b, fc2_w, fc2_b, ln2_w, ln2_b \
                = w[4 + 12 * i: 16 + 12 * i]
            t = h.shape[1]
            qkv = (h @ qkv_w + qkv_b).view(b, t, 3, nh, hd).permute(2, 0, 3, 1, 4)  # [3,B,H,T,d]
            q, k, vv = qkv[0], qkv[1], qkv[2]
            att = torch.softmax((q @ k.transpose(-1, -2)) * hd ** -0.5, dim=-1)     # [B,H,T,T]
            o = (att @ vv).transpose(1, 2).reshape(b, t, nh * hd) @ out_w + out_b   # [B, T, w]
            h = h + F.layer_norm(o, (o.shape[-1],), ln1_w, ln1_b, v.layer_norm_eps)
            m = h @ fc1_w + fc1_b
            m = (m * torch.sigmoid(1.702 * m)) @ fc2_w + fc2_b                     # quick_gelu
            h = h + F.layer_norm(m, (m.shape[-1],), ln2_w, ln2_b, v.layer_norm_eps)
        feats = h[:, PAD_TP_SIZE:]                                         # [B, N, w]
        rest = w[4 + 12 * v.num_hidden_layers:]
        g = int(round(feats.shape[1] ** 0.5))
        x = feats.transpose(1, 2).reshape(b, v.hidden_size, g, g)          # [B, w, g, g]
        x = F.conv2d(x, rest[0], rest[1], stride=self.cfg.understand_projector_stride)
        x = F.conv2d(x, rest[2], rest[3], stride=2, padding=1)             # [B, 2o, g2, g2]
        x = x.flatten(2).transpose(1, 2) @ rest[4]                         # [B, N', hidden]
        return x + rest[5] if len(rest) > 5 else x
