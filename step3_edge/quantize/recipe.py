"""Recipes: which tensors get which scheme, as data.

A recipe is an ordered tuple of `(glob pattern, scheme name)` rules matched against checkpoint
tensor names with `fnmatch` (`*` also matches dots); the first rule that matches a tensor
decides. A quantized scheme only applies to tensors that can hold one ([..., out, in] weights
named `*.weight` with 2 or 3 dims); other tensors that a quantized rule matches fall through
to the next rule, so `model.layers.3.*=int4_block` quantizes that layer's linears and leaves
its norms alone. The last rule is always `* -> bf16`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from step3_edge.errors import QuantizationError
from step3_edge.layout import WeightSpec
from step3_edge.quantize.schemes import SCHEMES, Scheme, get_scheme
from step3_edge.targets import Target

# the default rule groups: routed experts, shared expert and dense MLP take the expert scheme
ROUTER = "model.layers.*.moe.gate.weight"
EXPERT_PATTERNS = ("model.layers.*.moe.gate_proj.weight", "model.layers.*.moe.up_proj.weight",
                   "model.layers.*.moe.down_proj.weight",
                   "model.layers.*.share_expert.*_proj.weight",
                   "model.layers.*.mlp.*_proj.weight")
ATTN_PATTERNS = ("model.layers.*.self_attn.*_proj.weight", "model.layers.*.self_attn.wq.weight")


def quantizable(spec: WeightSpec) -> bool:
    """Tensors a non-bf16 scheme can hold: 2-D/3-D `*.weight` (no norms, biases, convs)."""
    return spec.name.endswith(".weight") and len(spec.shape) in (2, 3)


@dataclass(frozen=True)
class Recipe:
    """Ordered (pattern, scheme name) rules; the first matching rule decides."""

    rules: tuple[tuple[str, str], ...]
    n_overrides: int = 0  # the first n rules came from the user (checked for typos)

    def __post_init__(self) -> None:
        for pattern, scheme in self.rules:
            get_scheme(scheme)  # raises QuantizationError for an unknown name
        if not self.rules or self.rules[-1] != ("*", "bf16"):
            object.__setattr__(self, "rules", (*self.rules, ("*", "bf16")))

    def scheme_name(self, spec: WeightSpec) -> str:
        """The scheme name the recipe gives one tensor."""
        for pattern, scheme in self.rules:
            if fnmatchcase(spec.name, pattern) and (scheme == "bf16" or quantizable(spec)):
                return scheme
        return "bf16"

    def scheme_for(self, spec: WeightSpec) -> Scheme:
        return get_scheme(self.scheme_name(spec))

    def resolve(self, specs: Iterable[WeightSpec]) -> dict[str, str]:
        """name -> scheme name for every tensor; raises when a user override matched no
        tensor at all (most likely a typo in the pattern)."""
        specs = list(specs)
        out = {s.name: self.scheme_name(s) for s in specs}
        for pattern, scheme in self.rules[: self.n_overrides]:
            if not any(fnmatchcase(s.name, pattern) and (scheme == "bf16" or quantizable(s))
                       for s in specs):
                raise QuantizationError(
                    f"override {pattern}={scheme} matches no tensor that can take it",
                    "patterns are fnmatch globs over checkpoint names, e.g. "
                    "'model.layers.*.moe.*_proj.weight=int4_block'; only 2-D/3-D *.weight "
                    "tensors can be quantized")
        return out

    def to_json(self) -> list[list[str]]:
        return [list(r) for r in self.rules]


def parse_override(text: str) -> tuple[str, str]:
    """'PATTERN=SCHEME' -> (pattern, scheme), checking the scheme name."""
    pattern, sep, scheme = text.rpartition("=")
    if not sep or not pattern or not scheme:
        raise QuantizationError(f"override {text!r} is not PATTERN=SCHEME",
                                "write e.g. --override 'lm_head.weight=int8_per_channel'")
    get_scheme(scheme.strip())
    return pattern.strip(), scheme.strip()


def build_recipe(target: Target, scheme: str | None = None, attn_scheme: str | None = None,
                 overrides: Sequence[str | tuple[str, str]] = ()) -> Recipe:
    """The recipe for `target`: experts, shared expert and dense MLP get `scheme` (default:
    the target's `default_scheme`); attention projections get `attn_scheme` (default: the
    same as `scheme`; pass "bf16" to keep them bf16); router, norms, embeddings, lm_head and
    vision stay bf16. `overrides` ("PATTERN=SCHEME") are checked first, in order."""
    expert = scheme or target.default_scheme
    attn = attn_scheme or expert
    for s in (expert, attn):
        if s not in SCHEMES:
            get_scheme(s)
    user = [parse_override(o) if isinstance(o, str) else (o[0], get_scheme(o[1]).name)
            for o in overrides]
    rules = [*user, (ROUTER, "bf16"),
             *((p, expert) for p in EXPERT_PATTERNS),
             *((p, attn) for p in ATTN_PATTERNS),
             ("*", "bf16")]
    return Recipe(tuple(rules), n_overrides=len(user))
