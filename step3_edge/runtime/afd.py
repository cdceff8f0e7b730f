"""AFD across processes: A attention ranks (rank 0 is this process, the scheduler's) and F FFN
ranks, exchanging per layer the FFN input and top-k ids / weights, and the FFN output, over
`torch.distributed` point-to-point (gloo on CPU, NCCL between GPUs) with each attention rank's
share of the batch split into micro-batches, so that micro-batch i's attention overlaps
micro-batch j's FFN (the Step3 paper's pipeline, 3 micro-batches by default). Attention is
data-parallel: each attention rank holds the attention weights and the KV cache of its own
sequences (`afd_attn` describes the step); the FFN ranks serve all of them.

Launch: `Step3Runtime.load(bundle, afd=True, attention_ranks=A, ffn_ranks=F)` spawns ranks
1..A+F-1 with torch.multiprocessing; under torchrun every rank runs this module:

    torchrun --nproc-per-node 3 -m step3_edge.runtime.afd --model B --attention-ranks 2 "p" ..

rank 0 loads the runtime (`afd="env"`) and answers the prompts; ranks 1..A-1 serve attention,
the others FFN (each learns its role from rank 0's handshake).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from step3_edge.errors import ConfigError
from step3_edge.plan import Plan
from step3_edge.runtime import afd_ffn
from step3_edge.runtime.afd_engine import AFDEngine, split_segments
from step3_edge.runtime.afd_protocol import (PROTOCOL, START_TIMEOUT, AFDWorkerError, Wire,
                                             make_groups, partition, peer_name)
from step3_edge.runtime.decisions import LoadDecisions
from step3_edge.runtime.engine import AttentionWorker

__all__ = ["AFDEngine", "split_segments", "start_afd", "main"]
DEFAULT_TIMEOUT = 300.0


# ---------------------------------------------------------------------------- launching
def start_afd(bundle: Path, plan: Plan, attn: AttentionWorker, d: LoadDecisions) -> AFDEngine:
    """Start (mode 'spawn') or join (mode 'env') the other ranks (attention ranks 1..A-1,
    then the FFN ranks) as `d.afd` decided, hand each its role, shard and the load's
    decisions, and return rank 0's engine once every rank has loaded."""
    a = d.afd
    assert a is not None
    m, micro, timeout = a.attention_ranks, a.micro_batches, a.timeout
    dev = attn.backend.device
    procs: list[Any] = []
    if a.mode == "env":
        owns = not dist.is_initialized()
        if owns:
            backend = a.dist_backend or ("nccl" if dev.type == "cuda" else "gloo")
            if backend == "nccl":
                torch.cuda.set_device(dev)
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        backend = dist.get_backend()
        world = dist.get_world_size()
        if dist.get_rank() != 0 or world < m + 1:
            if owns:
                dist.destroy_process_group()
            raise ConfigError(f"rank {dist.get_rank()} of {world} loaded the AFD runtime with "
                              f"{m} attention rank(s)", "only rank 0 loads it; the other ranks "
                              "run `python -m step3_edge.runtime.afd`, and at least one of "
                              "them serves FFN (world size > attention ranks)")
        devices: list[str | None] = [None] * (world - 1)
    else:
        devices = list(a.devices)
        backend = a.dist_backend or "gloo"
        if backend == "nccl":
            torch.cuda.set_device(dev)
        assert a.threads is not None
        procs = _spawn(backend, timeout, a.threads, list(a.devices), m)
        owns = True
    try:
        groups = make_groups(backend)
        wire_dev = dev if backend == "nccl" else torch.device("cpu")
        alive = (lambda: _dead(procs, m)) if procs else (lambda: None)
        wire = Wire(0, groups, backend, wire_dev, timeout, alive, attention_ranks=m)
        ffn_ranks = list(range(m, len(devices) + 1))
        shards = partition(plan, attn.cfg, len(ffn_ranks))
        common = {"protocol": PROTOCOL, "bundle": str(Path(bundle).resolve()),
                  "decisions": d.to_dict(), "attention_ranks": m}
        serving = [[r for r, s in zip(ffn_ranks, shards) if L in s.layers]
                   for L in range(attn.cfg.text_config.num_hidden_layers)]
        for r in range(1, m):
            wire.send_json(r, {**common, "role": "attention", "device": devices[r - 1],
                               "kv_tokens": attn.kv.capacity_tokens, "serving": serving,
                               "kv_dtype": str(attn.kv.dtype).removeprefix("torch.")},
                           "receiving the handshake")
        for r, shard in zip(ffn_ranks, shards):
            wire.send_json(r, {**common, "role": "ffn", "shard": shard.to_dict(),
                               "device": devices[r - 1]}, "receiving the handshake")
        workers = []
        for r in range(1, len(devices) + 1):
            hello = wire.recv_json(r, "loading its share" if r < m else "loading its FFN shard")
            if not hello.get("ok"):
                raise AFDWorkerError(f"{peer_name(r, m)} could not load: {hello.get('error')}",
                                     "see that worker's log for the traceback")
            if r < m and hello.get("kv_blocks") != attn.kv.num_blocks:
                raise AFDWorkerError(f"attention rank {r} has {hello.get('kv_blocks')} KV "
                                     f"blocks, rank 0 {attn.kv.num_blocks}",
                                     "run the same step3-edge version on every rank")
            workers.append({k: hello.get(k) for k in ("pid", "host", "device")})
    except BaseException:
        if owns and dist.is_initialized():
            dist.destroy_process_group()
        for p in procs:
            p.terminate()
        raise
    # spawned CPU workers share this machine's cores and idle during rank 0's lm_head
    lm_threads = os.cpu_count() if procs and dev.type == "cpu" else None
    return AFDEngine(attn, wire, shards, micro, procs, owns, workers[m - 1:], m, workers[:m - 1],
                     lm_threads)


