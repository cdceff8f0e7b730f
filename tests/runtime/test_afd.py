"""AFD across processes: attention in this process, FFN in spawned worker processes over
torch.distributed (gloo), micro-batched; greedy tokens equal the reference; a dead or stuck FFN
worker is a clear Step3EdgeError on the caller, not a hang."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from runtime_helpers import FIXED_BW, MAX_NEW, routed_tokens, torchrun_tokens

from step3_edge.config import Step3Config
from step3_edge.errors import Step3EdgeError
from step3_edge.runtime import Step3Runtime
from step3_edge.runtime.afd_engine import split_segments
from step3_edge.runtime.afd_protocol import AFDWorkerError, partition
from step3_edge.runtime.engine import Shard
from step3_edge.runtime.kv import SeqKV
from step3_edge.runtime.planner import Plan

AFD = dict(dtype="float32", device="cpu", bandwidths=FIXED_BW, vision=False, afd=True,
           afd_threads=1, afd_timeout=60)


@pytest.mark.parametrize("ranks,micro", [(1, 3), (2, 2)])
def test_afd_greedy_tokens_equal_reference(ranks: int, micro: int, bundle: Path, prompts,
                                           reference) -> None:
    with Step3Runtime.load(bundle, ffn_ranks=ranks, micro_batches=micro, **AFD) as rt:
        outs = rt.generate(prompts, max_new_tokens=MAX_NEW)          # one continuous batch
        assert [o.token_ids for o in outs] == reference
        assert rt.scheduler.threads == 1          # rank 0 takes afd_threads, like its workers
        seen: dict[str, set[int]] = {"logits": set(), "layer": set()}
        local = rt.engine.local
        for name in seen:                         # intra-op threads while each part runs
            def spy(*a, _f=getattr(local, name), _n=name):
                seen[_n].add(torch.get_num_threads())
                return _f(*a)
            setattr(local, name, spy)
        rt.generate(prompts[:2], max_new_tokens=3)
        # the lm_head takes the cores the idle workers leave; the layers keep afd_threads
        assert seen == {"logits": {os.cpu_count()}, "layer": {1}}
        for name in seen:
            delattr(local, name)
        s = rt.stats()
        assert s["backend"]["mode"].startswith(f"AFD: 1 attention rank + {ranks} FFN")
        assert len(s["experts"]["ranks"]) == ranks and s["experts"]["hit_rate"] == 1.0
        assert sum(s["time"]["ffn_s"]) > 0 and s["time"]["steps"] > 0
        t = rt.config.text_config
        rt.reset_stats()
        g = rt.generate(prompts[3], max_new_tokens=4)
        tokens = routed_tokens(rt, [prompts[3]], [g])                 # prompts[3] hits
        counts = rt.expert_counts()                                  # summed over ranks
        assert all(sum(c) == tokens * t.moe_top_k for c in counts.values())
        rt.record_trace(True)
        rt.generate(prompts[3], max_new_tokens=2)
        trace = rt.record_trace(False)
        assert trace and all(r["layer"] in t.moe_layers for step in trace for r in step)


def test_afd_partial_residency_matches_reference(bundle: Path, prompts, reference) -> None:
    with Step3Runtime.load(bundle, ffn_ranks=1, micro_batches=3, resident=0.25, miss="cpu",
                           cache="static", **AFD) as rt:
        outs = rt.generate(prompts[:2], max_new_tokens=MAX_NEW)
        assert [o.token_ids for o in outs] == reference[:2]
        assert rt.stats()["experts"]["cpu_computed"] > 0


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_dead_or_stuck_ffn_worker_is_a_clear_error(how: str, bundle: Path, prompts) -> None:
    kw = {**AFD, "afd_timeout": 4}
    rt = Step3Runtime.load(bundle, ffn_ranks=1, **kw)
    try:
        assert rt.generate(prompts[3], max_new_tokens=2).token_ids
        pid = rt.engine.procs[0].pid
        os.kill(pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(Step3EdgeError, match="FFN rank 1") as e:
            rt.generate(prompts[0], max_new_tokens=4)
        assert isinstance(e.value, AFDWorkerError) and e.value.remedy
        assert time.monotonic() - t0 < 30
        if how == "kill":
            assert "exited with code" in str(e.value)
        with pytest.raises(AFDWorkerError, match="pipeline is down"):
            rt.generate(prompts[1], max_new_tokens=2)
        if how == "stop":
            os.kill(pid, signal.SIGKILL)
    finally:
        rt.close()


def test_split_segments_and_partition() -> None:
    segs = [(SeqKV([0], 16), 1) for _ in range(16)]
    parts = split_segments(segs, 3)
    assert [len(p) for p in parts] == [6, 5, 5] and sum(parts, []) == segs
    assert [len(p) for p in split_segments(segs[:2], 3)] == [1, 1]
    mixed = segs[:4] + [(SeqKV([1, 2], 32), 20)]
    assert sum(split_segments(mixed, 3), []) == mixed
    cfg = Step3Config.preset("tiny")
    t = cfg.text_config
    from step3_edge.runtime.planner import plan_placement
    from step3_edge.targets import get_target

    plan = plan_placement(cfg, get_target("cpu"), 1, cpu_mem_bytes=8 << 30)
    for n in (1, 2, 3):
        shards = partition(plan, cfg, n)
        _covers_once(shards, t)
    gpu = plan_placement(cfg, get_target("l20"), 3, cpu_mem_bytes=8 << 30)
    assert isinstance(gpu, Plan) and len(gpu.ffn_devices) == 2
    _covers_once(partition(gpu, cfg, 2), t)


def _covers_once(shards: list[Shard], t) -> None:
    every = Shard.everything(t)
    for field in ("experts", "dense_layers", "shared_layers"):
        items = [x for s in shards for x in getattr(s, field)]
        assert len(items) == len(set(items)) and set(items) == getattr(every, field)


def test_torchrun_launch_matches_one_process(bundle: Path, rt) -> None:
    """`torchrun --nproc-per-node 2 -m step3_edge.runtime.afd` (env:// rendezvous): rank 0
    answers through the AFD runtime, rank 1 serves FFN; same tokens as one process."""
    prompts = ["Count to three.", "hi"]
    got = torchrun_tokens(bundle, 2, prompts)
    assert got == [g.token_ids for g in rt.generate(prompts, max_new_tokens=6)]
