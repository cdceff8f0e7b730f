import copy
import json

import pytest

from step3_edge.config import Step3Config, fallback_report
from step3_edge.errors import ConfigError
from step3_edge.presets import PRESETS


def test_full_preset_matches_the_published_numbers():
    cfg = Step3Config.preset("full")
    counts = cfg.text_param_counts()
    assert round(counts["total"] / 1e9, 1) == 316.3          # the model card's "316B"
    assert round(counts["active"] / 1e9, 1) == 37.9          # lm_head counted, embedding not
    assert round(counts["active_with_embedding"] / 1e9, 1) == 38.8
    assert cfg.kv_bytes_per_token_per_layer(1) == 512        # paper: 512 B at 8 bits
    assert cfg.kv_bytes_per_token_per_layer(1) * 61 == 31232
    assert cfg.text_config.moe_layers == tuple(range(4, 60))
    assert cfg.text_config.dense_layers == (0, 1, 2, 3, 60)
    assert cfg.vision_tokens(728) == 169 and cfg.vision_tokens(504) == 81
    # paper Table 2: FFN FLOPs/token = 2 * (5 dense + 56 * 4 active experts)
    t = cfg.text_config
    ffn = 2 * (5 * 3 * t.hidden_size * t.intermediate_size
               + 56 * 4 * 3 * t.hidden_size * t.moe_intermediate_size)
    assert round(ffn / 1e10, 2) == 5.33


@pytest.mark.parametrize("name", ["tiny", "mini", "full"])
def test_preset_round_trips_through_config_json(tmp_path, name):
    cfg = Step3Config.preset(name)
    cfg.save(tmp_path)
    again = Step3Config.from_pretrained(tmp_path)
    assert again == cfg
    assert again.fallbacks == ()
    assert isinstance(json.loads((tmp_path / "config.json").read_text())["text_config"]
                      ["moe_layers_enum"], str)


def test_missing_fields_fall_back_explicitly():
    data = copy.deepcopy(PRESETS["full"])
    for key in ("rope_theta", "norm_expert_weight", "moe_layers_enum"):
        del data["text_config"][key]
    del data["vision_config"]["intermediate_size"]
    del data["understand_projector_stride"]
    cfg = Step3Config.from_dict(data)
    report = {name: (value, grade) for name, value, grade in fallback_report(cfg)}
    assert report["text_config.rope_theta"][0] == 500000.0
    assert report["text_config.norm_expert_weight"][0] is False
    # absent moe_layers_enum: vLLM makes every layer but the first MoE
    assert cfg.text_config.moe_layers == tuple(range(1, 61))
    assert "text_config.moe_layers_enum" in report
    # the class default 3072 is known wrong; the fallback is the derived 15360
    assert report["vision_config.intermediate_size"][0] == 15360
    assert report["understand_projector_stride"][0] == 2


@pytest.mark.parametrize("bad", [[4, 5, 6], 4, "4,x,6", "4,4,5", "4,99"])
def test_moe_layers_enum_must_be_a_valid_comma_string(bad):
    data = copy.deepcopy(PRESETS["full"])
    data["text_config"]["moe_layers_enum"] = bad
    with pytest.raises(ConfigError, match="moe_layers_enum"):
        Step3Config.from_dict(data)


def test_moe_layers_enum_tolerates_spaces():
    data = copy.deepcopy(PRESETS["tiny"])
    data["text_config"]["moe_layers_enum"] = " 1, 2 "
    assert Step3Config.from_dict(data).text_config.moe_layers == (1, 2)


@pytest.mark.parametrize("path,value,match", [
    (("text_config", "num_attention_groups"), 8, "num_attention_groups"),
    (("text_config", "hidden_size"), "7168", "hidden_size"),
    (("text_config", "norm_expert_weight"), "yes", "norm_expert_weight"),
    (("tie_word_embeddings",), True, "tie_word_embeddings"),
    (("understand_projector_stride",), 1, "understand_projector_stride"),
    (("text_config", "rope_scaling"), {"rope_type": "yarn", "factor": 4}, "rope_scaling"),
    (("model_type",), "llama", "model_type"),
])
def test_wrong_fields_raise_config_error(path, value, match):
    data = copy.deepcopy(PRESETS["tiny"])
    d = data
    for key in path[:-1]:
        d = d[key]
    d[path[-1]] = value
    with pytest.raises(ConfigError, match=match):
        Step3Config.from_dict(data)


