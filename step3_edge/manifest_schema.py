"""The typed schema of a bundle's `manifest.json` (docs/bundle.md, docs/errors.md): every key,
type and range, and the cross-references between config, plan, artifacts, subgraphs, engines
and devices. `step3_edge.manifest.load_manifest` runs it before anything else is read."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from step3_edge.errors import BundleError

MANIFEST = "manifest.json"
CONTENT_HASH = "manifest_sha256"  # sha256 of the manifest's canonical JSON without this key
ARTIFACT_KINDS = ("weights", "onnx", "onnx_data", "trt", "tokenizer", "config")
# a subgraph's weight binding (export/binding.py's WeightBinding): its text fields
BINDING_TEXT = ("name", "tensor", "layout", "scheme", "op")
ROLES = ("attention", "ffn", "both")
_INT, _NUM, _STR, _LIST, _DICT = (int,), (int, float), (str,), (list,), (dict,)
_HEX = frozenset("0123456789abcdef")


class _Schema:
    """Collects every schema problem of one manifest (where, value, expected)."""

    def __init__(self, source: str) -> None:
        self.source, self.problems = source, []

    def bad(self, where: str, value: Any, expected: str) -> None:
        shown = repr(value)
        self.problems.append(f"{where} is {shown[:60] + '...' if len(shown) > 60 else shown}, "
                             f"expected {expected}")

    def get(self, obj: Any, key: str, types: tuple, where: str, expected: str = "",
            ok: Callable[[Any], bool] = lambda v: True, optional: bool = False) -> Any:
        """obj[key] when it has one of `types` and `ok` holds, else None (recorded)."""
        if not isinstance(obj, dict):
            if obj is not None:
                self.bad(where, obj, "an object")
            return None
        if key not in obj:
            if not optional:
                self.problems.append(f"{where}.{key} is missing")
            return None
        v = obj[key]
        if optional and v is None:
            return None
        good = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
        if not good or not ok(v):
            self.bad(f"{where}.{key}", v, expected or " or ".join(t.__name__ for t in types))
            return None
        return v

    def nat(self, obj: Any, key: str, where: str, lo: int = 0, optional: bool = False) -> Any:
        return self.get(obj, key, _INT, where, f"an integer >= {lo}", lambda v: v >= lo,
                        optional)


def _text(cfg: Any) -> dict:
    """The manifest config's text_config, {} when it is not an object (the config is
    validated on its own by Step3Config.from_dict)."""
    t = cfg.get("text_config") if isinstance(cfg, dict) else None
    return t if isinstance(t, dict) else {}


def _count(t: dict, key: str) -> int:
    """An integer field of the text config as a bound, 2^31 when it is not an integer."""
    v = t.get(key)
    return v if type(v) is int else 2**31


def _pairs(s: _Schema, v: Any, where: str, layers: set[int], n_exp: int) -> list[tuple]:
    ok = isinstance(v, list) and all(
        isinstance(p, list) and len(p) == 2 and all(type(x) is int for x in p)
        and p[0] in layers and 0 <= p[1] < n_exp for p in v)
    if not ok:
        s.bad(where, v, f"a list of [layer, expert] of MoE layers {sorted(layers)} and experts "
                        f"0..{n_exp - 1}")
        return []
    return [tuple(p) for p in v]


def _plan(s: _Schema, plan: Any, cfg: dict) -> None:
    w = "plan"
    t = _text(cfg)
    for k in ("target", "scheme", "attn_scheme"):
        s.get(plan, k, _STR, w)
    devices = s.nat(plan, "devices", w, 1)
    s.get(plan, "kv_bytes_per_elem", _NUM, w, "a positive number", lambda v: v > 0)
    for k in ("kv_bytes_per_token", "expert_bytes", "model_weight_bytes", "cpu_mem_bytes"):
        s.nat(plan, k, w)
    s.nat(plan, "max_context", w, 1)
    s.nat(plan, "kv_tokens_requested", w, optional=True)
    n_exp = s.nat(plan, "num_experts", w, 1) or 0
    layers = s.get(plan, "moe_layers", _LIST, w, "a list of layer indices",
                   lambda v: all(type(x) is int and x >= 0 for x in v))
    if n_exp != t.get("moe_num_experts", n_exp) or (
            layers is not None and ",".join(map(str, layers)) != t.get("moe_layers_enum")):
        s.bad(f"{w}.num_experts/moe_layers", [n_exp, layers],
              "the config's moe_num_experts and moe_layers_enum")
    layer_set = set(layers or [])
    seen: list[tuple] = _pairs(s, plan.get("cold_experts", []), f"{w}.cold_experts",
                               layer_set, n_exp) if isinstance(plan, dict) else []
    dps = s.get(plan, "device_plans", _LIST, w, "a list of device plans") or []
    if devices is not None and len(dps) != devices:
        s.bad(f"{w}.device_plans", f"{len(dps)} entries", f"{devices} (plan.devices)")
    for i, d in enumerate(dps):
        dw = f"{w}.device_plans[{i}]"
        if not isinstance(d, dict):
            s.bad(dw, d, "an object")
            continue
        s.get(d, "index", _INT, dw, f"{i}", lambda v: v == i)
        s.get(d, "role", _STR, dw, f"one of {ROLES}", lambda v: v in ROLES)
        for k in ("capacity_bytes", "kv_bytes", "kv_tokens", "activation_bytes",
                  "headroom_bytes"):
            s.nat(d, k, dw)
        s.get(d, "weight_bytes", _DICT, dw, "an object of role -> bytes",
              lambda v: all(type(x) is int and x >= 0 for x in v.values()))
        for k in ("dense_layers", "shared_expert_layers"):
            s.get(d, k, _LIST, dw, "a list of layer indices",
                  lambda v: all(type(x) is int and 0 <= x < _count(t, "num_hidden_layers")
                                for x in v))
        seen += _pairs(s, d.get("hot_experts", []), f"{dw}.hot_experts", layer_set, n_exp)
    if len(seen) != len(set(seen)):
        s.bad(f"{w}.hot_experts/cold_experts", "an expert placed twice",
              "each (layer, expert) in one place")


def _target(s: _Schema, tgt: Any) -> None:
    """The target row: `step3_edge.targets.Target`'s fields."""
    w = "target"
    for k in ("name", "description", "default_scheme"):
        s.get(tgt, k, _STR, w)
    for k in ("memory_gib", "bandwidth_gbs", "pcie_gbs"):
        s.get(tgt, k, _NUM, w, "a number >= 0", lambda v: v >= 0)
    s.get(tgt, "fp8_math", (bool,), w)
    s.nat(tgt, "cards_per_server", w, 1)
    if isinstance(tgt, dict) and "compute_capability" not in tgt:
        s.problems.append(f"{w}.compute_capability is missing")
    s.get(tgt, "compute_capability", _LIST, w, "[major, minor] or null (the cpu)",
          lambda v: len(v) == 2 and all(type(x) is int and x >= 0 for x in v), optional=True)


