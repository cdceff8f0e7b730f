"""The reference Step3 model in plain PyTorch (the Step3 paper's architecture,
as vLLM's step3_text / step3_vl implement it; docs/model.md). It is the oracle every exported,
quantized or offloaded path is compared with, so it follows that math to the letter and favours
clarity over speed. Module paths equal checkpoint names, so loading needs no rename table.

A decoder layer is built from shapes with the ops it computes with (`Ops`: the plain ones here;
the runtime passes its fast ones to the same layers), then the weight pass (`load_weights`)
fills it. MFA attention is written once, in `mfa_math`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from step3_edge.checkpoint import CheckpointReader
from step3_edge.config import Step3Config, Step3TextConfig
from step3_edge.errors import PromptError
from step3_edge.sampling import SamplingParams, sample_next
from step3_edge.vision import (Step3VisionEncoder, build_vision_heads, embed_with_images,
                               encode_images)


class RMSNorm(nn.Module):
    """Llama-style RMSNorm computed in fp32; the weight multiplies directly (no 1+w)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) * weight, in fp32
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps
                          ).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float, factor: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX (rotate-half) RoPE tables for integer positions [B, T] -> cos, sin [B, T, dim]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64,
                                          device=positions.device) / dim)    # [dim/2]
    ang = (positions.to(torch.float64) / factor)[..., None] * inv_freq               # [B,T,dim/2]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, T, D]. Rotates all D dims (rotate-half layout)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return (xf * cos[:, None] + rot * sin[:, None]).to(x.dtype)


# Queries per sequence up to which `mfa_attention` takes the written-out math on a CPU.
DIRECT_QUERIES = 16
_MASKED = torch.finfo(torch.float32).min


def mfa_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
             scale: float) -> torch.Tensor:
    """MFA attention written out: n query heads against the one shared K/V head, q [B, n, T, d],
    k, v [B, S, d], boolean mask [B, 1, T, S] (None: causal, the queries at the last T key
    slots) -> [B, n, T, d] in q's dtype. The n*T query rows meet K in one float32 product
    [B, n*T, d] @ [B, d, S], with no per-head copies of K and V. The exported attention graph
    computes this function (`export/graphs.py`)."""
    b, n, t, d = q.shape
    s = k.shape[1]
    scores = torch.bmm(q.reshape(b, n * t, d).float() * scale, k.float().transpose(1, 2))
    scores = scores.view(b, n, t, s)                                     # [B, n, T, S]
    if mask is None and t > 1:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    if mask is not None:
        # a finite floor, not -inf: a row with every key masked (left padding) then stays
        # finite, and its values cannot turn other rows' zero-weighted sums into NaN
        scores = scores.masked_fill(~mask, _MASKED)
    p = torch.softmax(scores, dim=-1).view(b, n * t, s)                  # [B, n*T, S]
    return torch.bmm(p, v.float()).view(b, n, t, d).to(q.dtype)


def mfa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """MFA attention (`mfa_math`'s arguments and result): the math as written for up to
    DIRECT_QUERIES queries on a CPU (decode); longer queries (prefill), and every call on an
    accelerator, through scaled_dot_product_attention over K and V broadcast to the n heads,
    which never holds the [T, S] score matrix (the same attention, summed in its own order)."""
    b, n, t, d = q.shape
    if t <= DIRECT_QUERIES and q.device.type == "cpu":
        return mfa_math(q, k, v, mask, scale)
    s = k.shape[1]
    k = k.to(q.dtype)[:, None].expand(b, n, s, d)                         # no copies
    v = v.to(q.dtype)[:, None].expand(b, n, s, d)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=causal_lower_right(t, s) if mask is None else mask, scale=scale)


