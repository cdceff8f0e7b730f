"""Data-parallel attention under AFD: several attention ranks (each with the KV cache of its own
sequences) x one or more FFN ranks that serve them all. Greedy tokens equal the reference's for
fixed and freshly drawn random prompts, concurrent requests land on different attention ranks,
an image prompt on a remote attention rank matches, torchrun launches it, and a dead worker is a
clear error."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from runtime_helpers import (FIXED_BW, MAX_NEW, reference_tokens, routed_tokens,
                             torchrun_tokens)
from PIL import Image

from step3_edge.config import Step3Config
from step3_edge.errors import ConfigError, PromptError, Step3EdgeError
from step3_edge.runtime import Step3Runtime
from step3_edge.runtime.afd_attn import BlockPool, ShardedKV
from step3_edge.runtime.afd_protocol import AFDWorkerError
from step3_edge.runtime.kv import KVPool

AFD = dict(dtype="float32", device="cpu", bandwidths=FIXED_BW, afd=True, afd_threads=1,
           afd_timeout=60)


@pytest.fixture(scope="module")
def random_prompts(rt) -> list[list[int]]:
    """Token-id prompts of random lengths drawn from a fresh seed (printed for replay)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random prompt seed {seed}")
    g = random.Random(seed)
    vocab = rt.config.text_config.vocab_size
    return [[g.randrange(3, vocab) for _ in range(g.randrange(3, 40))] for _ in range(4)]


