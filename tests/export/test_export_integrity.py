"""A tampered artifact, a manifest path that leaves the bundle and an interrupted export are
each caught with a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from step3_edge.cli import main
from step3_edge.errors import BundleError, Step3EdgeError
from step3_edge.export.onnx_runner import BundleGraphs
from step3_edge.manifest import load_manifest


@pytest.fixture
def copy(fp32_bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(fp32_bundle, out)
    return out


def test_tampered_weights_fail_verification_and_inspect(copy: Path, capsys) -> None:
    m = load_manifest(copy)
    art = next(a for a in m.artifacts if a.kind == "weights")
    data = bytearray((copy / art.path).read_bytes())
    data[-1] ^= 0xFF                                   # same size, different bytes
    (copy / art.path).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{art.path}: sha256 mismatch"):
        load_manifest(copy, verify=True)
    assert main(["inspect", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "sha256 mismatch" in err and "re-export" in err


def test_tampered_graph_is_refused_when_a_session_is_created(copy: Path) -> None:
    m = load_manifest(copy)
    rel = m.subgraphs["lm_head"]["file"]
    data = bytearray((copy / rel).read_bytes())
    data[len(data) // 2] ^= 0x5A                       # same size: only the hash tells
    (copy / rel).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="lm_head.onnx does not match its sha256"):
        BundleGraphs(copy).session("lm_head")


def test_a_resized_or_deleted_artifact_is_refused_at_load(copy: Path) -> None:
    m = load_manifest(copy)
    rel = m.subgraphs["lm_head"]["file"]
    (copy / rel).write_bytes((copy / rel).read_bytes() + b"\0")
    with pytest.raises(BundleError, match=r"lm_head.onnx is \d+ bytes, the manifest says"):
        load_manifest(copy)
    (copy / rel).unlink()
    with pytest.raises(BundleError, match="lm_head.onnx of the manifest is missing"):
        load_manifest(copy)


def test_manifest_path_with_dotdot_is_refused(copy: Path, capsys) -> None:
    f = copy / "manifest.json"
    data = json.loads(f.read_text())
    data["artifacts"][0]["path"] = "../outside.json"
    f.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="leaves the bundle"):
        load_manifest(copy)
    assert main(["inspect", str(copy)]) == 2
    assert "leaves the bundle" in capsys.readouterr().err


def test_subgraph_file_outside_the_artifacts_is_refused(copy: Path) -> None:
    f = copy / "manifest.json"
    data = json.loads(f.read_text())
    data["subgraphs"]["embed"]["file"] = "config.json.bak"
    f.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"subgraphs\['embed'\].file is 'config.json.bak', "
                       "expected the path of an onnx artifact"):
        BundleGraphs(copy).session("embed")


def test_interrupted_export_leaves_no_bundle(tiny_bf16: Path, tmp_path: Path, monkeypatch
                                             ) -> None:
    import step3_edge.export.bundle as B

    def boom(*a, **k):
        raise KeyboardInterrupt                     # Ctrl-C in the middle of the export

    monkeypatch.setattr(B, "write_weights", boom)
    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        B.export_bundle(tiny_bf16, "cpu", 1, out, cpu_mem_bytes=8 << 30, onnx=False,
                        progress=False)
    assert not out.exists() and not (tmp_path / ".b.partial").exists()


def test_killed_export_is_reported_and_cleaned_up_by_the_next(tiny_bf16: Path, tmp_path: Path
                                                              ) -> None:
    from step3_edge.export.bundle import export_bundle

    out = tmp_path / "b"
    partial = tmp_path / ".b.partial"
    partial.mkdir()
    (partial / "device-0").mkdir()                  # what a SIGKILL mid-export leaves
    with pytest.raises(BundleError, match="interrupted export left .b.partial"):
        load_manifest(out)
    export_bundle(tiny_bf16, "cpu", 1, out, cpu_mem_bytes=8 << 30, onnx=False, progress=False)
    assert not partial.exists()
    assert load_manifest(out, verify=True).subgraphs == {}


def test_existing_bundle_needs_force(tiny_bf16: Path, fp32_bundle: Path) -> None:
    from step3_edge.export.bundle import export_bundle

    with pytest.raises(Step3EdgeError, match="already exists"):
        export_bundle(tiny_bf16, "cpu", 1, fp32_bundle, onnx=False, progress=False)