class KVCache:
    """One K and one V head per layer (MFA): k, v [B, max_len, head_dim] per layer."""

    def __init__(self, cfg: Step3TextConfig, batch: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (batch, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device)
                  for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device)
                  for _ in range(cfg.num_hidden_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, T, D] after the current length; return all keys/values so far."""
        t = k.shape[1]
        if self.length + t > self.max_len:
            raise PromptError(f"{self.length + t} tokens exceed the KV cache of {self.max_len}",
                              "lower max_new_tokens or shorten the prompt")
        self.k[layer][:, self.length:self.length + t] = k
        self.v[layer][:, self.length:self.length + t] = v
        return self.k[layer][:, :self.length + t], self.v[layer][:, :self.length + t]


class Ops:
    """The operations a decoder layer is built from and computes with, given to it when it is
    built. These are the reference's, plain PyTorch; the runtime gives its own to the same
    layers (`runtime.ops.RuntimeOps`: native RMSNorm, q|k|v as one GEMM, a decode step's
    attention in one native call, the CPU flash kernel for a later prefill chunk)."""

    def rms_norm(self, dim: int, eps: float) -> nn.Module:
        return RMSNorm(dim, eps)

    def project_qkv(self, attn: Step3Attention, x: torch.Tensor, layer: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, h] -> the low-rank query [B, T, share_q], key and value [B, T, d]."""
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, layer: int
               ) -> torch.Tensor:
        """Query heads q [B, T, n*d] and the new key and value k, v [B, T, d] -> [B, n, T, d]:
        RoPE on q and k, the new keys and values through the cache, MFA."""
        b, t, _ = q.shape
        d = k.shape[-1]
        q = apply_rope(q.view(b, t, -1, d).transpose(1, 2), cos, sin)           # [B,n,T,d]
        k = apply_rope(k[:, None], cos, sin)[:, 0]                               # [B,T,d]
        if cache is not None:
            k, v = cache.update(layer, k, v)                                     # [B,S,d]
        return self.mfa(q, k, v, mask, d ** -0.5)

    def mfa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        return mfa_attention(q, k, v, mask, scale)


PLAIN = Ops()


class Step3Attention(nn.Module):
    """MFA: q_proj -> inter_norm -> wq (64 heads), one shared K and V head (Step3's MFA)."""

    def __init__(self, cfg: Step3TextConfig, ops: Ops = PLAIN) -> None:
        super().__init__()
        h, d, n = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads
        self.cfg, self.ops = cfg, ops
        self.q_proj = nn.Linear(h, cfg.share_q_dim, bias=False)
        self.k_proj = nn.Linear(h, d, bias=False)
        self.v_proj = nn.Linear(h, d, bias=False)
        self.inter_norm = ops.rms_norm(cfg.share_q_dim, cfg.rms_norm_eps)
        self.wq = nn.Linear(cfg.share_q_dim, n * d, bias=False)
        self.o_proj = nn.Linear(n * d, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache: KVCache | None, layer: int) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.ops.project_qkv(self, x, layer)                  # [B,T,sq], [B,T,d] x2
        q = self.wq(self.inter_norm(q))                                  # [B, T, n*d]
        out = self.ops.attend(q, k, v, cos, sin, mask, cache, layer)     # [B, n, T, d]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Step3MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense layers and the shared expert."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class StackedExperts(nn.Module):
    """Holds one stacked expert weight [E, out, in] under the checkpoint's `*.weight` name."""

    def __init__(self, e: int, out_dim: int, in_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(e, out_dim, in_dim))


