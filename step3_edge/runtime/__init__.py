"""step3-edge runtime stage: placement planner, backends, expert store, engine, generate/chat API.

`from step3_edge.runtime import Step3Runtime` (imported lazily, so that `step3-edge plan` stays
light)."""

from __future__ import annotations

from typing import Any

__all__ = ["Step3Runtime", "Generation"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from step3_edge.runtime import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
