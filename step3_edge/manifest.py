"""`manifest.json`: the contract between export and runtime (docs/bundle.md, docs/errors.md).

The manifest is typed: `Manifest` and its parts are frozen dataclasses, each with `to_dict`
(the JSON the exporter writes, through `write_manifest`) and `from_dict` (the parse of a
manifest `validate_manifest` has checked). Nothing else reads or writes `manifest.json`.

The runtime reads nothing the manifest does not name. `load_manifest` checks, before any weight
is read: manifest.json itself (inside the bundle, valid JSON, the typed schema of
`validate_manifest`: every key, type, range and cross-reference), and every artifact's path
(inside the bundle, links included) and size. With `verify` (and in `step3-edge inspect`) it
also checks every artifact's sha256 and the manifest's own content hash.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

from step3_edge.config import Step3Config
from step3_edge.errors import BundleError, CheckpointError, ConfigError
from step3_edge.fsutil import confined, files_under, read_json
from step3_edge.manifest_schema import CONTENT_HASH, MANIFEST, validate_manifest
from step3_edge.plan import Plan
from step3_edge.targets import Target

SCHEMA_VERSION = 1
_REEXPORT = "the bundle was modified or damaged; re-export it"

__all__ = ["Artifact", "DeviceEntry", "Engines", "ExportInfo", "GraphIO", "Manifest",
           "OnnxSettings", "Source", "Subgraph", "TrtInfo", "Validation", "WeightsInfo",
           "load_manifest", "validate_manifest", "write_manifest", "check_artifact_sizes",
           "looks_like_bundle", "bundle_owned", "inside", "sha256_file"]


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
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()


def _json(obj: Any) -> Any:
    """`obj` as JSON values (tuples become lists), as it reads back from the file."""
    return json.loads(json.dumps(obj))


# ------------------------------------------------------------------------- the parts


class _Part:
    """A part of the manifest; its JSON object holds its fields (unless it says otherwise)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Source(_Part):
    """The checkpoint the bundle was exported from."""

    path: str
    format: str | None             # bf16 | block-fp8 | step3_edge (already quantized)
    config_sha256: str | None      # of its config.json

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Source:
        return cls(d["path"], d.get("format"), d.get("config_sha256"))


@dataclass(frozen=True)
class Artifact(_Part):
    """One file of the bundle."""

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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Artifact:
        return cls(d["path"], d["kind"], d["sha256"], d["bytes"], d.get("device"),
                   d.get("meta") or {})


@dataclass(frozen=True)
class WeightsInfo(_Part):
    """How the weights are stored: the index, the quantization recipe, scheme counts."""

    index: str                     # the HF-style index artifact
    recipe: list[Any] | None       # `Recipe.to_json()` of the quantize stage
    schemes: dict[str, int] | None  # scheme -> how many tensors use it
    total_bytes: int | None
    experts_dir: str | None        # the folder of the routed experts

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WeightsInfo:
        return cls(d["index"], d.get("recipe"), d.get("schemes"), d.get("total_bytes"),
                   d.get("experts_dir"))