def _spawn(backend: str, timeout: float, threads: int, devices: list[str], m: int
           ) -> list[Any]:
    """Start one worker process per device (attention ranks 1..m-1, then FFN ranks) and join
    the process group as rank 0."""
    world = len(devices) + 1
    start = max(timeout, START_TIMEOUT)
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=start))
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=afd_ffn.spawned_main, daemon=True,
                         args=(r, world, "127.0.0.1", store.port, backend, timeout, threads,
                               devices[r - 1]),
                         name=f"step3-edge-{'attn' if r < m else 'ffn'}-{r}")
             for r in range(1, world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + start
    keys = [f"step3-afd-up-{r}" for r in range(1, world)]
    while not store.check(keys):                 # started workers check in, dead ones fail
        dead = _dead(procs, m)
        if dead or time.monotonic() > deadline:
            for p in procs:
                p.terminate()
            raise AFDWorkerError(f"a worker did not start: {dead or 'timed out'}",
                                 "see the worker's stderr for its error")
        time.sleep(0.02)
    dist.init_process_group(backend, store=store, rank=0, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    return procs


def _dead(procs: list[Any], m: int = 1) -> str | None:
    gone = [f"{peer_name(i, m)} (pid {p.pid}) exited with code {p.exitcode}"
            for i, p in enumerate(procs, start=1) if not p.is_alive()]
    return "; ".join(gone) or None


# ---------------------------------------------------------------------------- torchrun entry
def main(argv: list[str] | None = None) -> int:
    """`torchrun --nproc-per-node N -m step3_edge.runtime.afd --model B PROMPT...`: rank 0
    answers the prompts through the AFD runtime; ranks 1..A-1 serve attention (data-parallel,
    `--attention-ranks A`, default 1 or the plan's attention devices), the rest the FFN side."""
    ap = argparse.ArgumentParser(prog="python -m step3_edge.runtime.afd",
                                 description=main.__doc__)
    ap.add_argument("--model", required=True, help="the bundle folder")
    ap.add_argument("prompts", nargs="*", default=["Hello"], help="prompts to answer")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="tokens per answer")
    ap.add_argument("--device", default=None, help="device of this rank (default: the plan's)")
    ap.add_argument("--dtype", default=None, help="compute dtype (default: the runtime's)")
    ap.add_argument("--micro-batches", type=int, default=3,
                    help="micro-batches in flight between the two sides")
    ap.add_argument("--attention-ranks", type=int, default=None,
                    help="attention ranks (rank 0 and the next A-1); the rest serve FFN")
    ap.add_argument("--afd-backend", default=None, choices=("gloo", "nccl"),
                    help="torch.distributed backend (default: nccl on CUDA, else gloo)")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                    help="seconds a rank waits for the others")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--json", action="store_true", help="print the answers as JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "RANK" not in os.environ:
        print("run me under torchrun (or set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)",
              file=sys.stderr)
        return 2
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    backend = args.afd_backend or ("nccl" if cuda else "gloo")
    if int(os.environ["RANK"]) != 0:
        afd_ffn.serve_env(backend, args.timeout)     # attention or FFN, as rank 0 says
        return 0
    from step3_edge.runtime.api import Step3Runtime

    device = args.device or ("cuda:" + os.environ.get("LOCAL_RANK", "0") if cuda else "cpu")
    with Step3Runtime.load(args.model, afd="env", afd_backend=backend, device=device,
                           dtype=args.dtype, micro_batches=args.micro_batches,
                           attention_ranks=args.attention_ranks,
                           afd_timeout=args.timeout) as rt:
        outs = rt.generate(list(args.prompts), max_new_tokens=args.max_new_tokens)
        for p, g in zip(args.prompts, outs):
            print(json.dumps({"prompt": p, "text": g.text, "token_ids": g.token_ids})
                  if args.json else f"{p!r} -> {g.text!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
