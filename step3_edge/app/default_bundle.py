"""The bundle a runtime command loads for `--model`: a bundle as it is, a checkpoint exported
for the `cpu` target on first use, and the embedded default model's bundle.

Exported bundles live in `step3_edge.defaults.cache_dir()/bundles/<model>-<fingerprint>-cpu`.
The fingerprint covers the checkpoint's config and file sizes (and, for a checkpoint other than
the embedded default, its absolute path and file times), so a changed checkpoint gets a new
bundle. `export_bundle` writes into a staging folder and renames it into place, so an
interrupted first run leaves no half bundle behind.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from step3_edge.errors import BundleError

MANIFEST = "manifest.json"
CONFIG = "config.json"
DEFAULT_NAME = "step3-edge-default"


def _fingerprint(model_dir: Path, *, stamps: bool = False) -> str:
    h = hashlib.sha256()
    if stamps:
        h.update(str(model_dir.resolve()).encode())
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(model_dir)).encode())
        h.update(str(path.stat().st_size).encode())
        if stamps:
            h.update(str(path.stat().st_mtime_ns).encode())
        if path.name == CONFIG:
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def exported_path(checkpoint: Path, *, default: bool = False) -> Path:
    """Where the cpu bundle of `checkpoint` lives in the cache (whether or not it exists)."""
    from step3_edge.defaults import cache_dir

    fp = _fingerprint(checkpoint, stamps=not default)
    return cache_dir() / "bundles" / f"{checkpoint.resolve().name}-{fp}-cpu"


def default_bundle_path() -> Path:
    """Where the default bundle lives (whether or not it exists yet)."""
    from step3_edge.defaults import default_model

    return exported_path(default_model(), default=True)


def _export(checkpoint: Path, out: Path, progress: bool, what: str) -> Path:
    from step3_edge.export.bundle import export_bundle

    if (out / MANIFEST).is_file():
        return out
    if progress:
        print(f"step3-edge: first use, exporting {what} to {out}", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        # the runtime's torch backend reads the weights; ONNX subgraphs are not needed
        return Path(export_bundle(checkpoint, "cpu", 1, out, onnx=False, trt=False,
                                  progress=progress))
    except (BundleError, FileExistsError):
        if (out / MANIFEST).is_file():  # another process finished the same export first
            return out
        raise


def default_bundle(progress: bool = True) -> Path:
    """The default model's `cpu` bundle, exporting it (with a progress bar) on first use."""
    from step3_edge.defaults import default_model

    return _export(default_model(), default_bundle_path(), progress, "the default model")


def bundle_for(model: str | Path, progress: bool = True) -> Path:
    """`model` itself when it is a bundle (manifest.json); for a checkpoint (config.json), its
    `cpu` bundle in the cache, exported on first use. Anything else is a BundleError."""
    folder = Path(model).expanduser()
    if (folder / MANIFEST).is_file():
        return folder
    if (folder / CONFIG).is_file():
        return _export(folder, exported_path(folder), progress, f"the checkpoint {folder}")
    what = "does not exist" if not folder.exists() else (
        "is not a folder" if not folder.is_dir() else f"holds neither {MANIFEST} nor {CONFIG}")
    raise BundleError(f"--model {model}: {what}",
                      "pass an engine bundle (written by `step3-edge export`) or a checkpoint "
                      "folder (Hugging Face layout, with config.json)")
