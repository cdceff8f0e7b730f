"""Planner arithmetic against the published figures (the Step3 model card's parameter
counts, step3-fp8's size, the Step3 paper's KV bytes per token)."""

from __future__ import annotations

import json

import pytest

from step3_edge.cli import main
from step3_edge.config import Step3Config
from step3_edge.errors import ConfigError, PlanError
from step3_edge.quantize.schemes import SCHEMES
from step3_edge.runtime.planner import Plan, parse_size, plan_placement, weight_bytes_by_role
from step3_edge.targets import get_target

GiB = 2**30
# the L20's default scheme; block_fp8 (step3-fp8 as shipped) until it exists
FP8 = "fp8_per_channel" if "fp8_per_channel" in SCHEMES else "block_fp8"
FULL = Step3Config.preset("full")
L20 = get_target("l20")
H, M = 7168, 5120


def plan(cfg: Step3Config = FULL, devices: int = 8, **kw) -> Plan:
    kw.setdefault("cpu_mem_bytes", 512 * GiB)
    kw.setdefault("scheme", FP8)
    return plan_placement(cfg, L20, devices, **kw)


def check_invariants(p: Plan, cfg: Step3Config) -> None:
    t = cfg.text_config
    for d in p.device_plans:
        assert 0 <= d.total_bytes <= d.capacity_bytes
        assert d.kv_bytes == d.kv_tokens * p.kv_bytes_per_token
    hot = [x for d in p.device_plans for x in d.hot_experts]
    everything = {(L, e) for L in t.moe_layers for e in range(t.moe_num_experts)}
    assert len(hot) + len(p.cold_experts) == len(everything)
    assert set(hot) | set(p.cold_experts) == everything
    assert p.cold_bytes <= p.cpu_mem_bytes
    dense = sorted(L for d in p.device_plans for L in d.dense_layers)
    shared = sorted(L for d in p.device_plans for L in d.shared_expert_layers)
    assert dense == list(t.dense_layers) and shared == list(t.moe_layers)


def test_fp8_weights_match_the_published_sizes() -> None:
    by_role = weight_bytes_by_role(FULL, FP8)
    text = sum(v for r, v in by_role.items() if r != "vision")
    assert 316e9 <= text <= 326e9           # 316.3B params, ~1 byte each, bf16 embeddings
    assert 322e9 <= sum(by_role.values()) <= 328e9   # step3-fp8, with the bf16 vision tower
    bf16 = sum(weight_bytes_by_role(FULL, "bf16").values())
    assert 636e9 <= bf16 <= 648e9           # Step3 deploy guide: "about 642G"


def test_kv_and_expert_sizes_match_the_paper() -> None:
    p = plan(kv_tokens=8192)
    assert p.kv_bytes_per_token == 31_232 and p.kv_bytes_per_token / 1024 == 30.5
    assert plan(kv_tokens=8192, kv_bytes_per_elem=2).kv_bytes_per_token == 62_464
    assert 8192 * p.kv_bytes_per_token == pytest.approx(2.56e8, rel=0.01)  # Table 2
    assert 3 * H * M <= p.expert_bytes <= 3 * H * M * 1.01                # ~110 MB + scales
    assert p.expert_bytes == pytest.approx(110e6, rel=0.01)
    assert p.model_weight_bytes == sum(weight_bytes_by_role(FULL, FP8).values())


def test_full_on_8_l20_needs_offload_for_a_long_kv_budget() -> None:
    usable = 8 * (L20.memory_bytes * 0.95 - 2 * GiB)   # default headroom and reserve
    weights = sum(weight_bytes_by_role(FULL, FP8).values())
    kv_tokens = 192 * 8192                              # batch 192 at 8K
    deficit = weights + kv_tokens * 31_232 - usable
    assert deficit > 0                                  # cannot all be on the cards
    p = plan(kv_tokens=kv_tokens)
    check_invariants(p, FULL)
    assert p.kv_tokens == kv_tokens
    assert len(p.cold_experts) > 0 and p.cold_bytes >= deficit
    assert 0 < p.cold_bytes <= 512 * GiB
    assert {p.expert_location(L, e) for L, e in p.cold_experts} == {"cpu"}
    # the fp8 model (~305 GiB) is within reach of 8x48 GiB only with a short KV budget
    short = plan(kv_tokens=16 * 8192)
    check_invariants(short, FULL)
    assert short.kv_tokens == 16 * 8192 and len(short.attention_devices) == 1
    assert len(short.cold_experts) < len(p.cold_experts)


def test_cpu_memory_too_small_is_refused_with_numbers() -> None:
    with pytest.raises(PlanError) as e:
        plan(kv_tokens=192 * 8192, cpu_mem_bytes=1 * GiB)
    msg = str(e.value)
    assert "cold experts" in msg and "CPU" in msg and "1.00 GiB" in msg and e.value.remedy
    needed = float(msg.split(" = ")[1].split(" GiB")[0])
    assert needed > 1.0


