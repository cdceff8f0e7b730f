"""The synthetic writer: real-width slices of the full config, and pieces that keep memory flat
while writing exactly what one whole-tensor draw would."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from step3_edge import synth, synth_cli
from step3_edge.checkpoint import CheckpointReader
from step3_edge.config import Step3Config
from step3_edge.errors import ConfigError
from step3_edge.layout import expected_weights
from step3_edge.presets import full_slice
from step3_edge.quantize.schemes import BlockFP8


def test_slice_keeps_every_width_and_the_dense_then_moe_pattern() -> None:
    cfg = Step3Config.from_dict(full_slice(3, experts=8, vision_layers=1))
    full = Step3Config.preset("full")
    t, ft = cfg.text_config, full.text_config
    for field in ("hidden_size", "num_attention_heads", "head_dim", "share_q_dim",
                  "intermediate_size", "moe_intermediate_size", "share_expert_dim",
                  "vocab_size", "moe_top_k"):
        assert getattr(t, field) == getattr(ft, field), field
    assert cfg.vision_config.hidden_size == full.vision_config.hidden_size == 1792
    assert (t.num_hidden_layers, t.moe_num_experts, cfg.vision_config.num_hidden_layers) == \
        (3, 8, 1)
    assert t.moe_layers == (1, 2) and t.dense_layers == (0,)
    assert Step3Config.from_dict(full_slice(4, dense_layers=2)).text_config.moe_layers == (2, 3)
    assert Step3Config.from_dict(full_slice(2)).text_config.moe_num_experts == 48


@pytest.mark.parametrize("kw", [{"layers": 0}, {"layers": 62}, {"layers": 2, "experts": 2},
                                {"layers": 2, "experts": 49}, {"layers": 2, "dense_layers": 3},
                                {"layers": 2, "vision_layers": 0}])
def test_slice_out_of_range_is_a_config_error(kw: dict) -> None:
    with pytest.raises(ConfigError, match="out of range"):
        full_slice(**kw)


def _args(**kw) -> argparse.Namespace:
    base = {"preset": "full", "layers": None, "experts": None, "vision_layers": None, "dense_layers": 1,
                "format": "bf16"}
    return argparse.Namespace(**{**base, **kw})


def test_cli_refuses_the_whole_full_model_with_its_size_and_depth_flags_elsewhere() -> None:
    with pytest.raises(ConfigError, match="642 GB") as e:
        synth_cli.slice_config(_args())
    assert "--layers" in e.value.remedy
    with pytest.raises(ConfigError, match="--experts only apply to --preset full"):
        synth_cli.slice_config(_args(preset="tiny", experts=4))
    assert synth_cli.slice_config(_args(layers=2, experts=4)).text_config.moe_num_experts == 4


def test_checkpoint_bytes_of_the_real_model() -> None:
    full = Step3Config.preset("full")
    assert 315e9 < synth.checkpoint_bytes(full, "block-fp8") < 335e9     # step3-fp8: 326 GB
    assert 630e9 < synth.checkpoint_bytes(full, "bf16") < 650e9


def test_pieces_cover_each_tensor_once_in_whole_blocks(monkeypatch) -> None:
    monkeypatch.setattr(synth, "CHUNK_ELEMS", 128 * 100)
    for shape in [(8, 96, 128), (320, 128), (1000, 40), (128,), (300, 32, 3, 3)]:
        covered = torch.zeros(shape[:-1] if len(shape) > 1 else (1,), dtype=torch.int32)
        for e, r0, r1 in synth.pieces(shape):
            assert r0 % 128 == 0
            (covered if e is None else covered[e])[r0:r1] += 1
        assert bool((covered == 1).all()), shape


@pytest.mark.parametrize("fmt", ["bf16", "block-fp8"])
def test_written_in_pieces_equals_the_whole_tensor(tmp_path: Path, monkeypatch,
                                                   fmt: str) -> None:
    """Small pieces force every path (by expert, by 128-row block, partial last block): each
    stored tensor equals `random_weight` (bf16) or its block-fp8 quantization, exactly."""
    monkeypatch.setattr(synth, "CHUNK_ELEMS", 128 * 60)
    cfg = Step3Config.preset("tiny")
    out = synth.write_checkpoint(cfg, tmp_path / "ck", fmt, seed=5, progress=False)
    reader = CheckpointReader(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == synth.checkpoint_bytes(cfg, fmt)
    many = 0
    for spec in expected_weights(reader.cfg).values():
        many += len(synth.pieces(spec.shape)) > 1
        want = synth.random_weight(spec, 5)
        if fmt == "block-fp8" and spec.is_linear:
            q = BlockFP8().quantize(want)
            got = reader.get_slice(spec.name)[:]
            assert torch.equal(got.view(torch.uint8), q[""].view(torch.uint8)), spec.name
            assert torch.equal(reader.get_slice(spec.name + "_scale_inv")[:], q["_scale_inv"])
        else:
            assert torch.equal(reader.read(spec.name).to(torch.bfloat16), want), spec.name
    assert many >= 10


def test_given_weights_are_written_in_pieces(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(synth, "CHUNK_ELEMS", 128 * 60)
    cfg = Step3Config.preset("tiny")
    g = torch.Generator().manual_seed(3)
    w = {s.name: torch.randn(s.shape, generator=g).to(torch.bfloat16)
         for s in expected_weights(cfg).values()}
    reader = CheckpointReader(synth.write_checkpoint(cfg, tmp_path / "ck", weights=w,
                                                     progress=False))
    for name, t in w.items():
        assert torch.equal(reader.read(name).to(torch.bfloat16), t), name