class Step3MoE(nn.Module):
    """Routed experts, stored stacked [E, out, in] as in the HF checkpoint; without `experts`,
    the router alone (what the attention side of the AFD split holds)."""

    def __init__(self, cfg: Step3TextConfig, experts: bool = True) -> None:
        super().__init__()
        e, m, h = cfg.moe_num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.cfg = cfg
        self.gate = nn.Linear(h, e, bias=False)                       # the router
        if experts:
            self.gate_proj = StackedExperts(e, m, h)
            self.up_proj = StackedExperts(e, m, h)
            self.down_proj = StackedExperts(e, h, m)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, h] -> top-k expert ids [N, k] and weights [N, k] (softmax, fp32)."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)           # [N, E]
        w, ids = probs.topk(self.cfg.moe_top_k, dim=-1)
        if self.cfg.norm_expert_weight:
            w = w / w.sum(-1, keepdim=True)
        return ids, w

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """One routed expert on x [N, h] -> [N, h]."""
        gate, up = F.linear(x, self.gate_proj.weight[e]), F.linear(x, self.up_proj.weight[e])
        return F.linear(F.silu(gate) * up, self.down_proj.weight[e])

    def combine(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """sum_k w_k * expert_{ids_k}(x), looping over the experts that were hit."""
        out = torch.zeros_like(x, dtype=torch.float32)                # [N, h]
        for e in ids.unique().tolist():
            tok, slot = (ids == e).nonzero(as_tuple=True)
            out.index_add_(0, tok, self.expert(x[tok], e).float() * w[tok, slot, None])
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, w = self.route(x)
        return self.combine(x, ids, w)


class Step3DecoderLayer(nn.Module):
    """One decoder layer, built from `ops`. `ffn=False` builds its AFD attention side only:
    the norms, MFA and, on MoE layers, the router (`moe.gate`)."""

    def __init__(self, cfg: Step3TextConfig, layer: int, ops: Ops = PLAIN, ffn: bool = True
                 ) -> None:
        super().__init__()
        self.layer = layer
        self.is_moe = cfg.is_moe(layer)
        self.input_layernorm = ops.rms_norm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Step3Attention(cfg, ops)
        self.post_attention_layernorm = ops.rms_norm(cfg.hidden_size, cfg.rms_norm_eps)
        if self.is_moe:
            self.moe = Step3MoE(cfg, experts=ffn)
            if ffn:
                self.share_expert = Step3MLP(cfg.hidden_size, cfg.share_expert_dim)
        elif ffn:
            self.mlp = Step3MLP(cfg.hidden_size, cfg.intermediate_size)

    def attention_side(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       mask: torch.Tensor | None, cache: KVCache | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """AFD attention side: residual h -> (new residual, post-attention-normed hidden)."""
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache, self.layer)
        return h, self.post_attention_layernorm(h)

    def ffn_side(self, x: torch.Tensor) -> torch.Tensor:
        """AFD FFN side: dense MLP, or shared expert + routed experts (unweighted sum)."""
        if not self.is_moe:
            return self.mlp(x)
        flat = x.reshape(-1, x.shape[-1])                              # [B*T, h]
        return (self.share_expert(flat) + self.moe(flat)).view_as(x)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        h, x = self.attention_side(h, cos, sin, mask, cache)
        return h + self.ffn_side(x)


class Step3TextModel(nn.Module):
    def __init__(self, cfg: Step3TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Step3DecoderLayer(cfg, i)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def attention_mask(positions: torch.Tensor, key_valid: torch.Tensor, past: int
                   ) -> torch.Tensor | None:
    """Boolean mask [B, 1, T, S]: causal over absolute slots, and padding keys hidden.
    key_valid [B, S] marks real (non-padding) key slots. None when every key is valid and
    the T queries are the last T slots: plain causal, which `mfa_attention` runs without a
    mask tensor (same bits, and SDPA skips the masked blocks)."""
    t, s = positions.shape[1], key_valid.shape[1]
    if past + t == s and bool(key_valid.all()):
        return None
    dev = key_valid.device
    q_slot = torch.arange(past, past + t, device=dev)[:, None]         # [T, 1]
    causal = torch.arange(s, device=dev)[None, :] <= q_slot            # [T, S]
    return (causal[None] & key_valid[:, None, :])[:, None]             # [B, 1, T, S]


def load_weights(module: nn.Module, read: Callable[[str], torch.Tensor]) -> nn.Module:
    """The weight pass over a module built from shapes (on the meta device): every entry of
    its state dict assigned the tensor `read(name)` gives (strict: all of them, no others).
    Returns the module in eval mode, without gradients."""
    module.load_state_dict({n: read(n) for n in module.state_dict()}, strict=True, assign=True)
    return module.eval().requires_grad_(False)


class Step3ForConditionalGeneration(nn.Module):
    """Step3 VLM: `model.*` (LLM), `lm_head`, `vision_model`, the downsamplers, the projector."""

    def __init__(self, cfg: Step3Config) -> None:
        super().__init__()
        self.config = cfg
        self.model = Step3TextModel(cfg.text_config)
        self.lm_head = nn.Linear(cfg.text_config.hidden_size, cfg.text_config.vocab_size,
                                 bias=False)
        self.vision_model = Step3VisionEncoder(cfg.vision_config)
        for name, module in build_vision_heads(cfg).items():
            self.add_module(name, module)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        reader: CheckpointReader | None = None) -> Step3ForConditionalGeneration:
        """Build from shapes on the meta device, then the weight pass: every tensor from the
        (lazy) checkpoint reader, quantized weights dequantized on read. Strict: the checkpoint
        must match config."""
        reader = reader or CheckpointReader(path)
        reader.check()
        with torch.device("meta"):
            model = cls(reader.cfg)
        return load_weights(model, lambda name: reader.read(name, dtype))

    # ------------------------------------------------------------------ pieces
    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def encode_images(self, images: list) -> torch.Tensor:
        """Vision features for a list of ImageViews, in token order (`vision.encode_images`)."""
        heads = (self.vit_downsampler, self.vit_downsampler2, self.vit_large_projector)
        return encode_images(images, self.vision_model, heads, self.dtype)

    def embed(self, input_ids: torch.Tensor, images: list | None = None) -> torch.Tensor:
        """Token embeddings with image features written at the `<im_patch>` positions."""
        return embed_with_images(self.model.embed_tokens, input_ids,
                                 self.config.image_token_id, images, self.encode_images)

    def forward(self, input_ids: torch.Tensor, images: list | None = None,
                cache: KVCache | None = None, key_valid: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab]. With `cache`, the tokens continue after `cache.length`.
        `key_valid` [B, past+T] marks non-padding slots (left-padded batches)."""
        tc = self.config.text_config
        h = inputs_embeds if inputs_embeds is not None else self.embed(input_ids, images)
        b, t = h.shape[:2]
        past = cache.length if cache is not None else 0
        if key_valid is None:
            key_valid = torch.ones(b, past + t, dtype=torch.bool, device=h.device)
        if past + t > tc.max_context:
            raise PromptError(f"{past + t} tokens exceed the context of {tc.max_context}",
                              "shorten the prompt or lower max_new_tokens")
        positions = (key_valid.long().cumsum(-1) - 1).clamp(min=0)[:, past:]   # [B, T]
        cos, sin = rope_cos_sin(positions, tc.head_dim, tc.rope_theta, tc.rope_factor)
        mask = attention_mask(positions, key_valid, past)
        for layer in self.model.layers:
            h = layer(h, cos, sin, mask, cache)
        if cache is not None:
            cache.length += t
        return self.lm_head(self.model.norm(h))

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 16,
                 images: list | None = None, sampling: SamplingParams | None = None,
                 stop_token_ids: tuple[int, ...] = (), key_valid: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Prefill then decode with a KV cache; greedy unless `sampling` says otherwise.
        Returns [B, T + new] (rows that stopped early are padded with their stop token)."""
        sampling = sampling or SamplingParams()
        b, t = input_ids.shape
        cache = KVCache(self.config.text_config, b, t + max_new_tokens, self.dtype)
        valid = key_valid if key_valid is not None else torch.ones(b, t, dtype=torch.bool)
        logits = self(input_ids, images, cache=cache, key_valid=valid)[:, -1]
        out, done = [input_ids], torch.zeros(b, dtype=torch.bool)
        stops = torch.tensor(stop_token_ids, dtype=torch.long)
        for step in range(max_new_tokens):
            nxt = sample_next(logits.float(), sampling, generator)     # [B]
            nxt = torch.where(done, out[-1][:, -1], nxt)                # finished rows repeat
            out.append(nxt[:, None])
            done |= torch.isin(nxt, stops)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            valid = torch.cat([valid, torch.ones(b, 1, dtype=torch.bool)], dim=1)
            logits = self(nxt[:, None], cache=cache, key_valid=valid)[:, -1]
        return torch.cat(out, dim=1)
