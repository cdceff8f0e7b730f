"""Step3Config: the one place where config.json is parsed (the HF config; docs/model.md).

Every field is read from config.json when present. A field that is absent falls back to the
default of the vLLM/SGLang config classes, except where the published model shows that default
is wrong (`understand_projector_stride`, vision `intermediate_size`); each fallback used is
recorded in `Step3Config.fallbacks` so tools can say which numbers were not read from the
checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from step3_edge.errors import ConfigError
from step3_edge.config_schema import (CROP_SIDE, DTYPES, MAX_DIM, MAX_TENSOR_ELEMS,
                                      SUPPORTED_ROPE, TEXT_FIELDS, TOP_FIELDS,
                                      VISION_FIELDS, Problems, check_quantization,
                                      parse_moe_layers, positive, read_fields)
from step3_edge.fsutil import confined, read_json

@dataclass(frozen=True)
class Step3TextConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_attention_groups: int
    head_dim: int
    share_q_dim: int
    intermediate_size: int
    moe_num_experts: int
    moe_top_k: int
    moe_intermediate_size: int
    share_expert_dim: int
    moe_layers: tuple[int, ...]
    norm_expert_weight: bool
    rope_theta: float
    rope_scaling: dict | None
    max_position_embedding: int
    max_seq_len: int
    vocab_size: int
    rms_norm_eps: float
    hidden_act: str
    bos_token_id: int
    eos_token_id: int

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    @property
    def dense_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if i not in self.moe_layers)

    @property
    def max_context(self) -> int:
        return min(self.max_position_embedding, self.max_seq_len)

    @property
    def rope_factor(self) -> float:
        if not self.rope_scaling:
            return 1.0
        return float(self.rope_scaling.get("factor", 1.0))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("moe_layers")
        d["moe_layers_enum"] = ",".join(str(i) for i in self.moe_layers)
        d["model_type"] = "step3_text"
        d["architectures"] = ["Step3TextForCausalLM"]
        return d


@dataclass(frozen=True)
class Step3VisionConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int
    image_size: int
    num_channels: int
    hidden_act: str
    layer_norm_eps: float
    output_hidden_size: int
    intermediate_size: int
    enable_patch: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "model_type": "step3_vision_encoder"}


@dataclass(frozen=True)
class Step3Config:
    text_config: Step3TextConfig
    vision_config: Step3VisionConfig
    image_token_id: int
    understand_projector_stride: int
    projector_bias: bool
    tie_word_embeddings: bool
    torch_dtype: str
    quantization_config: dict | None = None
    # names ("text_config.rope_theta", ...) of the fields config.json did not hold
    fallbacks: tuple[str, ...] = field(default=(), compare=False)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, path: str | Path) -> Step3Config:
        """Read `config.json` from a checkpoint or bundle folder (or the file itself)."""
        p = Path(path)
        f = confined(p, "config.json", ConfigError) if p.is_dir() else p
        if not f.is_file():
            raise ConfigError(f"no config.json at {p}", "point --model at a Step3 checkpoint "
                              "folder (it holds config.json and *.safetensors)")
        data = read_json(f, ConfigError, "restore config.json from the original checkpoint")
        return cls.from_dict(data, str(f))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config.json") -> Step3Config:
        """Build and validate a config from config.json's content: every field's type and
        range and every derived constraint are checked in one pass, and all bad fields are
        named in one ConfigError (`source` names the file in the message)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source} must hold a JSON object, got {type(data).__name__}",
                              "restore config.json from the original checkpoint")
        mt = data.get("model_type", "step3_vl")
        if mt not in ("step3_vl", "step3_text"):
            raise ConfigError(f"{source}: model_type is {mt!r}, expected 'step3_vl'",
                              "this tool reads stepfun-ai/step3 and step3-fp8 checkpoints only")
        fallbacks: list[str] = []
        p = Problems(source)
        text_src = data.get("text_config", data if mt == "step3_text" else None)
        if not isinstance(text_src, dict):
            raise ConfigError(f"{source} has no 'text_config' object",
                              "a step3_vl config.json nests the LLM fields under text_config")
        vis_src = data.get("vision_config", {})
        if not isinstance(vis_src, dict):
            raise ConfigError(f"{source}: 'vision_config' is {type(vis_src).__name__}, "
                              "expected an object", "restore config.json")
        text = _read_text(text_src, fallbacks, p)
        vision = read_fields(vis_src, VISION_FIELDS, "vision_config", fallbacks, p)
        top = read_fields(data, TOP_FIELDS, "", fallbacks, p)
        p.check(not top["tie_word_embeddings"], "tie_word_embeddings", True,
                "false (Step3 has a separate lm_head; ship lm_head.weight)")
        p.check(top["understand_projector_stride"] == 2, "understand_projector_stride",
                top["understand_projector_stride"],
                "2 (Step3's 169 tokens per 728 px image need stride 2, as in vLLM's step3_vl)")
        hs = data.get("hidden_size", text.hidden_size)
        p.check(hs == text.hidden_size, "hidden_size", hs,
                f"text_config.hidden_size ({text.hidden_size})")
        qc = data.get("quantization_config")
        check_quantization(qc, p)
        p.raise_if_any()
        cfg = cls(text_config=text, vision_config=Step3VisionConfig(**vision),
                  quantization_config=qc, fallbacks=tuple(fallbacks), **top)
        cfg.validate(source)
        return cfg

    @classmethod
    def preset(cls, name: str) -> Step3Config:
        from step3_edge.presets import PRESETS

        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}", f"choose one of {sorted(PRESETS)}")
        return cls.from_dict(PRESETS[name], f"preset {name!r}")

    def with_quantization(self, qc: dict | None) -> Step3Config:
        return replace(self, quantization_config=qc)

    # ----------------------------------------------------------------- output
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": ["Step3VLForConditionalGeneration"],
            "model_type": "step3_vl",
            "hidden_size": self.text_config.hidden_size,
            "image_token_id": self.image_token_id,
            "understand_projector_stride": self.understand_projector_stride,
            "projector_bias": self.projector_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.torch_dtype,
            "text_config": self.text_config.to_dict(),
            "vision_config": self.vision_config.to_dict(),
        }
        if self.quantization_config is not None:
            d["quantization_config"] = self.quantization_config
        return d

    def save(self, folder: str | Path) -> None:
        Path(folder, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    # ----------------------------------------------------------------- checks
    def validate(self, source: str = "config.json") -> None:
        """The constraints between fields (divisibility, ids below the vocabulary, tensor
        sizes); raises one ConfigError naming every one that fails."""
        t, v, p = self.text_config, self.vision_config, Problems(source)
        p.check(t.num_attention_groups == 1, "text_config.num_attention_groups",
                t.num_attention_groups, "1 (Step3 MFA has one shared K/V head)")
        p.check(t.head_dim % 2 == 0, "text_config.head_dim", t.head_dim, "an even number (RoPE)")
        p.check(1 <= t.moe_top_k <= t.moe_num_experts, "text_config.moe_top_k", t.moe_top_k,
                f"1..moe_num_experts ({t.moe_num_experts})")
        p.check(t.hidden_act == "silu", "text_config.hidden_act", t.hidden_act, "'silu'")
        p.check(v.hidden_act == "quick_gelu", "vision_config.hidden_act", v.hidden_act,
                "'quick_gelu'")
        p.check(v.hidden_size % v.num_attention_heads == 0, "vision_config.hidden_size",
                v.hidden_size, f"a multiple of num_attention_heads ({v.num_attention_heads})")
        p.check(v.image_size % v.patch_size == 0 and v.image_size >= 2 * v.patch_size,
                "vision_config.image_size", v.image_size,
                f"a multiple of patch_size ({v.patch_size}), at least 2 patches wide")
        p.check(2 * v.patch_size <= CROP_SIDE, "vision_config.patch_size", v.patch_size,
                f"at most {CROP_SIDE // 2} (a {CROP_SIDE} px crop must span 2 patches)")
        p.check(v.num_channels == 3, "vision_config.num_channels", v.num_channels, "3 (RGB)")
        for name, tid in (("image_token_id", self.image_token_id),
                          ("text_config.bos_token_id", t.bos_token_id),
                          ("text_config.eos_token_id", t.eos_token_id)):
            p.check(tid < t.vocab_size, name, tid, f"an id below vocab_size ({t.vocab_size})")
        p.check(self.torch_dtype in DTYPES, "torch_dtype", self.torch_dtype,
                f"one of {DTYPES}")
        p.check(t.num_attention_heads * t.head_dim <= MAX_DIM, "text_config.num_attention_heads",
                t.num_attention_heads, f"heads x head_dim ({t.head_dim}) at most {MAX_DIM}")
        biggest = max((t.vocab_size * t.hidden_size, "vocab_size x hidden_size"),
                      (t.moe_num_experts * t.moe_intermediate_size * t.hidden_size,
                       "moe_num_experts x moe_intermediate_size x hidden_size"),
                      (t.num_attention_heads * t.head_dim * t.share_q_dim,
                       "num_attention_heads x head_dim x share_q_dim"),
                      (t.intermediate_size * t.hidden_size, "intermediate_size x hidden_size"),
                      (v.intermediate_size * v.hidden_size,
                       "vision intermediate_size x hidden_size"),
                      (((v.image_size // v.patch_size) ** 2 + 1) * v.hidden_size,
                       "vision position embeddings x hidden_size"))
        p.check(biggest[0] <= MAX_TENSOR_ELEMS, "text_config", biggest[1] + f" = {biggest[0]}",
                f"at most {MAX_TENSOR_ELEMS} values in one tensor")
        rs = t.rope_scaling or {}
        kind = rs.get("rope_type", rs.get("type", "default"))
        p.check(kind in SUPPORTED_ROPE, "text_config.rope_scaling", t.rope_scaling,
                f"null or a rope_type in {SUPPORTED_ROPE}")
        factor = rs.get("factor", 1.0)
        p.check(positive(factor), "text_config.rope_scaling.factor", factor,
                "a finite positive number")
        p.raise_if_any()

    # ----------------------------------------------------------------- derived numbers
    def text_param_counts(self) -> dict[str, int]:
        """Parameter counts of the LLM (316.3B total, 37.9B activated per token for the real
        config, as the Step3 model card says): total and activated per token."""
        t = self.text_config
        h = t.hidden_size
        attn = (h * t.share_q_dim + 2 * h * t.head_dim + t.share_q_dim
                + t.share_q_dim * t.num_attention_heads * t.head_dim
                + t.num_attention_heads * t.head_dim * h + 2 * h)
        dense = 3 * h * t.intermediate_size
        expert = 3 * h * t.moe_intermediate_size
        shared = 3 * h * t.share_expert_dim
        router = t.moe_num_experts * h
        n_moe, n_dense = len(t.moe_layers), t.num_hidden_layers - len(t.moe_layers)
        emb = t.vocab_size * h
        total = (2 * emb + t.num_hidden_layers * attn + n_dense * dense
                 + n_moe * (t.moe_num_experts * expert + shared + router) + h)
        active = (emb + t.num_hidden_layers * attn + n_dense * dense
                  + n_moe * (t.moe_top_k * expert + shared + router) + h)
        return {"total": total, "active": active, "active_with_embedding": active + emb,
                "attention_per_layer": attn, "expert": expert}

    def kv_bytes_per_token_per_layer(self, bytes_per_element: float) -> float:
        """One K and one V head per layer (MFA): 2 * head_dim elements."""
        return 2 * self.text_config.head_dim * bytes_per_element * self.text_config.num_attention_groups

    def vision_tokens(self, image_size: int) -> int:
        """Tokens one square view of `image_size` px gives after both stride-2 downsamplers."""
        g = image_size // self.vision_config.patch_size
        g = (g - 2) // 2 + 1                  # conv k2 s2 p0
        g = math.floor((g + 2 - 3) / 2) + 1   # conv k3 s2 p1
        return g * g


def _read_text(src: dict[str, Any], fallbacks: list[str], p: Problems) -> Step3TextConfig:
    src = dict(src)
    # transformers-v5 style rope block: {"rope_theta": ..., "rope_type": ...}
    rp = src.get("rope_parameters")
    if isinstance(rp, dict):
        src.setdefault("rope_theta", rp.get("rope_theta"))
        if rp.get("rope_type", "default") != "default":
            src.setdefault("rope_scaling", rp)
    vals = read_fields(src, TEXT_FIELDS, "text_config", fallbacks, p)
    n = vals["num_hidden_layers"]
    if "moe_layers_enum" in src:
        moe = parse_moe_layers(src["moe_layers_enum"], n)
    else:  # vLLM's fallback when the key is absent: every layer but the first is MoE
        moe = tuple(range(1, n))
        fallbacks.append("text_config.moe_layers_enum")
    return Step3TextConfig(moe_layers=moe, **vals)


def fallback_report(cfg: Step3Config) -> list[tuple[str, Any, str]]:
    """(field, value used, grade) for each field config.json did not hold."""
    grades = {f"text_config.{n}": g for n, _, g in TEXT_FIELDS}
    grades |= {f"vision_config.{n}": g for n, _, g in VISION_FIELDS}
    grades |= {n: g for n, _, g in TOP_FIELDS}
    grades["text_config.moe_layers_enum"] = "CODE: vLLM makes layers 1..n-1 MoE"
    out = []
    for name in cfg.fallbacks:
        obj: Any = cfg
        for part in name.split("."):
            obj = getattr(obj, "moe_layers" if part == "moe_layers_enum" else part)
        out.append((name, obj, grades.get(name, "")))
    return out
