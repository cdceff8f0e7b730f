"""The layout of the HF checkpoints stepfun-ai/step3 and step3-fp8: every tensor name, its
shape and its role.

This table is the single source of truth for what a Step3 checkpoint holds; the synthetic
writer, the reader's reconciliation, the reference model and the quantize recipe all use it.
"""

from __future__ import annotations

from dataclasses import dataclass

from step3_edge.config import Step3Config


@dataclass(frozen=True)
class WeightSpec:
    name: str
    shape: tuple[int, ...]
    role: str  # attn | mlp | shared_expert | experts | router | norm | embed | lm_head | vision

    @property
    def is_linear(self) -> bool:
        """Linear weights that step3-fp8 stores as block fp8."""
        return self.role in ("attn", "mlp", "shared_expert", "experts") and len(self.shape) >= 2


def text_layer_weights(cfg: Step3Config, layer: int) -> list[WeightSpec]:
    t = cfg.text_config
    h, p = t.hidden_size, f"model.layers.{layer}."
    out = [
        WeightSpec(p + "input_layernorm.weight", (h,), "norm"),
        WeightSpec(p + "self_attn.q_proj.weight", (t.share_q_dim, h), "attn"),
        WeightSpec(p + "self_attn.k_proj.weight", (t.head_dim, h), "attn"),
        WeightSpec(p + "self_attn.v_proj.weight", (t.head_dim, h), "attn"),
        WeightSpec(p + "self_attn.inter_norm.weight", (t.share_q_dim,), "norm"),
        WeightSpec(p + "self_attn.wq.weight",
                   (t.num_attention_heads * t.head_dim, t.share_q_dim), "attn"),
        WeightSpec(p + "self_attn.o_proj.weight", (h, t.num_attention_heads * t.head_dim),
                   "attn"),
        WeightSpec(p + "post_attention_layernorm.weight", (h,), "norm"),
    ]
    if t.is_moe(layer):
        e, m, s = t.moe_num_experts, t.moe_intermediate_size, t.share_expert_dim
        out += [
            WeightSpec(p + "moe.gate.weight", (e, h), "router"),
            WeightSpec(p + "moe.gate_proj.weight", (e, m, h), "experts"),
            WeightSpec(p + "moe.up_proj.weight", (e, m, h), "experts"),
            WeightSpec(p + "moe.down_proj.weight", (e, h, m), "experts"),
            WeightSpec(p + "share_expert.gate_proj.weight", (s, h), "shared_expert"),
            WeightSpec(p + "share_expert.up_proj.weight", (s, h), "shared_expert"),
            WeightSpec(p + "share_expert.down_proj.weight", (h, s), "shared_expert"),
        ]
    else:
        i = t.intermediate_size
        out += [
            WeightSpec(p + "mlp.gate_proj.weight", (i, h), "mlp"),
            WeightSpec(p + "mlp.up_proj.weight", (i, h), "mlp"),
            WeightSpec(p + "mlp.down_proj.weight", (h, i), "mlp"),
        ]
    return out


def vision_weights(cfg: Step3Config) -> list[WeightSpec]:
    v = cfg.vision_config
    w, iv, o = v.hidden_size, v.intermediate_size, v.output_hidden_size
    grid = v.image_size // v.patch_size
    out = [
        WeightSpec("vision_model.embeddings.class_embedding", (1, w), "vision"),
        WeightSpec("vision_model.embeddings.patch_embedding.weight",
                   (w, v.num_channels, v.patch_size, v.patch_size), "vision"),
        WeightSpec("vision_model.embeddings.patch_embedding.bias", (w,), "vision"),
        WeightSpec("vision_model.embeddings.position_embedding.weight", (grid * grid + 1, w),
                   "vision"),
    ]
    for n in range(v.num_hidden_layers):
        p = f"vision_model.transformer.layers.{n}."
        out += [
            WeightSpec(p + "self_attn.qkv_proj.weight", (3 * w, w), "vision"),
            WeightSpec(p + "self_attn.qkv_proj.bias", (3 * w,), "vision"),
            WeightSpec(p + "self_attn.out_proj.weight", (w, w), "vision"),
            WeightSpec(p + "self_attn.out_proj.bias", (w,), "vision"),
            WeightSpec(p + "layer_norm1.weight", (w,), "vision"),
            WeightSpec(p + "layer_norm1.bias", (w,), "vision"),
            WeightSpec(p + "mlp.fc1.weight", (iv, w), "vision"),
            WeightSpec(p + "mlp.fc1.bias", (iv,), "vision"),
            WeightSpec(p + "mlp.fc2.weight", (w, iv), "vision"),
            WeightSpec(p + "mlp.fc2.bias", (w,), "vision"),
            WeightSpec(p + "layer_norm2.weight", (w,), "vision"),
            WeightSpec(p + "layer_norm2.bias", (w,), "vision"),
        ]
    out += [
        WeightSpec("vit_downsampler.weight", (o, w, 2, 2), "vision"),
        WeightSpec("vit_downsampler.bias", (o,), "vision"),
        WeightSpec("vit_downsampler2.weight", (2 * o, o, 3, 3), "vision"),
        WeightSpec("vit_downsampler2.bias", (2 * o,), "vision"),
        WeightSpec("vit_large_projector.weight", (cfg.text_config.hidden_size, 2 * o), "vision"),
    ]
    if cfg.projector_bias:
        out.append(WeightSpec("vit_large_projector.bias", (cfg.text_config.hidden_size,),
                              "vision"))
    return out


def expected_weights(cfg: Step3Config, vision: bool = True) -> dict[str, WeightSpec]:
    """Every tensor of a Step3 checkpoint (without quantization side tensors), in file order."""
    t = cfg.text_config
    specs = [WeightSpec("model.embed_tokens.weight", (t.vocab_size, t.hidden_size), "embed")]
    for layer in range(t.num_hidden_layers):
        specs += text_layer_weights(cfg, layer)
    specs += [WeightSpec("model.norm.weight", (t.hidden_size,), "norm"),
              WeightSpec("lm_head.weight", (t.vocab_size, t.hidden_size), "lm_head")]
    if vision:
        specs += vision_weights(cfg)
    return {s.name: s for s in specs}


def layer_of(name: str) -> int | None:
    """Decoder layer index of a `model.layers.L.*` name, else None."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2])
    return None
