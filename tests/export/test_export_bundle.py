"""Bundle layout and manifest (docs/bundle.md): weights per device per the plan, readable as a
checkpoint; one small shared graph file per subgraph kind; `inspect`; TensorRT in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from step3_edge.checkpoint import CheckpointReader
from step3_edge.cli import main
from step3_edge.manifest import Manifest, load_manifest


@pytest.mark.parametrize("which", ["fp32_bundle", "cpu_bundle", "l20_bundle", "a10_bundle"])
def test_manifest_names_everything_the_runtime_reads(which: str, request) -> None:
    bundle: Path = request.getfixturevalue(which)
    m = load_manifest(bundle, verify=True)
    d = json.loads((bundle / "manifest.json").read_text())
    for key in ("schema_version", "created", "step3_edge_version", "source", "config",
                "target", "plan", "weights", "devices", "subgraphs", "engines", "artifacts"):
        assert key in d, key
    # the typed manifest holds all of it: it writes back the same content
    assert m.to_dict() == {k: v for k, v in d.items() if k != "manifest_sha256"}
    assert Manifest.from_dict(bundle, m.to_dict()) == m
    assert m.source.config_sha256 and d["target"]["name"] == m.target.name
    assert m.plan.devices == len([x for x in m.devices if x.index != "cpu"])
    paths = {a.path for a in m.artifacts}
    on_disk = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()}
    assert on_disk == paths | {"manifest.json"}        # nothing unnamed, nothing missing
    kinds = {a.kind for a in m.artifacts}
    assert {"config", "tokenizer", "weights", "onnx"} <= kinds
    for a in m.artifacts:
        if a.kind == "weights":
            assert a.meta["tensors"] and a.meta["devices"]
            assert all({"dtype", "shape"} <= set(t) for t in a.meta["tensors"].values())
    for name, sg in m.subgraphs.items():
        assert {"file", "inputs", "outputs", "dynamic_axes", "precision", "tolerance",
                "validation", "weights", "devices", "instances"} <= set(d["subgraphs"][name])
        assert sg.validation.max_abs <= sg.validation.allowed
        assert m.path(sg.file).stat().st_size < 200_000        # weights are not in the graph


def test_bundle_weights_read_like_a_checkpoint(l20_bundle: Path, tiny_bf16: Path) -> None:
    r = CheckpointReader(l20_bundle)
    r.check()
    assert r.cfg.quantization_config["quant_method"] == "step3_edge"
    assert r.scheme_of("model.layers.1.moe.up_proj.weight").name == "fp8_per_channel"
    src = CheckpointReader(tiny_bf16)
    for name in ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"):
        torch.testing.assert_close(r.read(name), src.read(name))
    w = r.read("model.layers.2.moe.down_proj.weight", expert=5)
    want = src.read("model.layers.2.moe.down_proj.weight", expert=5)
    assert (w - want).abs().max() <= 0.07 * want.abs().max()   # fp8 e4m3: 3 mantissa bits


def test_weights_live_in_the_folder_of_the_device_that_owns_them(l20_bundle: Path) -> None:
    m = load_manifest(l20_bundle)
    index = json.loads((l20_bundle / "model.safetensors.index.json").read_text())["weight_map"]
    plan = m.plan
    attn = [d.index for d in plan.device_plans if d.role == "attention"]
    assert index["model.layers.0.self_attn.q_proj.weight"].startswith(f"device-{attn[0]}/")
    assert index["lm_head.weight"].startswith(f"device-{attn[0]}/")
    assert index["vision_model.embeddings.class_embedding"].startswith(f"device-{attn[0]}/")
    assert index["model.layers.1.moe.gate_proj.weight"].startswith("experts/")
    for d in plan.device_plans:
        for L in d.dense_layers:
            assert index[f"model.layers.{L}.mlp.up_proj.weight"].startswith(f"device-{d.index}/")
        for L in d.shared_expert_layers:
            assert index[f"model.layers.{L}.share_expert.up_proj.weight"].startswith(
                f"device-{d.index}/")
    runs = {d.index: set(d.subgraphs) for d in m.devices}
    assert {"attn_moe", "lm_head", "vision_global"} <= runs[attn[0]]
    assert all("attn_moe" not in runs[d] for d in runs if d not in attn)
    assert any("expert" in runs[d] for d in runs if d not in attn)


def test_one_graph_file_per_kind_serves_every_layer(fp32_bundle: Path) -> None:
    m = load_manifest(fp32_bundle)
    sg = m.subgraphs
    assert set(sg) == {"embed", "attn_dense", "attn_moe", "expert", "shared_expert",
                       "dense_mlp", "lm_head", "vision_global", "vision_crop"}
    cfg = m.config.text_config
    assert len(sg["expert"].instances) == 2 * cfg.moe_num_experts
    assert [i[0] for i in sg["attn_dense"].instances] == [0, 3]
    assert sg["attn_moe"].dynamic_axes["past_k"] == {"0": "batch", "1": "past"}
    w = {b["name"]: b for b in sg["attn_moe"].weights}
    assert w["self_attn.q_proj.weight"]["tensor"] == "model.layers.{layer}.self_attn.q_proj.weight"
    assert len(list((fp32_bundle / "onnx").glob("*.onnx"))) == len(sg)


def test_quantized_weights_become_matmulnbits_on_cpu(cpu_bundle: Path) -> None:
    import onnx

    m = load_manifest(cpu_bundle)
    assert m.source.format == "block-fp8"
    g = onnx.load(str(m.path(m.subgraphs["expert"].file)), load_external_data=False)
    nbits = [n for n in g.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 3
    attrs = {a.name: a.i for a in nbits[0].attribute}
    assert attrs["bits"] == 8 and attrs["block_size"] == 128 and attrs["accuracy_level"] == 4
    assert all(i.data_location == onnx.TensorProto.EXTERNAL for i in g.graph.initializer)


def test_gpu_target_without_tensorrt_ships_onnx_and_says_so(l20_bundle: Path) -> None:
    pytest.importorskip("torch")
    m = load_manifest(l20_bundle)
    trt = m.engines.trt
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert trt.built is False and "tensorrt" in trt.reason
        assert not [a for a in m.artifacts if a.kind == "trt"]


def test_inspect_prints_a_summary_and_verifies(cpu_bundle: Path, capsys) -> None:
    assert main(["inspect", str(cpu_bundle)]) == 0
    out = capsys.readouterr().out
    assert "target cpu" in out and "attn_moe" in out and "int8" in out
    assert "verified" in out and "sha256 match" in out
    assert main(["inspect", str(cpu_bundle), "--json", "--no-verify"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["subgraphs"]["expert"]["precision"] == "int8"


def test_export_cli_summary_and_refusal_to_overwrite(cpu_bundle: Path, tiny_fp8: Path, capsys
                                                     ) -> None:
    code = main(["export", "--model", str(tiny_fp8), "--target", "cpu", "--out",
                 str(cpu_bundle), "--quiet"])
    assert code == 2
    assert "already exists" in capsys.readouterr().err