@dataclass(frozen=True)
class DeviceEntry(_Part):
    """What one device (or "cpu", which serves the cold experts) reads and runs."""

    index: int | str
    role: str
    reads: tuple[str, ...]         # weight artifacts it loads
    subgraphs: tuple[str, ...]     # subgraph names it runs
    hot_experts: int
    cold_experts: int | None = None  # the "cpu" entry only

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.cold_experts is None:
            del d["cold_experts"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceEntry:
        return cls(d["index"], d["role"], tuple(d["reads"]), tuple(d["subgraphs"]),
                   d["hot_experts"], d.get("cold_experts"))


@dataclass(frozen=True)
class GraphIO(_Part):
    """One graph input or output; str dims are dynamic axes shared by name across a graph."""

    name: str
    dtype: str                        # float32 | int64 | bool
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GraphIO:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class Validation(_Part):
    """A subgraph checked against the reference: its worst output over every case."""

    max_abs: float                 # max |onnx - ref|
    rel: float                     # max_abs / max |ref|
    output: str
    instance: str | None
    allowed: float                 # atol + rtol * max |ref|
    cases: int | None
    atol: float | None
    rtol: float

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Validation:
        return cls(d["max_abs"], d["rel"], d["output"], d.get("instance"), d["allowed"],
                   d.get("cases"), d.get("atol"), d["rtol"])


@dataclass(frozen=True)
class Subgraph(_Part):
    """One ONNX graph file and the layers / experts it serves."""

    file: str                      # the onnx artifact
    kind: str                      # its kind in `step3_edge.export.subgraphs.REGISTRY`
    doc: str | None
    instances: tuple[tuple[int | None, int | None], ...]   # (layer, expert) it serves
    inputs: tuple[GraphIO, ...]
    outputs: tuple[GraphIO, ...]
    precision: str
    flavour: str | None            # cpu | gpu
    opset: int | None
    tolerance: dict[str, float] | None   # {atol, rtol} its validation allows
    validation: Validation | None        # None: not validated
    weights: tuple[dict[str, Any], ...]  # `export.binding.WeightBinding.to_dict()` each
    devices: tuple[int | str, ...]       # devices that run it ("cpu": cold experts)

    @property
    def dynamic_axes(self) -> dict[str, dict[str, str]]:
        """io name -> {axis index: axis name} of its dynamic axes."""
        return {io.name: {str(a): d for a, d in enumerate(io.shape) if isinstance(d, str)}
                for io in self.inputs + self.outputs}

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "kind": self.kind, "doc": self.doc,
                "instances": [list(i) for i in self.instances],
                "inputs": [io.to_dict() for io in self.inputs],
                "outputs": [io.to_dict() for io in self.outputs],
                "dynamic_axes": self.dynamic_axes, "precision": self.precision,
                "flavour": self.flavour, "opset": self.opset, "tolerance": self.tolerance,
                "validation": self.validation.to_dict() if self.validation else None,
                "weights": list(self.weights), "devices": list(self.devices)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Subgraph:
        val = d.get("validation")
        return cls(d["file"], d["kind"], d.get("doc"), tuple(tuple(i) for i in d["instances"]),
                   tuple(map(GraphIO.from_dict, d["inputs"])),
                   tuple(map(GraphIO.from_dict, d["outputs"])), d["precision"],
                   d.get("flavour"), d.get("opset"), d.get("tolerance"),
                   Validation.from_dict(val) if val is not None else None,
                   tuple(d["weights"]), tuple(d["devices"]))


@dataclass(frozen=True)
class OnnxSettings(_Part):
    """How the graphs were exported."""

    opset: int
    flavour: str                   # cpu | gpu
    kv_dtype: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OnnxSettings:
        return cls(d["opset"], d["flavour"], d["kv_dtype"])


@dataclass(frozen=True)
class TrtInfo(_Part):
    """The TensorRT engines: built or not, and why; what they were built on and for."""

    built: bool
    reason: str | None = None      # why none were built
    version: str | None = None     # TensorRT's
    gpu: str | None = None         # sm_XY they run on
    precision: str | None = None
    shapes: dict[str, int] | None = None     # the profiles' bounds (`export.trt.TrtShapes`)
    failed: dict[str, str] | None = None     # subgraph -> why its engine was not built

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrtInfo:
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})