def _artifacts(s: _Schema, arts: Any) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for i, a in enumerate(arts if isinstance(arts, list) else []):
        w = f"artifacts[{i}]"
        if not isinstance(a, dict) or set(a) - {"path", "kind", "sha256", "bytes", "device",
                                                 "meta"}:
            s.bad(w, a, "an object of path, kind, sha256, bytes, device, meta")
            continue
        path = s.get(a, "path", _STR, w)
        s.get(a, "kind", _STR, w, f"one of {ARTIFACT_KINDS}", lambda v: v in ARTIFACT_KINDS)
        s.get(a, "sha256", _STR, w, "64 hex digits", lambda v: len(v) == 64 and set(v) <= _HEX)
        s.nat(a, "bytes", w)
        s.nat(a, "device", w, optional=True)
        s.get(a, "meta", _DICT, w, optional=True)
        if path in out:
            s.bad(w + ".path", path, "a path no other artifact has")
        if path is not None:
            out[path] = a
    return out


def validate_manifest(data: Any, source: str = MANIFEST) -> None:
    """The typed schema of a bundle manifest, every failure named in one BundleError: each
    key's presence, type and range, and the cross-references (config and plan agree, hot
    experts exist, subgraphs and device tables name artifacts and subgraphs, the weight index
    and tokenizer are artifacts, graphs exist when the engines say ONNX was exported)."""
    s = _Schema(source)
    if not isinstance(data, dict):
        raise BundleError(f"{source} holds a {type(data).__name__}, expected an object",
                          "re-export the bundle")
    for k in ("created", "step3_edge_version"):
        s.get(data, k, _STR, "manifest")
    s.get(data, CONTENT_HASH, _STR, "manifest", optional=True)
    src = s.get(data, "source", _DICT, "manifest")
    s.get(src, "path", _STR, "source")
    cfg = s.get(data, "config", _DICT, "manifest") or {}
    _target(s, s.get(data, "target", _DICT, "manifest"))
    arts = _artifacts(s, s.get(data, "artifacts", _LIST, "manifest"))
    plan = s.get(data, "plan", _DICT, "manifest")
    if plan is not None:
        _plan(s, plan, cfg)
    weights = s.get(data, "weights", _DICT, "manifest")
    s.get(weights, "index", _STR, "weights", "an artifact path", lambda v: v in arts)
    s.get(weights, "schemes", _DICT, "weights", optional=True)
    s.nat(weights, "total_bytes", "weights", optional=True)
    for name in ("config.json", "tokenizer.json"):
        if name not in arts:
            s.problems.append(f"artifacts lack {name}")
    subs = s.get(data, "subgraphs", _DICT, "manifest") or {}
    t = _text(cfg)
    for name, sg in subs.items():
        w = f"subgraphs[{name!r}]"
        if not isinstance(sg, dict):
            s.bad(w, sg, "an object")
            continue
        s.get(sg, "file", _STR, w, "the path of an onnx artifact",
              lambda v: arts.get(v, {}).get("kind") == "onnx")
        for k in ("kind", "precision"):
            s.get(sg, k, _STR, w)
        s.get(sg, "instances", _LIST, w, "a list of [layer or null, expert or null]",
              lambda v: all(isinstance(p, list) and len(p) == 2 and all(
                  x is None or type(x) is int and x >= 0 for x in p)
                  and (p[0] is None or p[0] < _count(t, "num_hidden_layers"))
                  and (p[1] is None or p[1] < _count(t, "moe_num_experts")) for p in v))
        s.get(sg, "weights", _LIST, w, "a list of weight bindings",
              lambda v: all(_binding(b) for b in v))
        for k in ("inputs", "outputs"):
            s.get(sg, k, _LIST, w, "a list of {name, dtype, shape}",
                  lambda v: all(_graph_io(io) for io in v))
        s.get(sg, "devices", _LIST, w)
        val = s.get(sg, "validation", _DICT, w, optional=True)
        for k in ("max_abs", "rel", "allowed", "rtol"):
            s.get(val, k, _NUM, f"{w}.validation")
        s.get(val, "output", _STR, f"{w}.validation")
    engines = s.get(data, "engines", _DICT, "manifest")
    onnx = s.get(engines, "onnx", _DICT, "engines", optional=True)
    trt = s.get(engines, "trt", _DICT, "engines")
    s.get(trt, "built", (bool,), "engines.trt")
    for k in ("reason", "version", "gpu", "precision"):
        s.get(trt, k, _STR, "engines.trt", optional=True)
    for k in ("shapes", "failed"):
        s.get(trt, k, _DICT, "engines.trt", optional=True)
    s.nat(onnx, "opset", "engines.onnx", 1)
    for k in ("flavour", "kv_dtype"):
        s.get(onnx, k, _STR, "engines.onnx")
    export = s.get(data, "export", _DICT, "manifest")
    s.get(export, "seconds", _NUM, "export", "a number >= 0", lambda v: v >= 0)
    for k in ("validated", "validate_all"):
        s.get(export, k, (bool,), "export")
    if onnx is not None and not subs:
        s.bad("subgraphs", subs, "the exported graphs (engines.onnx is set)")
    if subs and isinstance(engines, dict) and onnx is None:
        s.bad("engines.onnx", None, "the ONNX settings (the manifest has subgraphs)")
    for i, d in enumerate(s.get(data, "devices", _LIST, "manifest") or []):
        w = f"devices[{i}]"
        s.get(d, "index", (int, str), w, "a device index or 'cpu'",
              lambda v: v == "cpu" or isinstance(v, int) and v >= 0)
        s.get(d, "role", _STR, w)
        s.nat(d, "hot_experts", w)
        s.nat(d, "cold_experts", w, optional=True)
        s.get(d, "reads", _LIST, w, "a list of artifact paths",
              lambda v: all(isinstance(x, str) and x in arts for x in v))
        s.get(d, "subgraphs", _LIST, w, "a list of subgraph names",
              lambda v: all(isinstance(x, str) and x in subs for x in v))
    if s.problems:
        shown = s.problems[:12] + ([f"... and {len(s.problems) - 12} more"]
                                   if len(s.problems) > 12 else [])
        raise BundleError(f"{source} does not follow the bundle schema: " + "; ".join(shown),
                          "the manifest was edited or damaged; re-export the bundle")


def _graph_io(io: Any) -> bool:
    """One declared graph input or output: a name, an element type, and a shape of sizes and
    axis names."""
    return isinstance(io, dict) and isinstance(io.get("name"), str) \
        and isinstance(io.get("dtype"), str) and isinstance(io.get("shape"), list) \
        and all(isinstance(d, str) or type(d) is int and d >= 0 for d in io["shape"])


def _binding(b: Any) -> bool:
    """One weight binding: every field present with its type, nothing else."""
    return isinstance(b, dict) and set(b) <= {*BINDING_TEXT, "expert", "initializers",
                                              "shape", "attrs"} \
        and all(isinstance(b.get(k), str) for k in BINDING_TEXT) \
        and type(b.get("expert")) is bool and isinstance(b.get("attrs", {}), dict) \
        and isinstance(b.get("initializers"), list) \
        and all(isinstance(x, str) for x in b["initializers"]) \
        and isinstance(b.get("shape"), list) \
        and all(type(x) is int and 0 <= x < 2**31 for x in b["shape"])
