"""A bundle's manifest is a typed schema checked before any weight is read; files never leave
the bundle; `export --force` replaces only a bundle; the generate CLI refuses bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from step3_edge.cli import main
from step3_edge.errors import BundleError, Step3EdgeError
from step3_edge.manifest import load_manifest


@pytest.fixture
def copy(fp32_bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(fp32_bundle, out)
    return out


def _edit(bundle: Path, edit) -> None:
    f = bundle / "manifest.json"
    data = json.loads(f.read_text())
    edit(data)
    f.write_text(json.dumps(data))


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.pop("artifacts"), "manifest.artifacts is missing"),
    (lambda d: d.pop("plan"), "manifest.plan is missing"),
    (lambda d: d.pop("target"), "manifest.target is missing"),
    (lambda d: d["artifacts"][0].pop("sha256"), r"artifacts\[0\].sha256 is missing"),
    (lambda d: d["artifacts"][1].update(bytes="12"), r"artifacts\[1\].bytes is '12'"),
    (lambda d: d.update(devices="0,1"), "manifest.devices is '0,1'"),
    (lambda d: d["plan"]["device_plans"][0]["hot_experts"].append([1, 99]), "hot_experts"),
    (lambda d: d["plan"]["device_plans"][0]["hot_experts"].append([0, 1]), "hot_experts"),
    (lambda d: d["plan"].update(num_experts=3), "moe_num_experts"),
    (lambda d: d.update(subgraphs={}), "engines.onnx is set"),
    (lambda d: d.update(engines={"trt": {"built": False}}), "engines.onnx"),
    (lambda d: d["weights"].update(index="/etc/passwd"), "weights.index is '/etc/passwd'"),
    (lambda d: d["subgraphs"]["embed"].update(file="../embed.onnx"), "onnx artifact"),
    (lambda d: d["devices"][0]["subgraphs"].append("nothing"), "subgraph names"),
    (lambda d: d.update(schema_version="1"), "schema_version is '1'"),
    (lambda d: d.clear(), "schema_version is None"),
    (lambda d: d["config"]["text_config"].update(num_hidden_layers="4"),
     "num_hidden_layers is '4'"),
    (lambda d: d["config"].update(text_config=[4]), "moe_num_experts"),
    (lambda d: d["target"].pop("compute_capability"), "target.compute_capability is missing"),
    (lambda d: d["target"].update(memory_gib="45"), "target.memory_gib is '45'"),
    (lambda d: d["engines"]["onnx"].pop("opset"), "engines.onnx.opset is missing"),
    (lambda d: d["engines"]["trt"].update(shapes=[16]), r"engines.trt.shapes is \[16\]"),
    (lambda d: d.pop("export"), "manifest.export is missing"),
    (lambda d: d["export"].update(validated="yes"), "export.validated is 'yes'"),
])
def test_a_malformed_manifest_is_a_bundle_error(copy: Path, edit, match, capsys) -> None:
    _edit(copy, edit)
    with pytest.raises(BundleError, match=match):
        load_manifest(copy)
    assert main(["inspect", str(copy)]) == 2
    assert "error:" in capsys.readouterr().err


def test_an_edited_manifest_loads_but_fails_verify_and_inspect(copy: Path, capsys) -> None:
    _edit(copy, lambda d: d["plan"].update(cpu_mem_bytes=d["plan"]["cpu_mem_bytes"] + 4096))
    load_manifest(copy)                                   # the schema still holds
    with pytest.raises(BundleError, match="content hash mismatch"):
        load_manifest(copy, verify=True)
    assert main(["inspect", str(copy)]) == 2
    assert "content hash mismatch" in capsys.readouterr().err


def test_index_that_is_not_json_is_a_clean_error(copy: Path, rng) -> None:
    f = copy / "model.safetensors.index.json"
    size = f.stat().st_size
    junk = torch.randint(0, 256, (size,), generator=rng, dtype=torch.uint8)
    f.write_bytes(b"{" + bytes(junk.tolist())[1:])       # same size: only parsing tells
    with pytest.raises(BundleError, match="model.safetensors.index.json is not valid JSON"):
        load_manifest(copy)


def test_index_naming_a_file_that_is_not_a_weight_artifact_is_refused(copy: Path) -> None:
    f = copy / "model.safetensors.index.json"
    index = json.loads(f.read_text())
    index["weight_map"]["model.norm.weight"] = "tokenizer.json"
    f.write_text(json.dumps(index))
    _edit(copy, lambda d: [a.update(bytes=f.stat().st_size) for a in d["artifacts"]
                           if a["path"] == f.name])
    with pytest.raises(BundleError, match=r"not weight artifacts of the manifest: \['tokenizer"):
        load_manifest(copy)


@pytest.mark.parametrize("name", ["manifest.json", "tokenizer.json", "tokenizer_config.json"])
def test_links_out_of_the_bundle_are_refused(copy: Path, tmp_path: Path, name: str) -> None:
    from step3_edge.processor import Step3Processor

    outside = tmp_path / f"outside-{name}"
    shutil.move(copy / name, outside)
    (copy / name).symlink_to(outside)
    with pytest.raises(BundleError, match="outside its folder"):
        load_manifest(copy)
        Step3Processor.from_pretrained(copy)


def test_the_processor_reads_only_tokenizer_files_the_manifest_names(copy: Path) -> None:
    from step3_edge.processor import Step3Processor

    _edit(copy, lambda d: d.update(artifacts=[a for a in d["artifacts"]
                                              if a["path"] != "tokenizer.json"]))
    with pytest.raises(BundleError, match="artifacts lack tokenizer.json"):
        Step3Processor.from_pretrained(copy)


def _export(src: Path, out: Path, **kw) -> Path:
    from step3_edge.export.bundle import export_bundle

    return export_bundle(src, "cpu", 1, out, cpu_mem_bytes=8 << 30, onnx=False,
                         progress=False, **kw)


def test_export_force_replaces_only_a_bundle(tiny_bf16: Path, tmp_path: Path, monkeypatch,
                                             rng) -> None:
    src = tmp_path / "models" / "ck"
    shutil.copytree(tiny_bf16, src)
    payload = bytes(torch.randint(0, 256, (61,), generator=rng, dtype=torch.uint8).tolist())
    plain = tmp_path / "plain.bin"
    plain.write_bytes(payload)
    other = tmp_path / "docs"
    other.mkdir()
    (other / "thesis.txt").write_bytes(payload)
    before = sorted(p.name for p in src.iterdir())
    for out, why in ((src, "input of this run"), (src.parent, "input of this run"),
                     (plain, "not a folder this tool wrote"), (other, "not a bundle")):
        with pytest.raises(Step3EdgeError, match=why) as e:
            _export(src, out, overwrite=True)
        assert str(out) in str(e.value)
    monkeypatch.chdir(other)
    with pytest.raises(Step3EdgeError, match="current folder"):
        _export(src, Path("."), overwrite=True)
    bundle = _export(src, tmp_path / "b")
    (bundle / "my-notes.txt").write_bytes(payload)     # a file the manifest does not name
    with pytest.raises(Step3EdgeError, match="my-notes.txt"):
        _export(src, bundle, overwrite=True)
    (bundle / "my-notes.txt").unlink()
    _export(src, bundle, overwrite=True)
    assert sorted(p.name for p in src.iterdir()) == before
    assert plain.read_bytes() == payload and (other / "thesis.txt").read_bytes() == payload


def test_export_refuses_a_tokenizer_linked_outside(tiny_bf16: Path, tmp_path: Path) -> None:
    src = tmp_path / "ck"
    shutil.copytree(tiny_bf16, src)
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.json").symlink_to("/etc/passwd")
    with pytest.raises(Step3EdgeError, match="/etc/passwd, outside its folder"):
        _export(src, tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("extra,match", [
    (["--max-new-tokens", "1000000000"], "max_new_tokens 1000000000 does not fit"),
    (["--max-new-tokens", "0"], "max_new_tokens 0 does not fit"),
    (["--temperature", "nan"], "temperature nan"),
    (["--top-p", "inf"], "top_p inf"),
    (["--seed", str(2**64 + 7)], "seed 18446744073709551623"),
    (["--seed", "-1"], "seed -1"),
])
def test_generate_refuses_bad_parameters(tiny_bf16: Path, capsys, extra, match) -> None:
    assert main(["generate", "--model", str(tiny_bf16), *extra, "hi"]) == 2
    assert match in capsys.readouterr().err


def test_generate_refuses_an_undecodable_prompt(tiny_bf16: Path, capsys) -> None:
    prompt = b"caf\xe9 \xff".decode("utf-8", "surrogateescape")   # what argv holds
    assert main(["generate", "--model", str(tiny_bf16), "--max-new-tokens", "2", prompt]) == 2
    assert "not valid Unicode" in capsys.readouterr().err


def test_generate_refuses_a_bundle_without_its_manifest(copy: Path, capsys) -> None:
    (copy / "manifest.json").unlink()
    assert main(["generate", "--model", str(copy), "hi"]) == 2
    assert "has a bundle's layout" in capsys.readouterr().err