@dataclass(frozen=True)
class Engines(_Part):
    onnx: OnnxSettings | None      # None: exported without graphs
    trt: TrtInfo

    def to_dict(self) -> dict[str, Any]:
        return {"onnx": self.onnx.to_dict() if self.onnx else None, "trt": self.trt.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Engines:
        onnx = d.get("onnx")
        return cls(OnnxSettings.from_dict(onnx) if onnx is not None else None,
                   TrtInfo.from_dict(d["trt"]))


@dataclass(frozen=True)
class ExportInfo(_Part):
    seconds: float
    validated: bool
    validate_all: bool

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExportInfo:
        return cls(d["seconds"], d["validated"], d["validate_all"])


def _target(d: dict[str, Any]) -> Target:
    """The target row as the `Target` it was written from."""
    cc = d["compute_capability"]
    return Target(**{**{f.name: d[f.name] for f in fields(Target)},
                     "compute_capability": tuple(cc) if cc is not None else None})


# ------------------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class Manifest:
    """A bundle's manifest: the folder it describes and what `manifest.json` says."""

    bundle: Path
    created: str                   # ISO time of the export
    step3_edge_version: str
    source: Source
    config: Step3Config            # with its quantization_config: what the weights are
    target: Target
    plan: Plan
    weights: WeightsInfo
    devices: tuple[DeviceEntry, ...]
    subgraphs: dict[str, Subgraph]  # name -> graph file ({} without ONNX)
    engines: Engines
    export: ExportInfo
    artifacts: tuple[Artifact, ...]

    def to_dict(self) -> dict[str, Any]:
        """The content of `manifest.json` without its content hash."""
        return _json({
            "schema_version": SCHEMA_VERSION, "created": self.created,
            "step3_edge_version": self.step3_edge_version, "source": self.source.to_dict(),
            "config": self.config.to_dict(), "target": asdict(self.target),
            "plan": self.plan.to_dict(), "weights": self.weights.to_dict(),
            "devices": [d.to_dict() for d in self.devices],
            "subgraphs": {n: sg.to_dict() for n, sg in self.subgraphs.items()},
            "engines": self.engines.to_dict(), "export": self.export.to_dict(),
            "artifacts": [a.to_dict() for a in self.artifacts]})

    @classmethod
    def from_dict(cls, bundle: Path, data: dict[str, Any], file: str = MANIFEST) -> Manifest:
        """The manifest of `bundle` from the content of its `manifest.json` (`file`, as error
        messages name it), which `validate_manifest` has checked; the config is checked here
        (`Step3Config.from_dict`: ConfigError)."""
        return cls(Path(bundle), data["created"], data["step3_edge_version"],
                   Source.from_dict(data["source"]),
                   Step3Config.from_dict(data["config"], f"{file} (config)"),
                   _target(data["target"]), Plan.from_dict(data["plan"]),
                   WeightsInfo.from_dict(data["weights"]),
                   tuple(map(DeviceEntry.from_dict, data["devices"])),
                   {n: Subgraph.from_dict(sg) for n, sg in data["subgraphs"].items()},
                   Engines.from_dict(data["engines"]), ExportInfo.from_dict(data["export"]),
                   tuple(map(Artifact.from_dict, data["artifacts"])))

    @cached_property
    def _by_path(self) -> dict[str, Artifact]:
        return {a.path: a for a in self.artifacts}

    def artifact(self, rel: str) -> Artifact:
        """The artifact at `rel` (BundleError when the manifest names none)."""
        art = self._by_path.get(rel)
        if art is None:
            raise BundleError(f"{rel!r} is not an artifact of this bundle",
                              "the runtime only reads files the manifest names; re-export")
        return art

    def path(self, rel: str) -> Path:
        """Absolute path of an artifact named in the manifest (refuses anything else, and a
        file whose size is not the manifest's)."""
        art = self.artifact(rel)
        full = inside(self.bundle, rel)
        _check_size(full, art)
        return full

    def verify(self, progress: bool = False) -> list[str]:
        """Check every artifact's size and sha256, and `manifest.json` as it is on disk
        against its content hash; raise BundleError listing every mismatch."""
        from tqdm import tqdm

        bad = []
        data = read_json(confined(self.bundle, MANIFEST, BundleError, hub=False), BundleError,
                         _REEXPORT)
        want = data.get(CONTENT_HASH) if isinstance(data, dict) else None
        if want is None or want != content_hash(data):
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


def write_manifest(m: Manifest) -> Path:
    """Write `m` as `manifest.json` of its bundle folder, with its content hash (the folder
    is a staged one, renamed into place when complete: `fsutil.staged_dir`)."""
    data = m.to_dict()
    data[CONTENT_HASH] = content_hash(data)
    out = m.bundle / MANIFEST
    out.write_text(json.dumps(data, indent=2) + "\n")
    return out


def _check_size(full: Path, art: Artifact) -> None:
    if not full.is_file():
        raise BundleError(f"artifact {art.path} of the manifest is missing from the bundle",
                          _REEXPORT)
    size = full.stat().st_size
    if size != art.bytes:
        raise BundleError(f"artifact {art.path} is {size} bytes, the manifest says "
                          f"{art.bytes}", _REEXPORT)


def check_artifact_sizes(bundle: Path, artifacts: tuple[Artifact, ...]) -> None:
    """Every artifact exists inside the bundle (links included) with the manifest's size:
    cheap (one stat per file), so always done; sha256 is `Manifest.verify`'s."""
    for a in artifacts:
        _check_size(inside(bundle, a.path), a)


def _check_files(m: Manifest, f: Path) -> None:
    """config.json equals the manifest's config; the weight index is valid and names only
    weight artifacts (small files, read here so no later reader meets them unchecked)."""
    from step3_edge.checkpoint import validate_index

    try:
        same = m.config == Step3Config.from_pretrained(m.path("config.json"))
        index = m.path(m.weights.index)
        weight_map = validate_index(read_json(index, BundleError, _REEXPORT), index)
    except (ConfigError, CheckpointError) as e:     # a bundle's own file: the bundle is bad
        raise BundleError(e.problem, _REEXPORT) from e
    if not same:
        raise BundleError(f"{f}: its config differs from the bundle's config.json", _REEXPORT)
    kinds = {a.path: a.kind for a in m.artifacts}
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


def bundle_owned(folder: Path) -> str | None:
    """None when `folder` is a bundle `export` wrote (its manifest.json names every file it
    holds; a damaged one counts too, so --force can replace it); else why it is not."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        named = {a["path"] for a in data["artifacts"]} | {MANIFEST}
        ok = data["schema_version"] == SCHEMA_VERSION
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return f"it is not a bundle (no readable {MANIFEST} listing its artifacts)"
    extra = [p for p in files_under(folder) if p not in named]
    if not ok or extra:
        return (f"it holds files its {MANIFEST} does not name: {extra[:5]}" if extra else
                f"its {MANIFEST} is not a step3-edge bundle manifest")
    return None


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
    # every file is there with its size before the manifest's config is parsed
    check_artifact_sizes(bundle, tuple(map(Artifact.from_dict, data["artifacts"])))
    try:
        m = Manifest.from_dict(bundle, data, str(f))
    except ConfigError as e:                        # the manifest's own config is bad
        raise BundleError(e.problem, _REEXPORT) from e
    _check_files(m, f)
    if verify:
        m.verify()
    return m
