"""config.json's fields: each one's fallback and grade (docs/model.md), type and range, and the
check of `quantization_config`. `Step3Config` (step3_edge.config) builds on these."""

from __future__ import annotations

import math
from typing import Any

from step3_edge.errors import ConfigError

# (field, fallback, grade) — grade says why the fallback is what it is: CONFIRMED
# by the model card or the Step3 paper, CODE from vLLM's / SGLang's step3_vl config classes,
# DERIVED from published totals, UNCONFIRMED where no published source gives it.
TEXT_FIELDS: tuple[tuple[str, Any, str], ...] = (
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

VISION_FIELDS: tuple[tuple[str, Any, str], ...] = (
    ("hidden_size", 1792, "CODE default"),
    ("num_hidden_layers", 63, "CODE default"),
    ("num_attention_heads", 16, "CODE default"),
    ("patch_size", 14, "CODE default"),
    ("image_size", 728, "CODE default"),
    ("num_channels", 3, "CODE default"),
    ("hidden_act", "quick_gelu", "CODE default"),
    ("layer_norm_eps", 1e-5, "vLLM default; SGLang hard-codes 1e-6, UNCONFIRMED"),
    ("output_hidden_size", 4096, "CODE default"),
    # vLLM/SGLang default 3072 is a CLIP-B leftover; 15360 matches 321B / 642 GB (model card).
    ("intermediate_size", 15360, "DERIVED, UNCONFIRMED (class default 3072 is wrong)"),
    ("enable_patch", True, "CODE default"),
)

TOP_FIELDS: tuple[tuple[str, Any, str], ...] = (
    ("image_token_id", 128001, "CODE default"),
    # class default 1 cannot give 169 tokens per 728 px image (vLLM's step3_vl).
    ("understand_projector_stride", 2, "DERIVED (class default 1 is wrong)"),
    ("projector_bias", True, "CODE default, UNCONFIRMED"),
    ("tie_word_embeddings", False, "CODE"),
    ("torch_dtype", "bfloat16", "UNCONFIRMED"),
)

SUPPORTED_ROPE = ("default", "linear")
DTYPES = ("bfloat16", "float16", "float32")
QUANT_METHODS = ("fp8", "step3_edge")   # stepfun-ai/step3-fp8; written by step3-edge quantize
MAX_DIM = 2**31 - 1              # every size, count and id of config.json is at most this
MAX_TENSOR_ELEMS = 2**40         # no checkpoint tensor holds more values (2 TB in bf16)
MAX_BLOCK = 1 << 16              # largest weight_block_size entry
CROP_SIDE = 504                  # the processor's crop size (vLLM's step3_vl ImagePatcher)
_ZERO_OK = frozenset({"text_config.bos_token_id", "text_config.eos_token_id", "image_token_id"})
_EPS = frozenset({"text_config.rms_norm_eps", "vision_config.layer_norm_eps"})
# counts that size loops (layers, experts) or pixel buffers (the global view): far above
# Step3's (61 and 63 layers, 48 experts, 728 px), far below what would hang or exhaust memory
_MAX = {"text_config.num_hidden_layers": 4096, "vision_config.num_hidden_layers": 4096,
        "text_config.moe_num_experts": 4096, "vision_config.image_size": 4096}
_REMEDY = ("fix these fields of config.json (compare with stepfun-ai/step3's config.json), "
           "or re-create the checkpoint")


class Problems:
    """Every bad field of one config.json, reported together in one ConfigError."""

    def __init__(self, source: str) -> None:
        self.source, self.items = source, []

    def add(self, name: str, value: Any, expected: str) -> None:
        shown = repr(value)
        shown = shown[:80] + "..." if len(shown) > 80 else shown
        self.items.append(f"{name} is {shown}, expected {expected}")

    def check(self, ok: bool, name: str, value: Any, expected: str) -> None:
        if not ok:
            self.add(name, value, expected)

    def raise_if_any(self) -> None:
        if len(self.items) == 1:
            raise ConfigError(f"{self.source}: field {self.items[0]}", _REMEDY)
        if self.items:
            raise ConfigError(f"{self.source} has {len(self.items)} invalid fields:\n    "
                              + "\n    ".join(self.items), _REMEDY)




def positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def check_quantization(qc: Any, p: Problems) -> None:
    """quantization_config: absent, step3-fp8's block-fp8 block, or step3-edge's modules."""
    if qc is None:
        return
    if not isinstance(qc, dict):
        p.add("quantization_config", qc, "an object (or no quantization_config)")
        return
    method = qc.get("quant_method")
    if method not in QUANT_METHODS:
        p.add("quantization_config.quant_method", method, "'fp8' (stepfun-ai/step3-fp8) or "
              "'step3_edge' (written by step3-edge quantize)")
    elif method == "fp8":
        b = qc.get("weight_block_size", [128, 128])
        ok = isinstance(b, list) and len(b) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= MAX_BLOCK for x in b)
        p.check(ok, "quantization_config.weight_block_size", b,
                f"two integers in 1..{MAX_BLOCK}, such as [128, 128]")
        p.check(qc.get("fmt", "e4m3") == "e4m3", "quantization_config.fmt", qc.get("fmt"),
                "'e4m3'")
    else:
        from step3_edge.quantize.schemes import SCHEMES

        mods = qc.get("modules")
        bad = mods if not isinstance(mods, dict) else next(
            ({k: s} for k, s in mods.items() if not isinstance(s, str) or s not in SCHEMES),
            None)
        p.check(bad is None, "quantization_config.modules", bad,
                f"an object of tensor name -> scheme ({', '.join(SCHEMES)})")


def read_fields(src: dict[str, Any], spec: tuple[tuple[str, Any, str], ...], where: str,
                 fallbacks: list[str], p: Problems) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, default, _grade in spec:
        full = f"{where}.{name}" if where else name
        if name in src and (src[name] is not None or default is None):
            out[name] = _coerce(src[name], default, full, p)
        else:
            out[name] = default
            fallbacks.append(full)
    return out


def _coerce(value: Any, default: Any, name: str, p: Problems) -> Any:
    """`value` checked against the type of its fallback and the field's range; a bad value
    is recorded in `p` and the fallback returned (so every field is checked in one pass)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if default is None:
        ok = value is None or isinstance(value, dict)
        expected = "an object or null"
    elif isinstance(default, bool):
        ok, expected = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        lo, hi = 0 if name in _ZERO_OK else 1, _MAX.get(name, MAX_DIM)
        ok = number and isinstance(value, int) and lo <= value <= hi
        expected = f"an integer in {lo}..{hi}"
    elif isinstance(default, float):
        ok = positive(value) and (name not in _EPS or value < 1)
        expected = "a finite number in (0, 1)" if name in _EPS else "a finite positive number"
        value = float(value) if ok else value
    else:
        ok, expected = isinstance(value, str), "a string"
    if ok:
        return value
    p.add(name, value, expected)
    return default


def parse_moe_layers(raw: Any, num_layers: int) -> tuple[int, ...]:
    """`moe_layers_enum` is a comma-separated string, e.g. "4,5,...,59" (the HF config)."""
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
