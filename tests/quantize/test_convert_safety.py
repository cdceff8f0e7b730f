"""Corrupt weights are refused while they stream, naming the tensor; `--force` replaces only
a checkpoint this tool wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from step3_edge.errors import CheckpointError, QuantizationError, Step3EdgeError
from step3_edge.quantize.convert import convert_checkpoint


def _edit(src: Path, dst: Path, name: str, edit) -> Path:
    shutil.copytree(src, dst)
    shard = dst / json.loads((dst / "model.safetensors.index.json").read_text())[
        "weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = edit(tensors[name].clone())
    save_file(tensors, shard, metadata={"format": "pt"})
    return dst


def _poison(value: float, rng: torch.Generator):
    def edit(t: torch.Tensor) -> torch.Tensor:
        flat = t.view(-1)
        flat[int(torch.randint(0, flat.numel(), (1,), generator=rng))] = value
        return t
    return edit


@pytest.mark.parametrize("fixture,name,value", [
    ("tiny_bf16", "model.embed_tokens.weight", float("nan")),      # copied as is (bf16)
    ("tiny_bf16", "model.layers.2.post_attention_layernorm.weight", float("nan")),  # a norm
    ("tiny_bf16", "model.layers.0.mlp.gate_proj.weight", float("inf")),  # requantized
    ("tiny_bf16", "model.layers.1.moe.down_proj.weight", float("-inf")),  # stacked experts
    ("tiny_fp8", "model.layers.3.mlp.up_proj.weight_scale_inv", float("nan")),
    ("tiny_fp8", "model.layers.3.mlp.up_proj.weight_scale_inv", float("inf")),
    ("tiny_fp8", "model.layers.1.moe.gate_proj.weight_scale_inv", 0.0),
    ("tiny_fp8", "model.layers.0.self_attn.wq.weight_scale_inv", -0.5),
])
@pytest.mark.parametrize("target", ["cpu", "l20"])
def test_non_finite_weights_and_bad_scales_are_refused_naming_the_tensor(
        request, tmp_path, rng, fixture, name, value, target) -> None:
    src = _edit(request.getfixturevalue(fixture), tmp_path / "ck", name, _poison(value, rng))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' holds"):
        convert_checkpoint(src, tmp_path / "q", target, progress=False)
    assert not (tmp_path / "q").exists()


def test_force_replaces_its_own_output(tiny_bf16: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    convert_checkpoint(tiny_bf16, out, "cpu", progress=False)
    stamp = (out / "config.json").stat().st_mtime_ns
    convert_checkpoint(tiny_bf16, out, "cpu", overwrite=True, progress=False)
    assert (out / "config.json").stat().st_mtime_ns != stamp


def test_force_never_replaces_what_it_did_not_write(tiny_bf16: Path, tmp_path: Path,
                                                     monkeypatch, rng) -> None:
    src = tmp_path / "models" / "ck"
    shutil.copytree(tiny_bf16, src)
    payload = bytes(torch.randint(0, 256, (97,), generator=rng, dtype=torch.uint8).tolist())
    plain = tmp_path / "notes.bin"
    plain.write_bytes(payload)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.jpg").write_bytes(payload)
    for out, why in ((src, "source checkpoint itself"), (src.parent, "input of this run"),
                     (plain, "not a folder this tool wrote"),
                     (other, "no readable config.json"), (tiny_bf16, "not one step3-edge")):
        with pytest.raises((QuantizationError, Step3EdgeError), match=why) as e:
            convert_checkpoint(src, out, "cpu", overwrite=True, progress=False)
        assert str(out) in str(e.value)
    monkeypatch.chdir(other)
    with pytest.raises(Step3EdgeError, match="current folder"):
        convert_checkpoint(src, Path("."), "cpu", overwrite=True, progress=False)
    assert plain.read_bytes() == payload and (other / "a.jpg").read_bytes() == payload
    assert (src / "config.json").is_file()


def test_tokenizer_linked_outside_is_refused_before_any_weight(tiny_bf16, tmp_path,
                                                               monkeypatch) -> None:
    from step3_edge.quantize import convert as C

    src = tmp_path / "ck"
    shutil.copytree(tiny_bf16, src)
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.json").symlink_to("/etc/passwd")
    monkeypatch.setattr(C._Converter, "weight", lambda *a: pytest.fail("a weight was read"))
    with pytest.raises(Step3EdgeError, match="tokenizer.json.*outside its folder"):
        convert_checkpoint(src, tmp_path / "q", "cpu", progress=False)


def test_a_hub_cache_snapshot_quantizes(tiny_fp8: Path, tmp_path: Path) -> None:
    import hashlib
    import os

    from step3_edge.checkpoint import CheckpointReader

    repo = tmp_path / "hub" / "models--stepfun-ai--step3-fp8"
    snap = repo / "snapshots" / os.urandom(20).hex()     # files link to ../../blobs/<sha>
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in tiny_fp8.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / digest)
        (snap / f.name).symlink_to(f"../../blobs/{digest}")
    out = convert_checkpoint(snap, tmp_path / "q", "cpu", progress=False).out
    tok = out / "tokenizer.json"
    assert not tok.is_symlink() and tok.read_bytes() == (tiny_fp8 / "tokenizer.json").read_bytes()
    CheckpointReader(out).check()
