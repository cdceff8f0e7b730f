"""The built wheel (not the editable checkout) carries the demo's example images, the default
model and its license; an installed wheel's app finds its examples inside the installed
package."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from app_helpers import REPO

from step3_edge.app.gradio_app import EXAMPLES as APP_EXAMPLES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", str(REPO), "-w", str(out)], check=True, capture_output=True,
                   cwd=out)
    (whl,) = out.glob("step3_edge-*.whl")
    return whl


def test_the_wheel_holds_the_examples_and_the_default_model(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for image, _question in APP_EXAMPLES:
        assert f"step3_edge/assets/examples/{image}" in names, image
    assert "step3_edge/assets/default-model/config.json" in names
    assert "step3_edge/assets/default-model/tokenizer.json" in names


def test_the_wheel_declares_its_license_in_spdx_form(wheel: Path) -> None:
    whl = zipfile.ZipFile(wheel)
    info = next(n.split("/")[0] for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
    meta = whl.read(f"{info}/METADATA").decode().split("\n\n")[0].splitlines()
    assert "License-Expression: Apache-2.0" in meta, meta
    assert "License-File: LICENSE" in meta and not any(m.startswith("License: ") for m in meta)
    assert whl.read(f"{info}/licenses/LICENSE") == (REPO / "LICENSE").read_bytes()


def test_an_installed_wheel_finds_its_examples(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.run([str(py), "-c", purelib], check=True, capture_output=True,
                               text=True).stdout.strip())
    # this environment's packages (torch, gradio, ...) without its editable step3_edge: a path
    # listed in a .pth file is added to sys.path, but the .pth files inside it are not run
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # --ignore-installed: the editable install seen through the .pth is left alone
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q",
                    str(wheel)], check=True, capture_output=True, env=env)
    code = ("import step3_edge, step3_edge.defaults as d\n"
            "from step3_edge.app.gradio_app import _examples\n"
            "ex = _examples()\n"
            "print(step3_edge.__file__)\n"
            "print(len(ex), all(__import__('os').path.isfile(f) for e in ex for f in "
            "e[0]['files']), all(f.startswith(str(d.EXAMPLES)) for e in ex for f in "
            "e[0]['files']))\n")
    out = subprocess.run([str(py), "-c", code], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env=env).stdout.split("\n")
    assert out[0].startswith(str(site)), out          # the installed copy, not the checkout
    assert out[1] == f"{len(APP_EXAMPLES)} True True", out
    version = subprocess.run([str(venv / "bin" / "step3-edge"), "--version"], check=True,
                             capture_output=True, text=True, cwd=tmp_path, env=env).stdout
    assert version.startswith("step3-edge ")
