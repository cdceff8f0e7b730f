"""Cache policies, trace replay, the cost model and the paged KV pool."""

from __future__ import annotations

import pytest
import torch

from step3_edge.config import Step3Config
from step3_edge.errors import ConfigError, PromptError
from step3_edge.model import attention_mask, rope_cos_sin
from step3_edge.quantize.schemes import fp8_to_float
from step3_edge.runtime.expert_cache import (AGING, ExpertCache, replay, top_experts,
                                             trace_counts)
from step3_edge.runtime.cost_model import Bandwidths, CostModel
from step3_edge.runtime.kv import GroupCache, KVPool, plan_step


def test_lru_evicts_least_recently_used_and_respects_protect() -> None:
    c = ExpertCache(2, "lru", initial=[(1, 0), (1, 1)])
    c.touch((1, 0))                                    # (1, 1) is now the oldest
    assert c.admit((1, 2)) == (True, (1, 1))
    assert (1, 2) in c and (1, 1) not in c
    assert c.admit((1, 3), protect=frozenset({(1, 0), (1, 2)})) == (False, None)
    assert c.admit((1, 0)) == (False, None)            # already resident


def test_lfu_evicts_least_used_and_static_never_changes() -> None:
    c = ExpertCache(2, "lfu", initial=[(1, 0), (1, 1)])
    for _ in range(3):
        c.touch((1, 1))
    c.touch((1, 0))
    assert c.admit((1, 5)) == (True, (1, 0))
    s = ExpertCache(0, "static", pinned=[(1, 0)])
    assert (1, 0) in s and s.admit((1, 1)) == (False, None) and len(s) == 1
    with pytest.raises(ConfigError):
        ExpertCache(1, "fifo")


def test_lfu_counts_age_so_a_new_favourite_takes_over() -> None:
    c = ExpertCache(2, "lfu", initial=[(1, 0), (1, 1)])
    for _ in range(1000):                              # an old favourite pair
        c.touch((1, 0))
        c.touch((1, 1))
    for i in range(AGING * 2 * 4):                     # then only (1, 2) and (1, 3): 256 each
        key = (1, 2 + i % 2)
        c.touch(key)
        c.admit(key, protect=frozenset({key}))
    # without aging (1, 1) would keep its 1,000 uses and its slot, and (1, 2) and (1, 3) would
    # keep evicting each other
    assert c.resident == {(1, 2), (1, 3)}


def test_replay_hit_rates_and_prefetch() -> None:
    # two layers; layer 2's experts are exactly what its router predicted from layer 1
    steps = [[{"layer": 1, "experts": [s % 4, 4], "next": [(s + 1) % 4]},
              {"layer": 2, "experts": [(s + 1) % 4], "next": None}] for s in range(40)]
    lru = replay(steps, capacity=2, policy="lru")
    pre = replay(steps, capacity=2, policy="lru", prefetch=True)
    counts = trace_counts(steps, 5)
    pinned = replay(steps, capacity=0, policy="static", pinned=top_experts(counts, 2))
    assert lru["accesses"] == pre["accesses"] == 120
    assert pre["hit_rate"] > lru["hit_rate"]
    assert pre["prefetch_used"] >= 39                 # every step but the first was predicted
    assert counts[1][4] == 40 and pinned["hit_rate"] == pytest.approx(50 / 120)


def test_cost_model_moves_activations_for_decode_and_weights_for_prefill() -> None:
    gpu = Bandwidths(host_to_device=25e9, host_memory=100e9, device_memory=800e9,
                     host_flops=1e12, device_flops=300e12)
    cm = CostModel(gpu, hidden=7168, act_bytes=2, same_memory=False)
    nbytes, f = 110_000_000, lambda n: 6.0 * n * 7168 * 5120
    assert cm.choose(1, nbytes, f(1)) == "cpu"         # 1 token: 1.1 ms on CPU vs 4.4 ms copy
    assert cm.choose(4096, nbytes, f(4096)) == "copy"  # prefill: the CPU is compute-bound
    same = CostModel(gpu, 7168, 2, same_memory=True)
    assert same.cpu_seconds(1, nbytes, f(1)) < cm.cpu_seconds(1, nbytes, f(1))


def test_kv_pool_blocks_and_capacity() -> None:
    t = Step3Config.preset("tiny").text_config
    pool = KVPool(t, 64, torch.float32, torch.device("cpu"))
    a = pool.allocate(20)                              # 2 blocks
    b = pool.allocate(30)                              # 2 blocks
    assert a is not None and b is not None and pool.free_tokens == 0
    assert pool.allocate(5) is None                    # full for now
    with pytest.raises(PromptError, match="KV capacity"):
        pool.allocate(65)                              # never fits
    pool.release(a)
    assert pool.free_tokens == 32 and set(a.blocks) == set() and pool.allocate(16) is not None


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float8_e4m3fn])
def test_decode_group_gathers_each_sequence_and_masks_padding(kv_dtype: torch.dtype) -> None:
    t = Step3Config.preset("tiny").text_config
    pool = KVPool(t, 256, kv_dtype, torch.device("cpu"))
    seqs = [pool.allocate(40), pool.allocate(40)]
    d = t.head_dim
    stored = lambda x: x.to(kv_dtype).float()          # noqa: E731 - what the pool holds
    keys = [torch.randn(1, n, d) for n in (5, 17)]
    vals = [torch.randn(1, n, d) * 3 for n in (5, 17)]
    for s, k, v in zip(seqs, keys, vals):              # prefill each sequence on its own
        batch = plan_step(pool, [(s, k.shape[1])])
        kk, vv = GroupCache(pool, batch.groups[0]).update(0, k, v)
        assert torch.equal(kk, stored(k)) and torch.equal(vv, stored(v))
        batch.commit()
    batch = plan_step(pool, [(seqs[0], 1), (seqs[1], 1)])   # one padded decode group
    g = batch.groups[0]
    assert (g.b, g.t) == (2, 1) and g.gather.shape == (2, 18)
    new_k, new_v = torch.randn(2, 1, d), torch.randn(2, 1, d)
    kk, vv = GroupCache(pool, g).update(0, new_k, new_v)
    for i, n in enumerate((5, 17)):
        assert torch.equal(kk[i, :n + 1], stored(torch.cat([keys[i][0], new_k[i]])))
        assert torch.equal(vv[i, :n + 1], stored(torch.cat([vals[i][0], new_v[i]])))
    valid = torch.tensor([[True] * 6 + [False] * 12, [True] * 18])
    assert torch.equal(g.mask, attention_mask(torch.tensor([[5], [17]]), valid, 17))
    cos, _ = rope_cos_sin(torch.tensor([[5], [17]]), d, t.rope_theta)
    assert torch.equal(g.cos, cos) and batch.last_rows == [0, 1]


def test_fp8_decodes_like_torchs_cast() -> None:
    raw = torch.arange(256, dtype=torch.uint8)
    raw = raw[(raw & 0x7F) != 0x7F]                    # the two NaN patterns are never stored
    fp8 = raw.view(torch.float8_e4m3fn)
    got, want = fp8_to_float(fp8.view(2, 127)).view(-1), fp8.float()
    assert torch.equal(got, want)                      # incl. subnormals and +-448
    assert torch.equal(got.signbit(), want.signbit())  # -0.0 too
