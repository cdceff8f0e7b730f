import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from step3_edge.checkpoint import CheckpointReader
from step3_edge.errors import CheckpointError
from step3_edge.layout import expected_weights
from step3_edge.quantize.schemes import FP8, BlockFP8, expand_blocks


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_real_names_shapes_and_block_fp8_layout(tiny_fp8, tiny_cfg):
    r = CheckpointReader(tiny_fp8)
    r.check()
    stored = set(r.stored_names())
    t = tiny_cfg.text_config
    # the layout (docs/model.md): separate q/k/v, inter_norm, wq, 3-D experts, router, shared expert
    assert "model.layers.1.moe.gate_proj.weight" in stored
    assert r.stored_shape("model.layers.1.moe.down_proj.weight") == (
        t.moe_num_experts, t.hidden_size, t.moe_intermediate_size)
    # block-fp8: scale [E, ceil(out/128), ceil(in/128)], float32; router / norm / embed bf16
    assert r.stored_shape("model.layers.1.moe.down_proj.weight_scale_inv") == (8, 1, 1)
    assert r.stored_dtype("model.layers.0.mlp.gate_proj.weight_scale_inv") == torch.float32
    assert r.stored_shape("model.layers.0.mlp.gate_proj.weight_scale_inv") == (3, 1)
    assert r.stored_dtype("model.layers.1.moe.gate_proj.weight") == FP8
    for name in ("model.layers.1.moe.gate.weight", "model.embed_tokens.weight",
                 "lm_head.weight", "model.layers.0.self_attn.inter_norm.weight",
                 "vision_model.embeddings.class_embedding", "vit_large_projector.weight"):
        assert r.stored_dtype(name) == torch.bfloat16, name
        assert name + "_scale_inv" not in stored
    prefixes = {n.split(".")[0] for n in stored}
    assert prefixes == {"model", "lm_head", "vision_model", "vit_downsampler",
                        "vit_downsampler2", "vit_large_projector"}
    index = json.loads((tiny_fp8 / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == stored


def test_dequantization_follows_the_spec_formula_with_partial_blocks(tiny_fp8):
    r = CheckpointReader(tiny_fp8)
    name = "model.layers.0.mlp.down_proj.weight"        # [128, 320]: 3 blocks, last 64 wide
    parts = r.read_parts(name)
    q, s = parts[""].float(), parts["_scale_inv"]
    manual = torch.empty_like(q)
    for o in range(q.shape[0]):
        for bi in range(s.shape[1]):
            manual[o, bi * 128:(bi + 1) * 128] = q[o, bi * 128:(bi + 1) * 128] * s[o // 128, bi]
    assert torch.equal(r.read(name), manual)


def test_one_expert_is_read_alone(tiny_fp8, tiny_bf16, rng):
    e = int(torch.randint(0, 8, (1,), generator=rng))
    for folder in (tiny_fp8, tiny_bf16):
        r = CheckpointReader(folder)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            name = f"model.layers.2.moe.{proj}.weight"
            assert torch.equal(r.read(name, expert=e), r.read(name)[e])


def test_block_fp8_round_trip_on_fresh_weights(rng):
    w = torch.randn(3, 200, 333, generator=rng)
    parts = BlockFP8().quantize(w)
    back = BlockFP8().dequantize(parts, tuple(w.shape))
    # e4m3 has 3 mantissa bits: relative error <= 2^-4 for normal numbers, plus the
    # subnormal spacing 2^-9 times the block scale for the smallest values
    scale = expand_blocks(parts["_scale_inv"], 128, 128, tuple(w.shape))
    assert ((back - w).abs() <= w.abs() * 2 ** -4 + scale * 2 ** -9 + 1e-12).all()


def test_truncated_shard_is_named(tiny_bf16, tmp_path):
    ck = _copy(tiny_bf16, tmp_path / "ck")
    shard = sorted(ck.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        CheckpointReader(ck).check()


def test_flipped_header_byte_is_named(tiny_bf16, tmp_path):
    ck = _copy(tiny_bf16, tmp_path / "ck")
    shard = sorted(ck.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[8 + 1] ^= 0xFF          # first bytes of the JSON header
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt|cannot open"):
        CheckpointReader(ck).check()


def _rewrite_shard(ck, edit):
    """Apply `edit(tensors)` to the shard holding layer 1 and fix the index."""
    index_path = ck / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    fname = index["weight_map"]["model.layers.1.moe.gate.weight"]
    tensors = load_file(ck / fname)
    edit(tensors)
    save_file(tensors, ck / fname)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items()
                           if v != fname or k in tensors}
    index["weight_map"].update({k: fname for k in tensors})
    index_path.write_text(json.dumps(index))


def test_missing_misshapen_wrong_dtype_and_unexpected_are_listed_together(tiny_fp8, tmp_path):
    ck = _copy(tiny_fp8, tmp_path / "ck")

    def edit(t):
        del t["model.layers.1.moe.gate.weight"]
        t["model.layers.1.share_expert.up_proj.weight_scale_inv"] = torch.ones(5, 5)
        t["model.layers.1.moe.up_proj.weight"] = t["model.layers.1.moe.up_proj.weight"].float()
        t["model.layers.1.moe.extra.weight"] = torch.ones(2)

    _rewrite_shard(ck, edit)
    with pytest.raises(CheckpointError) as err:
        CheckpointReader(ck).check()
    msg = str(err.value)
    assert "missing (1): model.layers.1.moe.gate.weight" in msg
    assert "unexpected (1): model.layers.1.moe.extra.weight" in msg
    assert "share_expert.up_proj.weight_scale_inv: [5, 5], expected [1, 1]" in msg
    assert "model.layers.1.moe.up_proj.weight: torch.float32, expected torch.float8_e4m3fn" in msg


def test_index_cannot_point_outside_the_folder(tiny_bf16, tmp_path):
    ck = _copy(tiny_bf16, tmp_path / "ck")
    index_path = ck / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../etc/passwd"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside"):
        CheckpointReader(ck)


def test_every_expected_tensor_is_stored(tiny_bf16, tiny_cfg):
    r = CheckpointReader(tiny_bf16)
    assert set(r.stored_names()) == set(expected_weights(tiny_cfg))


def hub_snapshot(src, root, repo="models--stepfun-ai--step3", rev=None):
    """`src` laid out as a Hugging Face hub cache: snapshots/<rev>/* link to ../../blobs/."""
    import hashlib
    import os

    rev = rev or os.urandom(20).hex()
    blobs, snap = root / repo / "blobs", root / repo / "snapshots" / rev
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (root / repo / "refs").mkdir()
    (root / repo / "refs" / "main").write_text(rev)
    for f in sorted(src.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blobs / digest)
        (snap / f.name).symlink_to(f"../../blobs/{digest}")
    return snap


def test_a_hugging_face_hub_cache_snapshot_loads(tiny_fp8, tmp_path, rng):
    from step3_edge.processor import Step3Processor

    snap = hub_snapshot(tiny_fp8, tmp_path / "hub")
    r = CheckpointReader(snap)
    r.check()
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(r.read(name), CheckpointReader(tiny_fp8).read(name))
    proc = Step3Processor.from_pretrained(snap)
    text = "".join(chr(int(c)) for c in torch.randint(97, 123, (12,), generator=rng))
    assert proc.decode(proc.encode(text)) == text


@pytest.mark.parametrize("victim", ["model.safetensors.index.json", "shard", "tokenizer.json",
                                    "config.json"])
def test_a_link_out_of_the_checkpoint_or_its_hub_repo_is_refused(tiny_fp8, tmp_path, victim):
    from step3_edge.errors import Step3EdgeError
    from step3_edge.processor import Step3Processor

    snap = hub_snapshot(tiny_fp8, tmp_path / "hub")
    if victim == "shard":
        victim = json.loads((tiny_fp8 / "model.safetensors.index.json").read_text())[
            "weight_map"]["model.norm.weight"]
    outside = tmp_path / "outside"
    outside.write_bytes((snap / victim).read_bytes())          # same bytes, outside the repo
    (snap / victim).unlink()
    (snap / victim).symlink_to(outside)
    with pytest.raises(Step3EdgeError, match="outside its folder or its Hugging Face hub"):
        CheckpointReader(snap).check()
        Step3Processor.from_pretrained(snap)


def test_tokenizer_linked_to_etc_passwd_is_refused(tiny_fp8, tmp_path):
    from step3_edge.errors import ConfigError
    from step3_edge.tokenizer import load_tokenizer

    ck = _copy(tiny_fp8, tmp_path / "ck")
    (ck / "tokenizer.json").unlink()
    (ck / "tokenizer.json").symlink_to("/etc/passwd")
    with pytest.raises(ConfigError, match="outside its folder"):
        load_tokenizer(ck)


@pytest.mark.parametrize("index,match", [
    ({"weight_map": ["model.norm.weight"]}, "weight_map is a list"),
    ({"weight_map": {"model.norm.weight": 1}}, r"weight_map\['model.norm.weight'\] is 1"),
    ({"weight_map": {}}, "weight_map is empty"),
    ([], "weight_map is a list"),
    ({"weight_map": {"model.norm.weight": "/etc/passwd"}}, "points outside the folder"),
    ({"weight_map": {"model.norm.weight": "sub/../../x.safetensors"}}, "points outside"),
    ({"metadata": [], "weight_map": {"model.norm.weight": "a.safetensors"}}, "metadata is"),
])
def test_malformed_index_is_a_checkpoint_error(tiny_fp8, tmp_path, index, match):
    ck = _copy(tiny_fp8, tmp_path / "ck")
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=match):
        CheckpointReader(ck)


def test_index_that_is_not_json_is_a_checkpoint_error(tiny_fp8, tmp_path, rng):
    ck = _copy(tiny_fp8, tmp_path / "ck")
    junk = bytes(torch.randint(0, 256, (64,), generator=rng, dtype=torch.uint8).tolist())
    (ck / "model.safetensors.index.json").write_bytes(b"{" + junk)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        CheckpointReader(ck)


def test_a_nan_weight_is_refused_on_read_naming_it(tiny_bf16, tmp_path, rng):
    ck = _copy(tiny_bf16, tmp_path / "ck")
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    name = "model.layers.1.input_layernorm.weight"
    shard = ck / index["weight_map"][name]
    tensors = load_file(shard)
    w = tensors[name].clone()
    w[int(torch.randint(0, w.numel(), (1,), generator=rng))] = float("nan")
    tensors[name] = w
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tensor '{name}' holds NaN or inf"):
        CheckpointReader(ck).read(name)
