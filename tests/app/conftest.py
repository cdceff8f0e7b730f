"""Fixtures for the app tests: the default bundle in a fresh cache, and `step3-edge app` /
`step3-edge serve` running as real subprocesses on 127.0.0.1, always shut down.

`STEP3_EDGE_APP_TEST_MODEL=CKPT` runs the tests on another checkpoint (exported once here)
instead of the embedded default model.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from app_helpers import (API_KEY, Served, default_is_trained,  # noqa: E402
                         printable_checkpoint, spawn, stop)


@pytest.fixture(scope="session")
def app_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment of the servers: a private cache folder, no analytics, few threads."""
    env = dict(os.environ)
    env.update(STEP3_EDGE_CACHE=str(tmp_path_factory.mktemp("cache")),
               GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(
                   tmp_path_factory.mktemp("gradio")), OMP_NUM_THREADS="2",
               PYTHONUNBUFFERED="1")
    return env


def _test_model(tmp: Path) -> Path | None:
    """The checkpoint to serve, or None for the embedded default (exported by the app)."""
    if os.environ.get("STEP3_EDGE_APP_TEST_MODEL"):
        return Path(os.environ["STEP3_EDGE_APP_TEST_MODEL"])
    return None if default_is_trained() else printable_checkpoint(tmp / "printable-tiny")


@pytest.fixture(scope="session")
def test_model(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    return _test_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def bundle(app_env: dict[str, str], test_model: Path | None) -> Path:
    """The bundle the servers run: the default model's, exported into the fresh cache with
    `default_bundle()` (or, while the default is untrained, a printable synthetic one)."""
    if test_model is not None:
        from step3_edge.export.bundle import export_bundle

        out = Path(app_env["STEP3_EDGE_CACHE"]) / "test-bundle"
        return export_bundle(test_model, "cpu", 1, out, onnx=False, trt=False, progress=False)
    mp = pytest.MonkeyPatch()
    mp.setenv("STEP3_EDGE_CACHE", app_env["STEP3_EDGE_CACHE"])
    try:
        from step3_edge.app.default_bundle import default_bundle

        return default_bundle(progress=False)
    finally:
        mp.undo()


@pytest.fixture(scope="session")
def gradio_app(bundle: Path, test_model: Path | None, app_env: dict[str, str],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`step3-edge app` on a free port; with the default model it gets no --model and finds
    the bundle in the (now warm) cache."""
    args = ["app", "--concurrency", "2"] + ([] if test_model is None else ["--model", str(bundle)])
    served = spawn(args, "/", tmp_path_factory.mktemp("logs") / "app.log", app_env)
    yield served
    stop(served.proc)


@pytest.fixture(scope="session")
def openai_server(bundle: Path, app_env: dict[str, str],
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`step3-edge serve --model B` on a free port (a request body has 3 s to arrive)."""
    served = spawn(["serve", "--model", str(bundle), "--model-name", "step3-test",
                    "--dtype", "float32", "--log-level", "warning", "--body-timeout", "3"],
                   "/health", tmp_path_factory.mktemp("logs") / "serve.log", app_env)
    yield served
    stop(served.proc)


@pytest.fixture(scope="session")
def keyed_server(bundle: Path, app_env: dict[str, str],
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`step3-edge serve --api-key KEY --kv-tokens 512` on a free port; ready once /livez
    (no key) answers."""
    served = spawn(["serve", "--model", str(bundle), "--model-name", "step3-test",
                    "--dtype", "float32", "--log-level", "warning", "--api-key", API_KEY,
                    "--kv-tokens", "512", "--resident", "1.0", "--miss", "cpu"],
                   "/livez", tmp_path_factory.mktemp("logs") / "keyed.log", app_env)
    yield served
    stop(served.proc)
