"""`manifest.json`: the contract between export and runtime (docs/bundle.md, docs/errors.md).

The runtime reads nothing the manifest does not name. `load_manifest` checks, before any weight
is read: manifest.json itself (inside the bundle, valid JSON, the typed schema of
`validate_manifest`: every key, type, range and cross-reference), and every artifact's path
(inside the bundle, links included) and size. With `verify` (and in `step3-edge inspect`) it
also checks every artifact's sha256 and the manifest's own content hash.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

from step3_edge.errors import BundleError, CheckpointError, ConfigError
from step3_edge.fsutil import confined, read_json

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
CONTENT_HASH = "manifest_sha256"  # sha256 of the manifest's canonical JSON without this key
_REEXPORT = "the bundle was modified or damaged; re-export it"

__all__ = ["Artifact", "Manifest", "load_manifest", "validate_manifest", "write_manifest",
           "check_artifact_sizes", "looks_like_bundle", "inside", "sha256_file"]


def sha256_file(path: Path, chunk: int = 8 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def inside(bundle: Path, rel: Any) -> Path:
    """Resolve an artifact path, refusing absolute paths, `..` and links that leave the bundle."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise BundleError(f"manifest path {rel!r} leaves the bundle",
                          "the bundle was tampered with or hand-edited; re-export it")
    return confined(bundle, rel, BundleError, hub=False, what="manifest path")


def content_hash(data: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys), without its own hash."""
    body = {k: v for k, v in data.items() if k != CONTENT_HASH}
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass
class Artifact:
    path: str                      # relative to the bundle
    kind: str                      # weights | onnx | onnx_data | trt | tokenizer | config
    sha256: str
    bytes: int
    device: int | None = None      # the device that runs / holds it (None: any)
    meta: dict[str, Any] = field(default_factory=dict)  # dtypes, shapes, subgraph, layer...

    @classmethod
    def of(cls, bundle: Path, rel: str, kind: str, device: int | None = None,
           **meta: Any) -> Artifact:
        full = inside(bundle, rel)
        return cls(rel, kind, sha256_file(full), full.stat().st_size, device, meta)


@dataclass
class Manifest:
    bundle: Path
    data: dict[str, Any]

    @property
    def artifacts(self) -> list[Artifact]:
        return [Artifact(**a) for a in self.data["artifacts"]]

    @property
    def subgraphs(self) -> dict[str, dict[str, Any]]:
        return self.data.get("subgraphs") or {}

    @property
    def plan(self) -> dict[str, Any]:
        return self.data["plan"]

    @property
    def target(self) -> str:
        return self.data["target"]["name"]

    def path(self, rel: str) -> Path:
        """Absolute path of an artifact named in the manifest (refuses anything else, and a
        file whose size is not the manifest's)."""
        art = next((a for a in self.data["artifacts"] if a["path"] == rel), None)
        if art is None:
            raise BundleError(f"{rel!r} is not an artifact of this bundle",
                              "the runtime only reads files the manifest names; re-export")
        full = inside(self.bundle, rel)
        _check_size(full, art)
        return full

    def verify(self, progress: bool = False) -> list[str]:
        """Check every artifact's size and sha256 and the manifest's content hash; raise
        BundleError listing every mismatch."""
        from tqdm import tqdm

        bad = []
        want = self.data.get(CONTENT_HASH)
        if want != content_hash(self.data):
            bad.append(f"{MANIFEST}: content hash mismatch (the manifest was edited)"
                       if want else f"{MANIFEST}: no {CONTENT_HASH} to verify it by")
        for a in tqdm(self.artifacts, desc="verify", unit="file", disable=not progress):
            full = inside(self.bundle, a.path)
            if not full.is_file():
                bad.append(f"{a.path}: missing")
            elif full.stat().st_size != a.bytes:
                bad.append(f"{a.path}: {full.stat().st_size} bytes, the manifest says {a.bytes}")
            elif sha256_file(full) != a.sha256:
                bad.append(f"{a.path}: sha256 mismatch")
        if bad:
            raise BundleError(f"bundle {self.bundle} does not match its manifest: "
                              + "; ".join(bad), _REEXPORT)
        return [a.path for a in self.artifacts]


def write_manifest(bundle: Path, data: dict[str, Any]) -> Path:
    data = {"schema_version": SCHEMA_VERSION, **data}
    data = json.loads(json.dumps(data, default=_json_default))
    data[CONTENT_HASH] = content_hash(data)
    out = bundle / MANIFEST
    out.write_text(json.dumps(data, indent=2) + "\n")
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, Artifact):
        return o.__dict__
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _check_size(full: Path, art: dict[str, Any]) -> None:
    if not full.is_file():
        raise BundleError(f"artifact {art['path']} of the manifest is missing from the bundle",
                          _REEXPORT)
    size = full.stat().st_size
    if size != art["bytes"]:
        raise BundleError(f"artifact {art['path']} is {size} bytes, the manifest says "
                          f"{art['bytes']}", _REEXPORT)


def check_artifact_sizes(m: Manifest) -> None:
    """Every artifact exists inside the bundle (links included) with the manifest's size:
    cheap (one stat per file), so always done; sha256 is `Manifest.verify`'s."""
    for a in m.data["artifacts"]:
        _check_size(inside(m.bundle, a["path"]), a)


