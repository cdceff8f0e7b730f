"""`manifest.json`: the contract between export and runtime (docs/bundle.md).

The runtime reads nothing the manifest does not name. Every artifact has a path relative to the
bundle, a sha256 and a size; loading refuses paths that leave the bundle and, when asked to
verify, artifacts whose bytes changed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from step3_edge.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 8 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def inside(bundle: Path, rel: str) -> Path:
    """Resolve an artifact path, refusing absolute paths, `..` and links that leave the bundle."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not rel:
        raise BundleError(f"manifest path {rel!r} leaves the bundle",
                          "the bundle was tampered with or hand-edited; re-export it")
    full = (bundle / p).resolve()
    if bundle.resolve() not in full.parents:
        raise BundleError(f"manifest path {rel!r} resolves outside the bundle ({full})",
                          "remove the symbolic link or re-export the bundle")
    return full


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
        return self.data.get("subgraphs", {})

    @property
    def plan(self) -> dict[str, Any]:
        return self.data["plan"]

    @property
    def target(self) -> str:
        return self.data["target"]["name"]

    def path(self, rel: str) -> Path:
        """Absolute path of an artifact named in the manifest (refuses anything else)."""
        if rel not in {a["path"] for a in self.data["artifacts"]}:
            raise BundleError(f"{rel!r} is not an artifact of this bundle",
                              "the runtime only reads files the manifest names; re-export")
        return inside(self.bundle, rel)

    def verify(self, progress: bool = False) -> list[str]:
        """Check every artifact's size and sha256; raise BundleError listing mismatches."""
        from tqdm import tqdm

        bad = []
        for a in tqdm(self.artifacts, desc="verify", unit="file", disable=not progress):
            full = inside(self.bundle, a.path)
            if not full.is_file():
                bad.append(f"{a.path}: missing")
            elif full.stat().st_size != a.bytes or sha256_file(full) != a.sha256:
                bad.append(f"{a.path}: sha256 mismatch")
        if bad:
            raise BundleError("bundle artifacts do not match the manifest: " + "; ".join(bad),
                              "the bundle was modified or damaged; re-export it")
        return [a.path for a in self.artifacts]


def write_manifest(bundle: Path, data: dict[str, Any]) -> Path:
    data = {"schema_version": SCHEMA_VERSION, **data}
    out = bundle / MANIFEST
    out.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, Artifact):
        return o.__dict__
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_manifest(bundle: str | Path, verify: bool = False) -> Manifest:
    """Read and check `manifest.json` of a bundle folder."""
    bundle = Path(bundle)
    f = bundle / MANIFEST
    if not f.is_file():
        partial = bundle.parent / f".{bundle.name}.partial"
        hint = (" (an interrupted export left " + partial.name + ")") if partial.exists() else ""
        raise BundleError(f"{bundle} is not a bundle: no {MANIFEST}{hint}",
                          "run `step3-edge export --model CKPT --target T --out BUNDLE` first")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{f} is not valid JSON: {e}", "re-export the bundle") from e
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise BundleError(f"bundle schema_version is {version!r}, this step3-edge reads "
                          f"{SCHEMA_VERSION}", "re-export the bundle with this version")
    for a in data.get("artifacts", []):
        inside(bundle, a.get("path", ""))
    m = Manifest(bundle, data)
    if verify:
        m.verify()
    return m
