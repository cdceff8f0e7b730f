"""A tampered artifact, a manifest path that leaves the bundle and an interrupted export are
each caught with a clear error."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
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
    rel = m.subgraphs["lm_head"].file
    data = bytearray((copy / rel).read_bytes())
    data[len(data) // 2] ^= 0x5A                       # same size: only the hash tells
    (copy / rel).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="lm_head.onnx does not match its sha256"):
        BundleGraphs(copy).session("lm_head")


def test_a_resized_or_deleted_artifact_is_refused_at_load(copy: Path) -> None:
    m = load_manifest(copy)
    rel = m.subgraphs["lm_head"].file
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


@pytest.mark.parametrize("io", [7, {"name": "hidden"}, {"name": "hidden", "dtype": "float32",
                                                        "shape": [-1]}])
def test_a_declared_graph_input_that_is_not_name_dtype_shape_is_refused(copy: Path, io) -> None:
    f = copy / "manifest.json"
    data = json.loads(f.read_text())
    data["subgraphs"]["lm_head"]["inputs"][0] = io
    f.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"subgraphs\['lm_head'\].inputs is .*expected a list "
                       r"of \{name, dtype, shape\}"):
        load_manifest(copy)


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


def _replace_and_rehash(bundle: Path, rel: str, raw: bytes) -> None:
    """Put other bytes in `rel` and give the manifest their size and sha256 (and its own
    hash): only the file's content tells it is not what it claims to be."""
    from step3_edge.manifest import Manifest, sha256_file, write_manifest

    (bundle / rel).write_bytes(raw)
    m = Manifest.from_dict(bundle, json.loads((bundle / "manifest.json").read_text()))
    write_manifest(replace(m, artifacts=tuple(
        replace(a, sha256=sha256_file(bundle / rel), bytes=len(raw)) if a.path == rel else a
        for a in m.artifacts)))


def test_a_graph_that_is_not_onnx_with_a_matching_hash_is_a_bundle_error(copy: Path) -> None:
    rel = load_manifest(copy).subgraphs["lm_head"].file
    _replace_and_rehash(copy, rel, b"not a protobuf" * 64)
    load_manifest(copy, verify=True)                  # the manifest itself is consistent
    with pytest.raises(BundleError, match=f"{rel} is not an ONNX graph ONNX Runtime") as e:
        BundleGraphs(copy).session("lm_head")
    assert "re-export" in e.value.remedy


def test_a_graph_swapped_for_another_of_the_bundle_is_a_bundle_error(copy: Path) -> None:
    from step3_edge.export.onnx_runner import check_io

    m = load_manifest(copy)
    rel = m.subgraphs["embed"].file                   # other weights: ORT refuses the binding
    _replace_and_rehash(copy, rel, (copy / m.subgraphs["lm_head"].file).read_bytes())
    with pytest.raises(BundleError, match=f"{rel} is not an ONNX graph"):
        BundleGraphs(copy).session("embed")
    # a graph that binds but has other inputs / outputs than its subgraph declares
    lm_head = BundleGraphs(copy).session("lm_head").session
    with pytest.raises(BundleError, match=r"onnx/embed.onnx has inputs \['hidden'\], but "
                       r"manifest.json declares \['input_ids'\]"):
        check_io(lm_head, m.subgraphs["embed"])


def test_a_tensorrt_plan_that_does_not_deserialize_is_a_bundle_error(copy: Path,
                                                                    monkeypatch) -> None:
    """TensorRT returns None for a plan it cannot read; the refit then fails with a
    TypeError. Checked without TensorRT: the backend's session factory alone."""
    import step3_edge.export.trt as trt_export
    from step3_edge.manifest import Artifact
    from step3_edge.runtime.trt_backend import TrtGraphs

    def refit(plan, values, logger=None, runtime=None):
        raise TypeError("__init__(): incompatible constructor arguments (engine: None)")

    monkeypatch.setattr(trt_export, "refit_engine", refit)
    g = TrtGraphs.__new__(TrtGraphs)
    g.logger = g.runtime = None
    g.device, g.trt = -1, type("trt", (), {"__version__": "10.x"})
    g.plans = {"lm_head": Artifact("device-0/trt/lm_head.plan", "trt", "0" * 64, 1)}
    g._bytes = {"lm_head": b"\0"}
    with pytest.raises(BundleError, match="device-0/trt/lm_head.plan is not a TensorRT engine"
                       ) as e:
        g._create("lm_head", {})
    assert "re-export" in e.value.remedy
