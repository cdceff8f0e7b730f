"""Step3Config: the one place where config.json is parsed (spec §1).

Every field is read from config.json when present. A field that is absent falls back to the
default of the vLLM/SGLang config classes, except where the spec shows that default is wrong
(`understand_projector_stride`, vision `intermediate_size`); each fallback used is recorded in
`Step3Config.fallbacks` so tools can say which numbers were not read from the checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from step3_edge.errors import ConfigError

# (field, fallback, grade) — grade says why the fallback is what it is (spec §1.2).
_TEXT_FIELDS: tuple[tuple[str, Any, str], ...] = (
    ("hidden_size", 7168, "CONFIRMED"),
    ("num_hidden_layers", 61, "CONFIRMED"),
    ("num_attention_heads", 64, "CONFIRMED"),
    ("num_attention_groups", 1, "CONFIRMED"),
    ("head_dim", 256, "CONFIRMED"),
    ("share_q_dim", 2048, "CONFIRMED"),
    ("intermediate_size", 18432, "CODE default"),
    ("moe_num_experts", 48, "CONFIRMED"),
    ("moe_top_k", 3, "CONFIRMED"),
    ("moe_intermediate_size", 5120, "CODE default"),
    ("share_expert_dim", 5120, "CODE default"),
    ("norm_expert_weight", False, "CODE default, UNCONFIRMED"),
    ("rope_theta", 500000.0, "CODE default, UNCONFIRMED"),
    ("rope_scaling", None, "CODE default, UNCONFIRMED"),
    ("max_position_embedding", 65536, "CODE default"),
    ("max_seq_len", 65536, "CODE default"),
    ("vocab_size", 128815, "CODE default"),
    ("rms_norm_eps", 1e-5, "CODE default, UNCONFIRMED"),
    ("hidden_act", "silu", "CODE"),
    ("bos_token_id", 0, "UNCONFIRMED: DeepSeek-V3 <｜begin▁of▁sentence｜>"),
    ("eos_token_id", 1, "UNCONFIRMED: DeepSeek-V3 <｜end▁of▁sentence｜>"),
)

_VISION_FIELDS: tuple[tuple[str, Any, str], ...] = (
    ("hidden_size", 1792, "CODE default"),
    ("num_hidden_layers", 63, "CODE default"),
    ("num_attention_heads", 16, "CODE default"),
    ("patch_size", 14, "CODE default"),
    ("image_size", 728, "CODE default"),
    ("num_channels", 3, "CODE default"),
    ("hidden_act", "quick_gelu", "CODE default"),
    ("layer_norm_eps", 1e-5, "vLLM default; SGLang hard-codes 1e-6, UNCONFIRMED"),
    ("output_hidden_size", 4096, "CODE default"),
    # vLLM/SGLang default 3072 is a CLIP-B leftover; 15360 matches 321B / 642 GB (spec §1.3).
    ("intermediate_size", 15360, "DERIVED, UNCONFIRMED (class default 3072 is wrong)"),
    ("enable_patch", True, "CODE default"),
)

_TOP_FIELDS: tuple[tuple[str, Any, str], ...] = (
    ("image_token_id", 128001, "CODE default"),
    # class default 1 cannot give 169 tokens per 728 px image (spec §1.1).
    ("understand_projector_stride", 2, "DERIVED (class default 1 is wrong)"),
    ("projector_bias", True, "CODE default, UNCONFIRMED"),
    ("tie_word_embeddings", False, "CODE"),
    ("torch_dtype", "bfloat16", "UNCONFIRMED"),
)

_SUPPORTED_ROPE = ("default", "linear")


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
        f = p / "config.json" if p.is_dir() else p
        if not f.is_file():
            raise ConfigError(f"no config.json at {p}", "point --model at a Step3 checkpoint "
                              "folder (it holds config.json and *.safetensors)")
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{f} is not valid JSON: {e}",
                              "restore config.json from the original checkpoint") from e
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Step3Config:
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object, got {type(data).__name__}",
                              "restore config.json from the original checkpoint")
        mt = data.get("model_type", "step3_vl")
        if mt not in ("step3_vl", "step3_text"):
            raise ConfigError(f"model_type is {mt!r}, expected 'step3_vl'",
                              "this tool reads stepfun-ai/step3 and step3-fp8 checkpoints only")
        fallbacks: list[str] = []
        text_src = data.get("text_config", data if mt == "step3_text" else None)
        if not isinstance(text_src, dict):
            raise ConfigError("config.json has no 'text_config' object",
                              "a step3_vl config.json nests the LLM fields under text_config")
        text = _read_text(text_src, fallbacks)
        vis_src = data.get("vision_config", {})
        if not isinstance(vis_src, dict):
            raise ConfigError("'vision_config' must be an object", "restore config.json")
        vision = _read_fields(vis_src, _VISION_FIELDS, "vision_config", fallbacks)
        top = _read_fields(data, _TOP_FIELDS, "", fallbacks)
        if top["tie_word_embeddings"]:
            raise ConfigError("tie_word_embeddings is true, but Step3 has a separate lm_head",
                              "set tie_word_embeddings to false and ship lm_head.weight")
        if int(top["understand_projector_stride"]) != 2:
            raise ConfigError(
                f"understand_projector_stride is {top['understand_projector_stride']}, expected 2",
                "Step3's 169 tokens per 728 px image need stride 2 (spec §1.1); fix config.json")
        qc = data.get("quantization_config")
        if qc is not None and not isinstance(qc, dict):
            raise ConfigError("quantization_config must be an object", "restore config.json")
        cfg = cls(
            text_config=text,
            vision_config=Step3VisionConfig(**vision),
            quantization_config=qc,
            fallbacks=tuple(fallbacks),
            **top,
        )
        cfg.validate()
        return cfg

    @classmethod
    def preset(cls, name: str) -> Step3Config:
        from step3_edge.presets import PRESETS

        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}", f"choose one of {sorted(PRESETS)}")
        return cls.from_dict(PRESETS[name])

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
    def validate(self) -> None:
        t, v = self.text_config, self.vision_config
        _require(t.num_attention_groups == 1, "text_config.num_attention_groups",
                 t.num_attention_groups, "1 (Step3 MFA has one shared K/V head)")
        _require(t.head_dim % 2 == 0, "text_config.head_dim", t.head_dim, "an even number (RoPE)")
        _require(1 <= t.moe_top_k <= t.moe_num_experts, "text_config.moe_top_k", t.moe_top_k,
                 f"1..moe_num_experts ({t.moe_num_experts})")
        _require(t.hidden_act == "silu", "text_config.hidden_act", t.hidden_act, "'silu'")
        _require(v.hidden_act == "quick_gelu", "vision_config.hidden_act", v.hidden_act,
                 "'quick_gelu'")
        _require(v.hidden_size % v.num_attention_heads == 0, "vision_config.hidden_size",
                 v.hidden_size, f"a multiple of num_attention_heads ({v.num_attention_heads})")
        _require(v.image_size % v.patch_size == 0, "vision_config.image_size", v.image_size,
                 f"a multiple of patch_size ({v.patch_size})")
        _require(0 <= self.image_token_id < t.vocab_size, "image_token_id", self.image_token_id,
                 f"an id below vocab_size ({t.vocab_size})")
        for name, value in (("hidden_size", t.hidden_size), ("num_hidden_layers",
                            t.num_hidden_layers), ("vocab_size", t.vocab_size)):
            _require(value > 0, f"text_config.{name}", value, "a positive integer")
        kind = (t.rope_scaling or {}).get("rope_type", (t.rope_scaling or {}).get("type",
                                                                                  "default"))
        _require(kind in _SUPPORTED_ROPE, "text_config.rope_scaling", t.rope_scaling,
                 f"None or a rope_type in {_SUPPORTED_ROPE}")

    # ----------------------------------------------------------------- derived numbers
    def text_param_counts(self) -> dict[str, int]:
        """Parameter counts of the LLM (spec §1.4): total and activated per token."""
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


def _require(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config field {name} is {value!r}, expected {expected}",
                          "fix config.json (compare with stepfun-ai/step3's config)")


def _read_fields(src: dict[str, Any], spec: tuple[tuple[str, Any, str], ...], where: str,
                 fallbacks: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, default, _grade in spec:
        if name in src and (src[name] is not None or default is None):
            value = src[name]
        else:
            value = default
            fallbacks.append(f"{where}.{name}" if where else name)
        out[name] = _coerce(value, default, f"{where}.{name}" if where else name)
    return out


def _coerce(value: Any, default: Any, name: str) -> Any:
    if default is None:
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"config field {name} must be an object or null, got {value!r}",
                              "fix config.json")
        return value
    kind = type(default)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config field {name} is {value!r}, expected true or false",
                              "fix config.json")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config field {name} is {value!r}, expected an integer",
                              "fix config.json")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config field {name} is {value!r}, expected a number",
                              "fix config.json")
        return float(value)
    if not isinstance(value, kind):
        raise ConfigError(f"config field {name} is {value!r}, expected a {kind.__name__}",
                          "fix config.json")
    return value


def parse_moe_layers(raw: Any, num_layers: int) -> tuple[int, ...]:
    """`moe_layers_enum` is a comma-separated string, e.g. "4,5,...,59" (spec §1.2)."""
    if not isinstance(raw, str):
        raise ConfigError(
            f"text_config.moe_layers_enum is {raw!r} ({type(raw).__name__}), expected a "
            "comma-separated string such as \"4,5,6\"",
            "write it as a string: vLLM and SGLang call .strip().split(',') on it")
    try:
        layers = tuple(int(p) for p in raw.strip().split(",") if p.strip())
    except ValueError as e:
        raise ConfigError(f"text_config.moe_layers_enum {raw!r} holds a non-integer entry",
                          "list layer indices separated by commas, e.g. \"4,5,6\"") from e
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or len(set(layers)) != len(layers):
        raise ConfigError(f"text_config.moe_layers_enum {raw!r} has out-of-range or repeated "
                          f"layers {bad}", f"use distinct indices in 0..{num_layers - 1}")
    return tuple(sorted(layers))


def _read_text(src: dict[str, Any], fallbacks: list[str]) -> Step3TextConfig:
    src = dict(src)
    # transformers-v5 style rope block: {"rope_theta": ..., "rope_type": ...}
    rp = src.get("rope_parameters")
    if isinstance(rp, dict):
        src.setdefault("rope_theta", rp.get("rope_theta"))
        if rp.get("rope_type", "default") != "default":
            src.setdefault("rope_scaling", rp)
    vals = _read_fields(src, _TEXT_FIELDS, "text_config", fallbacks)
    n = vals["num_hidden_layers"]
    if "moe_layers_enum" in src:
        moe = parse_moe_layers(src["moe_layers_enum"], n)
    else:  # vLLM's fallback when the key is absent: every layer but the first is MoE
        moe = tuple(range(1, n))
        fallbacks.append("text_config.moe_layers_enum")
    return Step3TextConfig(moe_layers=moe, **vals)


def fallback_report(cfg: Step3Config) -> list[tuple[str, Any, str]]:
    """(field, value used, grade) for each field config.json did not hold."""
    grades = {f"text_config.{n}": g for n, _, g in _TEXT_FIELDS}
    grades |= {f"vision_config.{n}": g for n, _, g in _VISION_FIELDS}
    grades |= {n: g for n, _, g in _TOP_FIELDS}
    grades["text_config.moe_layers_enum"] = "CODE: vLLM makes layers 1..n-1 MoE"
    out = []
    for name in cfg.fallbacks:
        obj: Any = cfg
        for part in name.split("."):
            obj = getattr(obj, "moe_layers" if part == "moe_layers_enum" else part)
        out.append((name, obj, grades.get(name, "")))
    return out
