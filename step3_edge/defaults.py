"""The embedded default model: what runs when no --model is given.

The default is the small trained checkpoint shipped in `step3_edge/assets/default-model`
(the exact Step3 structure trained on the shapes task by `train/train_default.py`; block-fp8,
with its tokenizer). Where that folder is absent (a tree it was removed from), the default
falls back to the synthetic `tiny` block-fp8 checkpoint (random weights, seed 0), written once
into the cache folder (`$STEP3_EDGE_CACHE`, else `~/.cache/step3-edge`).
"""

from __future__ import annotations

import os
from pathlib import Path

SHIPPED = Path(__file__).parent / "assets" / "default-model"
# example images shipped with the package (the demo's and the app's)
EXAMPLES = Path(__file__).parent / "assets" / "examples"


def cache_dir() -> Path:
    return Path(os.environ.get("STEP3_EDGE_CACHE", Path.home() / ".cache" / "step3-edge"))


def default_model() -> Path:
    """Path of the embedded default checkpoint, creating the synthetic one on first use."""
    if (SHIPPED / "config.json").is_file():
        return SHIPPED
    from step3_edge.config import Step3Config
    from step3_edge.synth import write_checkpoint

    out = cache_dir() / "default-tiny-block-fp8"
    if not (out / "config.json").is_file():
        write_checkpoint(Step3Config.preset("tiny"), out, "block-fp8", seed=0)
    return out