def test_kv_budget_that_cannot_fit_is_refused() -> None:
    too_many = 8 * L20.memory_bytes // 31_232          # more KV than all cards hold
    with pytest.raises(PlanError, match="KV budget") as e:
        plan(kv_tokens=too_many)
    assert f"{too_many:,}" in str(e.value) and e.value.remedy
    with pytest.raises(PlanError, match="KV budget"):
        plan(kv_tokens=4 * 10**6, attention_devices=1)  # 122 GB on one 48 GiB card


def test_full_on_one_card() -> None:
    # one 48 GiB card holds the non-expert weights and one 64K sequence; most experts go cold
    p = plan(devices=1)
    check_invariants(p, FULL)
    assert p.device_plans[0].role == "both" and p.kv_tokens >= 65536
    assert len(p.cold_experts) > 2000
    with pytest.raises(PlanError, match="cold experts"):
        plan(devices=1, cpu_mem_bytes=p.cold_bytes - 1)
    # a 24 GiB card cannot hold attention + dense + shared weights (~29 GB in fp8)
    with pytest.raises(PlanError, match="non-expert weights"):
        plan_placement(FULL, get_target("a10"), 1, cpu_mem_bytes=512 * GiB, scheme=FP8)


def test_hot_experts_follow_expert_counts() -> None:
    t = FULL.text_config
    # expert e of layer L was used (L * 7 + e * 13) % 97 times: an arbitrary skewed profile
    counts = {L: [(L * 7 + e * 13) % 97 for e in range(t.moe_num_experts)] for L in t.moe_layers}
    p = plan(kv_tokens=192 * 8192, expert_counts=counts)
    check_invariants(p, FULL)
    hot = [x for d in p.device_plans for x in d.hot_experts]
    assert min(counts[L][e] for L, e in hot) >= max(counts[L][e] for L, e in p.cold_experts)
    # balanced: hot experts per FFN device differ by at most one
    sizes = [len(p.device_plans[d].hot_experts) for d in p.ffn_devices]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(PlanError, match="expert_counts"):
        plan(expert_counts={0: [1] * t.moe_num_experts})   # layer 0 is dense


def test_uniform_hot_set_is_round_robin_over_layers() -> None:
    p = plan(kv_tokens=192 * 8192)
    per_layer = {L: 0 for L in FULL.text_config.moe_layers}
    for L, _ in p.cold_experts:
        per_layer[L] += 1
    assert max(per_layer.values()) - min(per_layer.values()) <= 1


@pytest.mark.parametrize("preset", ["tiny", "mini"])
def test_small_presets_fit_on_one_device(preset: str) -> None:
    cfg = Step3Config.preset(preset)
    p = plan(cfg, devices=1, cpu_mem_bytes=0, scheme="bf16")
    check_invariants(p, cfg)
    assert p.cold_experts == () and p.device_plans[0].role == "both"
    assert p.kv_tokens >= cfg.text_config.max_context
    assert p.expert_location(cfg.text_config.moe_layers[0], 0) == 0


def test_explicit_split_and_json_round_trip() -> None:
    p = plan(kv_tokens=64 * 8192, attention_devices=2)
    check_invariants(p, FULL)
    assert p.attention_devices == (0, 1) and p.ffn_devices == tuple(range(2, 8))
    q = Plan.from_dict(json.loads(json.dumps(p.to_dict())))
    assert q == p
    assert q.expert_map() == p.expert_map()
    with pytest.raises(PlanError):
        p.expert_location(0, 0)                          # dense layer: no routed experts


def test_parse_size() -> None:
    assert parse_size("512GiB") == 512 * 2**30
    assert parse_size("64GB") == 64 * 10**9
    assert parse_size("1.5TiB") == int(1.5 * 2**40)
    assert parse_size("4096") == 4096
    for bad in ("12XB", "", "-1GiB", "GiB"):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_cli_prints_table(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--preset", "full", "--target", "l20", "--devices", "8",
            "--cpu-mem", "512GiB", "--scheme", FP8]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()]
    assert {r[0] for r in rows if r and r[0].isdigit()} == {str(i) for i in range(8)}
    assert "KV capacity" in out and "at 8K context" in out and "cold in CPU memory" in out
    assert main(argv + ["--context", "8192", "--batch", "192", "--json"]) == 0
    p = Plan.from_dict(json.loads(capsys.readouterr().out))
    assert p.kv_tokens == 192 * 8192 and p.cold_experts
    assert main(argv + ["--kv-tokens", "10", "--batch", "5"]) == 2
    small = [a if a != "512GiB" else "1GiB" for a in argv]
    assert main(small + ["--kv-tokens", str(192 * 8192)]) == 2
    assert "cold experts" in capsys.readouterr().err