def test_unreadable_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Step3Config.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        Step3Config.from_pretrained(tmp_path / "nowhere")


def test_rope_parameters_v5_style_is_read():
    data = copy.deepcopy(PRESETS["tiny"])
    del data["text_config"]["rope_theta"]
    data["text_config"]["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "default"}
    assert Step3Config.from_dict(data).text_config.rope_theta == 10000.0


def _with(name: str, path: tuple[str, ...], value):
    data = copy.deepcopy(PRESETS[name])
    d = data
    for key in path[:-1]:
        d = d.setdefault(key, {})
    d[path[-1]] = value
    return data


@pytest.mark.parametrize("path,value", [
    (("text_config", "num_attention_heads"), 0),
    (("text_config", "head_dim"), -32),
    (("text_config", "hidden_size"), 2**40),
    (("text_config", "vocab_size"), True),
    (("text_config", "num_hidden_layers"), 4.0),
    (("text_config", "rms_norm_eps"), -1e-5),
    (("text_config", "rms_norm_eps"), float("inf")),
    (("text_config", "rms_norm_eps"), float("nan")),
    (("text_config", "rope_theta"), float("nan")),
    (("text_config", "rope_theta"), -500000.0),
    (("text_config", "rope_theta"), "500000"),
    (("text_config", "max_position_embedding"), 0),
    (("text_config", "max_position_embedding"), -65536),
    (("vision_config", "patch_size"), 0),
    (("vision_config", "num_attention_heads"), 0),
    (("vision_config", "patch_size"), 500),
    (("vision_config", "layer_norm_eps"), 2.0),
    (("vision_config", "num_channels"), 4),
    (("text_config", "eos_token_id"), 10**6),
    (("torch_dtype",), "int3"),
    (("text_config", "rope_scaling"), {"rope_type": "linear", "factor": float("nan")}),
    (("quantization_config",), {"quant_method": "awq"}),
    (("quantization_config",), {"quant_method": "fp8", "weight_block_size": [0, 128]}),
    (("quantization_config",), {"quant_method": "fp8", "weight_block_size": ["128", "128"]}),
    (("quantization_config",), {"quant_method": "fp8", "weight_block_size": 128}),
    (("quantization_config",), {"quant_method": "step3_edge", "modules": {"x": "int2"}}),
    (("quantization_config",), "fp8"),
])
def test_every_out_of_range_field_is_a_config_error_naming_it(tmp_path, path, value):
    (tmp_path / "config.json").write_text(json.dumps(_with("tiny", path, value)))
    with pytest.raises(ConfigError) as e:
        Step3Config.from_pretrained(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "config.json") in msg                      # the file
    assert path[-1] in msg                                            # the field
    assert "expected" in msg and "remedy:" in msg                     # expected value, remedy


def test_all_bad_fields_are_reported_together():
    data = _with("tiny", ("text_config", "num_attention_heads"), 0)
    data["vision_config"]["patch_size"] = "14"
    data["text_config"]["rope_theta"] = float("-inf")
    with pytest.raises(ConfigError, match="3 invalid fields") as e:
        Step3Config.from_dict(data)
    for field in ("text_config.num_attention_heads is 0", "vision_config.patch_size is '14'",
                  "text_config.rope_theta is -inf"):
        assert field in str(e.value)


def test_random_valid_values_pass_and_random_invalid_ones_fail():
    import random

    r = random.Random()
    for _ in range(50):
        data = copy.deepcopy(PRESETS["tiny"])
        good = r.uniform(1e-7, 0.5)
        data["text_config"]["rms_norm_eps"] = good
        assert Step3Config.from_dict(data).text_config.rms_norm_eps == good
        data["text_config"]["rms_norm_eps"] = -r.uniform(1e-7, 1e3)
        with pytest.raises(ConfigError, match="rms_norm_eps"):
            Step3Config.from_dict(data)


def test_config_json_linked_outside_its_folder_is_refused(tmp_path):
    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps(PRESETS["tiny"]))
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").symlink_to(outside)
    with pytest.raises(ConfigError, match="outside its folder"):
        Step3Config.from_pretrained(tmp_path / "ck")


@pytest.mark.parametrize("raw", ["[" * 100000, "\xff\xfe{}", '{"text_config": 1}'])
def test_unparseable_or_deeply_nested_config_is_a_config_error(tmp_path, raw):
    (tmp_path / "config.json").write_bytes(raw.encode("latin-1"))
    with pytest.raises(ConfigError):
        Step3Config.from_pretrained(tmp_path)
