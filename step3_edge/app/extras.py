"""Lazy imports of the `app` extra (gradio, fastapi, uvicorn) with a clear error when absent,
and the clean-up of error text shown to the app's and the server's users."""

from __future__ import annotations

import importlib
import importlib.util
import re
import threading
from types import ModuleType

from step3_edge.errors import MissingExtraError


def require(module: str, package: str, feature: str) -> ModuleType:
    """Import `module`, or raise MissingExtraError naming `package` and the `app` extra."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] != module.split(".")[0]:
            raise  # the package is there but one of its own imports is broken
        raise MissingExtraError(package, "app", feature) from e


def import_in_background(module: str, package: str, feature: str) -> threading.Thread:
    """Check that `module` is installed (MissingExtraError if not), then start importing it
    in a thread, so that a slow import overlaps the runtime's loading; `join()` it before use."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingExtraError(package, "app", feature)
    thread = threading.Thread(target=importlib.import_module, args=(module,), daemon=True,
                              name=f"import-{module}")
    thread.start()
    return thread


_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")
_DATA_URI = re.compile(r"(?:image )?data URI \(\d+ chars, [^)]*\)")
_EXC_NAME = re.compile(r"\b[A-Z]\w*(?:Error|Exception): ")


def plain_text(message: str) -> str:
    """An error message without Python object reprs (`<_io.BytesIO object at 0x...>`),
    exception class names or the echo of a data URI (-> "the image")."""
    message = _DATA_URI.sub("the image", message)
    message = _OBJECT_REPR.sub("", message)
    return _EXC_NAME.sub("", message)