def _check_files(m: Manifest, f: Path) -> None:
    """config.json equals the manifest's config; the weight index is valid and names only
    weight artifacts (small files, read here so no later reader meets them unchecked)."""
    from step3_edge.checkpoint import validate_index
    from step3_edge.config import Step3Config

    try:
        same = Step3Config.from_dict(m.data["config"], f"{f} (config)") == \
            Step3Config.from_pretrained(m.path("config.json"))
        index = m.path(m.data["weights"]["index"])
        weight_map = validate_index(read_json(index, BundleError, _REEXPORT), index)
    except (ConfigError, CheckpointError) as e:     # a bundle's own file: the bundle is bad
        raise BundleError(e.problem, _REEXPORT) from e
    if not same:
        raise BundleError(f"{f}: its config differs from the bundle's config.json", _REEXPORT)
    kinds = {a["path"]: a["kind"] for a in m.data["artifacts"]}
    stray = sorted({v for v in weight_map.values() if kinds.get(v) != "weights"})
    if stray:
        raise BundleError(f"{index.name} names files that are not weight artifacts of the "
                          f"manifest: {stray[:5]}", _REEXPORT)


def looks_like_bundle(folder: str | Path) -> bool:
    """A folder with a bundle's layout (ONNX graphs, per-device weights, a bundle's staging
    name), whatever its manifest says: such a folder must never be read as a checkpoint."""
    p = Path(folder)
    return (p / MANIFEST).exists() or (p / "onnx").is_dir() or (p / "experts").is_dir() \
        or any(c.is_dir() and c.name.startswith("device-") for c in p.iterdir()) \
        if p.is_dir() else False


def load_manifest(bundle: str | Path, verify: bool = False) -> Manifest:
    """Read and check `manifest.json` of a bundle folder (schema, paths, sizes; `verify`:
    sha256 of every artifact and the manifest's content hash)."""
    bundle = Path(bundle)
    f = bundle / MANIFEST
    if not f.is_file() and not f.is_symlink():
        partial = bundle.parent / f".{bundle.name}.partial"
        hint = (" (an interrupted export left " + partial.name + ")") if partial.exists() else ""
        raise BundleError(f"{bundle} is not a bundle: no {MANIFEST}{hint}",
                          "run `step3-edge export --model CKPT --target T --out BUNDLE` first")
    f = confined(bundle, MANIFEST, BundleError, hub=False)
    data = read_json(f, BundleError, "re-export the bundle")
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise BundleError(f"{f}: schema_version is {version!r}, this step3-edge reads "
                          f"{SCHEMA_VERSION}", "re-export the bundle with this version")
    for a in data.get("artifacts") if isinstance(data.get("artifacts"), list) else []:
        if isinstance(a, dict) and isinstance(a.get("path"), str):
            inside(bundle, a["path"])
    validate_manifest(data, str(f))
    m = Manifest(bundle, data)
    check_artifact_sizes(m)
    _check_files(m, f)
    if verify:
        m.verify()
    return m


# ---------------------------------------------------------------------------- schema
ARTIFACT_KINDS = ("weights", "onnx", "onnx_data", "trt", "tokenizer", "config")
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
    t = cfg.get("text_config", {}) if isinstance(cfg, dict) else {}
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
                  lambda v: all(type(x) is int and 0 <= x < t.get("num_hidden_layers", 2**31)
                                for x in v))
        seen += _pairs(s, d.get("hot_experts", []), f"{dw}.hot_experts", layer_set, n_exp)
    if len(seen) != len(set(seen)):
        s.bad(f"{w}.hot_experts/cold_experts", "an expert placed twice",
              "each (layer, expert) in one place")


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
    s.get(s.get(data, "target", _DICT, "manifest"), "name", _STR, "target")
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
    t = cfg.get("text_config", {}) if isinstance(cfg.get("text_config"), dict) else {}
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
                  and (p[0] is None or p[0] < t.get("num_hidden_layers", 2**31))
                  and (p[1] is None or p[1] < t.get("moe_num_experts", 2**31)) for p in v))
        s.get(sg, "weights", _LIST, w, "a list of weight bindings",
              lambda v: all(isinstance(b, dict) and isinstance(b.get("tensor"), str)
                            and isinstance(b.get("initializers"), list)
                            and isinstance(b.get("shape"), list) for b in v))
        for k in ("inputs", "outputs", "devices"):
            s.get(sg, k, _LIST, w)
        val = s.get(sg, "validation", _DICT, w, optional=True)
        for k in ("max_abs", "rel", "allowed", "rtol"):
            s.get(val, k, _NUM, f"{w}.validation")
        s.get(val, "output", _STR, f"{w}.validation")
    engines = s.get(data, "engines", _DICT, "manifest")
    onnx = s.get(engines, "onnx", _DICT, "engines", optional=True)
    trt = s.get(engines, "trt", _DICT, "engines")
    s.get(trt, "built", (bool,), "engines.trt")
    s.get(trt, "reason", _STR, "engines.trt", optional=True)
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
