"""Config presets in config.json form: `full` is the real Step3 (planning only), `mini` is the
benchmark size with the real structure, `tiny` runs in seconds for tests."""

from __future__ import annotations

from typing import Any


def _vl(text: dict[str, Any], vision: dict[str, Any]) -> dict[str, Any]:
    return {
        "architectures": ["Step3VLForConditionalGeneration"],
        "model_type": "step3_vl",
        "hidden_size": text["hidden_size"],
        "image_token_id": 128001,
        "understand_projector_stride": 2,
        "projector_bias": True,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "text_config": {"model_type": "step3_text",
                        "architectures": ["Step3TextForCausalLM"],
                        "num_attention_groups": 1, "moe_top_k": 3, "norm_expert_weight": False,
                        "rope_theta": 500000.0, "rope_scaling": None,
                        "max_position_embedding": 65536, "max_seq_len": 65536,
                        "vocab_size": 128815, "rms_norm_eps": 1e-5, "hidden_act": "silu",
                        "bos_token_id": 0, "eos_token_id": 1, **text},
        "vision_config": {"model_type": "step3_vision_encoder", "patch_size": 14,
                          "image_size": 728, "num_channels": 3, "hidden_act": "quick_gelu",
                          "layer_norm_eps": 1e-5, "enable_patch": True, **vision},
    }


def _moe_enum(first: int, last: int) -> str:
    return ",".join(str(i) for i in range(first, last + 1))


PRESETS: dict[str, dict[str, Any]] = {
    "full": _vl(
        {"hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 64,
         "head_dim": 256, "share_q_dim": 2048, "intermediate_size": 18432,
         "moe_num_experts": 48, "moe_intermediate_size": 5120, "share_expert_dim": 5120,
         "moe_layers_enum": _moe_enum(4, 59)},
        {"hidden_size": 1792, "num_hidden_layers": 63, "num_attention_heads": 16,
         "intermediate_size": 15360, "output_hidden_size": 4096}),
    # ~250M parameters: 48 experts top-3, shared expert, dense first and last layer.
    "mini": _vl(
        {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
         "head_dim": 64, "share_q_dim": 256, "intermediate_size": 1536,
         "moe_num_experts": 48, "moe_intermediate_size": 256, "share_expert_dim": 256,
         "moe_layers_enum": _moe_enum(1, 6)},
        {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
         "intermediate_size": 1024, "output_hidden_size": 512}),
    # Seconds. Several dims are not multiples of 128, so block-fp8 has partial edge blocks.
    "tiny": _vl(
        {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
         "head_dim": 32, "share_q_dim": 64, "intermediate_size": 320,
         "moe_num_experts": 8, "moe_intermediate_size": 96, "share_expert_dim": 96,
         "moe_layers_enum": "1,2"},
        {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "intermediate_size": 64, "output_hidden_size": 32}),
}


def full_slice(layers: int, experts: int | None = None, vision_layers: int | None = None,
               dense_layers: int = 1) -> dict[str, Any]:
    """The real Step3 config reduced only in depth and expert count: a real-width slice.

    Every width stays the real one (hidden 7168, 64 heads of 256, experts of 5120, vocabulary
    128,815, ViT width 1792). The first `dense_layers` decoder layers are dense, as the real
    model's first layers are, and the rest are MoE with `experts` experts each (default the
    real 48); the ViT keeps `vision_layers` of its 63 layers (default 2).
    """
    from step3_edge.errors import ConfigError

    full = PRESETS["full"]
    t, v = full["text_config"], full["vision_config"]
    experts = t["moe_num_experts"] if experts is None else experts
    vision_layers = 2 if vision_layers is None else vision_layers
    checks = [
        (1 <= layers <= t["num_hidden_layers"], f"--layers {layers}",
         f"pass 1 to {t['num_hidden_layers']} decoder layers"),
        (0 <= dense_layers <= layers, f"--dense-layers {dense_layers}",
         f"pass 0 to {layers} (the leading dense layers of the slice)"),
        (t["moe_top_k"] <= experts <= t["moe_num_experts"], f"--experts {experts}",
         f"pass {t['moe_top_k']} (the router's top-k) to {t['moe_num_experts']}"),
        (1 <= vision_layers <= v["num_hidden_layers"], f"--vision-layers {vision_layers}",
         f"pass 1 to {v['num_hidden_layers']}"),
    ]
    for ok, what, remedy in checks:
        if not ok:
            raise ConfigError(f"{what} is out of range for a slice of Step3", remedy)
    return _vl({**t, "num_hidden_layers": layers, "moe_num_experts": experts,
                "moe_layers_enum": _moe_enum(dense_layers, layers - 1)},
               {**v, "num_hidden_layers": vision_layers})
