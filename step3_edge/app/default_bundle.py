"""The bundle of the embedded default model, exported for the `cpu` target on first use.

It lives in `step3_edge.defaults.cache_dir()/bundles/<model>-<fingerprint>-cpu`; the fingerprint
covers the checkpoint's config and file sizes, so a new default model gets a new bundle.
`export_bundle` writes into a staging folder and renames it into place, so an interrupted first
run leaves no half bundle behind.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from step3_edge.errors import BundleError

MANIFEST = "manifest.json"
DEFAULT_NAME = "step3-edge-default"


def _fingerprint(model_dir: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(model_dir)).encode())
        h.update(str(path.stat().st_size).encode())
        if path.name == "config.json":
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def default_bundle_path() -> Path:
    """Where the default bundle lives (whether or not it exists yet)."""
    from step3_edge.defaults import cache_dir, default_model

    model = default_model()
    return cache_dir() / "bundles" / f"{model.name}-{_fingerprint(model)}-cpu"


def default_bundle(progress: bool = True) -> Path:
    """The default model's `cpu` bundle, exporting it (with a progress bar) on first use."""
    from step3_edge.defaults import default_model
    from step3_edge.export.bundle import export_bundle

    out = default_bundle_path()
    if (out / MANIFEST).is_file():
        return out
    if progress:
        print(f"step3-edge: first use, exporting the default model to {out}", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        # the runtime's torch backend reads the weights; ONNX subgraphs are not needed
        return Path(export_bundle(default_model(), "cpu", 1, out, onnx=False, trt=False,
                                  progress=progress))
    except (BundleError, FileExistsError):
        if (out / MANIFEST).is_file():  # another process finished the same export first
            return out
        raise
