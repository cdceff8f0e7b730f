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
from typing import Any

from step3_edge.errors import BundleError, CheckpointError, ConfigError
from step3_edge.fsutil import confined, read_json
from step3_edge.manifest_schema import CONTENT_HASH, MANIFEST, validate_manifest

SCHEMA_VERSION = 1
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