def _threads(rt: Step3Runtime, prompts: list[list[int]], stagger: float) -> list[list[int]]:
    """generate() from one thread per prompt, started `stagger` s apart (so that new prompts
    prefill while earlier ones decode)."""
    out: list[list[int] | BaseException] = [[] for _ in prompts]

    def one(i: int) -> None:
        try:
            out[i] = rt.generate(prompts[i], max_new_tokens=MAX_NEW).token_ids
        except BaseException as e:  # noqa: BLE001 - re-raised below
            out[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for th in threads:
        th.start()
        time.sleep(stagger)
    for th in threads:
        th.join(timeout=300)
    for o in out:
        if isinstance(o, BaseException):
            raise o
    return out  # type: ignore[return-value]


@pytest.mark.parametrize("ffn,micro", [(1, 2), (2, 3)])
def test_two_attention_ranks_match_reference(ffn: int, micro: int, bundle: Path, prompts,
                                             reference, random_prompts, ref_model) -> None:
    stop = None
    with Step3Runtime.load(bundle, attention_ranks=2, ffn_ranks=ffn, micro_batches=micro,
                           vision=False, **AFD) as rt:
        stop = rt.processor.stop_token_ids
        want = [reference_tokens(ref_model, p, stop) for p in random_prompts]
        outs = rt.generate(prompts + random_prompts, max_new_tokens=MAX_NEW)  # one batch
        assert [o.token_ids for o in outs] == reference + want
        assert _threads(rt, random_prompts + prompts, 0.05) == want + reference
        s = rt.stats()
        assert s["backend"]["mode"].startswith(f"AFD: 2 attention ranks + {ffn} FFN")
        ranks = s["time"]["attention_ranks"]
        assert len(ranks) == 2 and all(r["sequences_placed"] >= 4 for r in ranks)
        assert all(r["steps"] > 0 and r["attention_s"] > 0 for r in ranks)
        assert len(s["experts"]["ranks"]) == ffn and s["experts"]["hit_rate"] == 1.0
        assert s["scheduler"]["kv_used_tokens"] == 0
        assert s["scheduler"]["kv_capacity_tokens"] == 2 * rt.engine.local.kv.capacity_tokens
        assert s["scheduler"]["prefix_cache"]["hit_tokens"] > 0     # the repeated prompts
        t = rt.config.text_config
        rt.reset_stats()
        gens = rt.generate(prompts[1:3], max_new_tokens=4)          # one on each rank
        tokens = routed_tokens(rt, prompts[1:3], gens)
        assert all(sum(c) == tokens * t.moe_top_k for c in rt.expert_counts().values())
        assert all(r["steps"] > 0 for r in rt.stats()["time"]["attention_ranks"])


def test_image_prompt_on_the_remote_attention_rank(bundle: Path, prompts, reference,
                                                   ref_model) -> None:
    """Vision runs on rank 0 (the scheduler's process); the image rows travel to the rank
    that holds the sequence."""
    with Step3Runtime.load(bundle, attention_ranks=2, ffn_ranks=1, micro_batches=2,
                           **AFD) as rt:
        img = Image.new("RGB", (96, 64), (30, 160, 60))
        msgs = [{"role": "user", "content": [{"type": "image", "image": img},
                                             {"type": "text", "text": "What colour?"}]}]
        ids, views = rt.processor.apply_chat(msgs)
        want = reference_tokens(ref_model, ids, rt.processor.stop_token_ids, images=views,
                                max_new=8)
        first = rt.submit(prompts[0], max_new_tokens=MAX_NEW)      # takes rank 0
        second = rt.submit(ids, views, max_new_tokens=8)            # goes to rank 1
        assert first.result().token_ids == reference[0]
        assert second.result().token_ids == want
        placed = [r["sequences_placed"] for r in rt.stats()["time"]["attention_ranks"]]
        assert placed == [1, 1]


def test_sharded_kv_places_on_the_least_loaded_rank() -> None:
    t = Step3Config.preset("tiny").text_config
    kv = ShardedKV([KVPool(t, 64, torch.float32, torch.device("cpu")),
                    BlockPool(t, 64, torch.float32)])
    assert kv.capacity_tokens == 128 and kv.free_tokens == 128
    a = kv.allocate(20)                                   # 2 blocks on rank 0
    b = kv.allocate(40)                                   # rank 1 (fewer live sequences)
    c = kv.allocate(10)                                   # rank 0 (1 vs 1: fewer tokens)
    assert [kv.rank_of(s)[0] for s in (a, b, c)] == [0, 1, 0]
    assert kv.allocate(40) is None                        # rank 0 has 1 block, rank 1 has 1
    d = kv.allocate(16)
    assert kv.rank_of(d)[0] == 1 and kv.free_tokens == 16
    with pytest.raises(PromptError, match="KV capacity of 64"):
        kv.allocate(80)                                   # one sequence must fit one rank
    kv.announced[1].add(kv.rank_of(b)[1])
    kv.release(b)
    kv.release(d)                                         # never sent: nothing to drop
    assert kv.drops[1] == [1] and kv.free_tokens == 16 + 64 and kv.live == [2, 0]
    assert kv.kv is kv.pools[0].kv                        # the rest is rank 0's pool


def test_attention_ranks_need_afd(bundle: Path) -> None:
    with pytest.raises(ConfigError, match="attention_ranks=2 without afd"):
        Step3Runtime.load(bundle, attention_ranks=2, dtype="float32", device="cpu",
                          bandwidths=FIXED_BW)
    with pytest.raises(ConfigError, match="attention ranks x"):
        Step3Runtime.load(bundle, attention_ranks=5, micro_batches=14, vision=False, **AFD)


@pytest.mark.parametrize("victim", ["attention", "ffn"])
def test_dead_worker_with_two_attention_ranks_is_a_clear_error(victim: str, bundle: Path,
                                                               prompts) -> None:
    rt = Step3Runtime.load(bundle, attention_ranks=2, ffn_ranks=1, vision=False,
                           **{**AFD, "afd_timeout": 4})
    try:
        assert all(g.token_ids for g in rt.generate(prompts[2:], max_new_tokens=2))
        proc = rt.engine.procs[0 if victim == "attention" else 1]       # rank 1 / rank 2
        os.kill(proc.pid, signal.SIGKILL)
        name = "attention rank 1" if victim == "attention" else "FFN rank 2"
        t0 = time.monotonic()
        with pytest.raises(Step3EdgeError, match=name) as e:
            rt.generate(prompts[:2], max_new_tokens=4)
        assert isinstance(e.value, AFDWorkerError) and e.value.remedy
        assert "exited with code" in str(e.value) and time.monotonic() - t0 < 30
        with pytest.raises(AFDWorkerError, match="pipeline is down"):
            rt.generate(prompts[1], max_new_tokens=2)
    finally:
        rt.close()


def test_torchrun_two_attention_ranks_match_one_process(bundle: Path, rt) -> None:
    """`torchrun --nproc-per-node 3 -m step3_edge.runtime.afd --attention-ranks 2`: ranks 0
    and 1 serve attention (each its own prompt), rank 2 the FFN; same tokens as one process."""
    prompts = ["Count to three.", "hi", "Name a colour"]
    got = torchrun_tokens(bundle, 3, prompts, "--attention-ranks", "2", "--micro-batches", "2",
                          "--threads", "1", timeout=240)
    assert got == [g.token_ids for g in rt.generate(prompts, max_new_tokens=6)]
