"""The reference Step3 model in plain PyTorch (the Step3 paper's architecture,
as vLLM's step3_text / step3_vl implement it; docs/model.md). It is the oracle every exported,
quantized or offloaded path is compared with, so it follows that math to the letter and favours
clarity over speed. Module paths equal checkpoint names, so loading needs no rename table."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from step3_edge.checkpoint import CheckpointReader
from step3_edge.config import Step3Config, Step3TextConfig
from step3_edge.errors import PromptError
from step3_edge.sampling import SamplingParams, sample_next
from step3_edge.vision import (Step3VisionEncoder, build_vision_heads, crop_batches,
                               project_features)


class RMSNorm(nn.Module):
    """Llama-style RMSNorm computed in fp32; the weight multiplies directly (no 1+w)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) * weight in fp32, as one call (fewer ops per decode step)
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


# Queries per sequence up to which `mfa_attention` computes the scores directly.
DIRECT_QUERIES = 16
_MASKED = torch.finfo(torch.float32).min


def mfa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention of n query heads against MFA's one shared K/V head: q [B, n, T, d],
    k, v [B, S, d] (q's dtype or float32), boolean mask [B, 1, T, S] -> [B, n, T, d]; mask
    None means causal with the queries at the last T key slots (`attention_mask`).

    On the CPU, up to DIRECT_QUERIES queries (decode), the n*T query rows meet the single K
    head in one fp32 product [B, n*T, d] @ [B, d, S], with no per-head copies of K and V: ~5x
    faster than the CPU flash kernel at S = 500. Longer queries (prefill), and every call on an
    accelerator (one fused kernel launch instead of ~10), take scaled_dot_product_attention,
    which never holds the [T, S] score matrix."""
    b, n, t, d = q.shape
    s = k.shape[1]
    if t > DIRECT_QUERIES or q.device.type != "cpu":
        k = k.to(q.dtype)[:, None].expand(b, n, s, d)                     # no copies
        v = v.to(q.dtype)[:, None].expand(b, n, s, d)
        if mask is None and s > t and q.device.type == "cpu" and _FLASH_CPU is not None:
            return _causal_after_past(q, k, v, scale)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=causal_lower_right(t, s) if mask is None else mask, scale=scale)
    scores = torch.bmm(q.reshape(b, n * t, d).float() * scale, k.float().transpose(1, 2))
    scores = scores.view(b, n, t, s)
    if mask is None and t > 1:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    if mask is not None:
        # a finite floor, not -inf: a row with every key masked (left padding) then stays
        # finite, and its values cannot turn other rows' zero-weighted sums into NaN
        scores.masked_fill_(~mask, _MASKED)
    p = torch.softmax(scores, dim=-1).view(b, n * t, s)
    return torch.bmm(p, v.float()).view(b, n, t, d).to(q.dtype)


# torch's CPU flash kernel with its log-sum-exp (private; absent -> the masked SDPA call)
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _causal_after_past(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                       ) -> torch.Tensor:
    """A later prefill chunk (T queries after S - T cached keys, all valid) on the CPU: the
    cached keys unmasked and the chunk's own keys causal, as two flash calls merged by their
    log-sum-exp. The CPU kernel cannot skip blocks of a T < S lower-right causal mask, so
    this is ~1.4x one masked call (T = 2,048 after 1,952 cached keys: 124 -> 87 ms a layer)."""
    past = k.shape[2] - q.shape[2]
    o1, l1 = _FLASH_CPU(q, k[:, :, :past], v[:, :, :past], 0.0, False, scale=scale)
    o2, l2 = _FLASH_CPU(q, k[:, :, past:], v[:, :, past:], 0.0, True, scale=scale)
    lse = torch.logaddexp(l1, l2)                                        # [B, n, T] float32
    out = o1.float() * (l1 - lse).exp_()[..., None] + o2.float() * (l2 - lse).exp_()[..., None]
    return out.to(q.dtype)


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


class Step3Attention(nn.Module):
    """MFA: q_proj -> inter_norm -> wq (64 heads), one shared K and V head (Step3's MFA)."""

    def __init__(self, cfg: Step3TextConfig) -> None:
        super().__init__()
        h, d, n = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads
        self.cfg = cfg
        self.q_proj = nn.Linear(h, cfg.share_q_dim, bias=False)
        self.k_proj = nn.Linear(h, d, bias=False)
        self.v_proj = nn.Linear(h, d, bias=False)
        self.inter_norm = RMSNorm(cfg.share_q_dim, cfg.rms_norm_eps)
        self.wq = nn.Linear(cfg.share_q_dim, n * d, bias=False)
        self.o_proj = nn.Linear(n * d, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        b, t, _ = x.shape
        n, d = self.cfg.num_attention_heads, self.cfg.head_dim
        q = self.wq(self.inter_norm(self.q_proj(x))).view(b, t, n, d).transpose(1, 2)  # [B,n,T,d]
        k = self.k_proj(x)[:, None]                                                 # [B,1,T,d]
        v = self.v_proj(x)                                                          # [B,T,d]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)[:, 0]
        if cache is not None:
            k, v = cache.update(layer, k, v)                                        # [B,S,d]
        out = mfa_attention(q, k, v, mask, d ** -0.5)                               # [B,n,T,d]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, n * d))


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
    """Routed experts, stored stacked [E, out, in] as in the HF checkpoint."""

    def __init__(self, cfg: Step3TextConfig) -> None:
        super().__init__()
        e, m, h = cfg.moe_num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.cfg = cfg
        self.gate = nn.Linear(h, e, bias=False)                       # the router
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
    def __init__(self, cfg: Step3TextConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.is_moe = cfg.is_moe(layer)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Step3Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if self.is_moe:
            self.moe = Step3MoE(cfg)
            self.share_expert = Step3MLP(cfg.hidden_size, cfg.share_expert_dim)
        else:
            self.mlp = Step3MLP(cfg.hidden_size, cfg.intermediate_size)

    def attention_side(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       mask: torch.Tensor, cache: KVCache | None
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
                mask: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
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
        """Build on the meta device and assign every tensor from the (lazy) checkpoint reader;
        quantized weights are dequantized on read. Strict: the checkpoint must match config."""
        reader = reader or CheckpointReader(path)
        reader.check()
        with torch.device("meta"):
            model = cls(reader.cfg)
        state = {name: reader.read(name, dtype) for name in model.state_dict()}
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval().requires_grad_(False)

    # ------------------------------------------------------------------ pieces
    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def encode_images(self, images: list) -> torch.Tensor:
        """Vision features for a list of ImageViews, in token order: for each image its crops
        (raster order, `CROPS_PER_CALL` per tower call) then its global view.
        -> [n_image_tokens, hidden]."""
        heads = (self.vit_downsampler, self.vit_downsampler2, self.vit_large_projector)
        feats = []
        for views in images:
            for crops in crop_batches(views.crops):
                f = project_features(self.vision_model(crops.to(self.dtype)), *heads)
                feats.append(f.reshape(-1, f.shape[-1]))                # [n*81, h]
            g = project_features(self.vision_model(views.global_view[None].to(self.dtype)),
                                 *heads)
            feats.append(g[0])                                          # [169, h]
        return torch.cat(feats)

    def embed(self, input_ids: torch.Tensor, images: list | None = None) -> torch.Tensor:
        """Token embeddings with image features written at the `<im_patch>` positions."""
        x = self.model.embed_tokens(input_ids)                          # [B, T, h]
        slots = input_ids == self.config.image_token_id
        n_slots = int(slots.sum())
        if not images:
            if n_slots:
                raise PromptError(f"the prompt holds {n_slots} <im_patch> tokens but no image",
                                  "pass the images, or remove the image placeholders")
            return x
        feats = self.encode_images(images)
        if feats.shape[0] != n_slots:
            raise PromptError(f"{feats.shape[0]} image features for {n_slots} <im_patch> "
                              "tokens", "build the prompt with Step3Processor so each image "
                              "placeholder is expanded to its token layout")
        x = x.clone()
        x[slots] = feats.to(x.dtype)
        return x

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
