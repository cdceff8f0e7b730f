"""AFD across processes: the attention side in this process (rank 0), the FFN side in one or
more FFN ranks, exchanging per layer the FFN input and top-k ids / weights, and the FFN output,
over `torch.distributed` point-to-point (gloo on CPU, NCCL between GPUs) with the batch split
into micro-batches, so that micro-batch i's attention overlaps micro-batch j's FFN (the Step3
paper's pipeline, 3 micro-batches by default).

Launch: `Step3Runtime.load(bundle, afd=True)` spawns the FFN ranks with torch.multiprocessing;
under torchrun every rank runs this module:

    torchrun --nproc-per-node 2 -m step3_edge.runtime.afd --bundle B "prompt" ...

rank 0 loads the runtime (`afd="env"`) and answers the prompts; the other ranks serve FFN.
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
from step3_edge.runtime import afd_ffn
from step3_edge.runtime.afd_engine import AFDEngine, split_segments
from step3_edge.runtime.afd_protocol import (MAX_MICRO_BATCHES, PROTOCOL, AFDWorkerError, Wire,
                                             make_groups, partition)
from step3_edge.runtime.engine import AttentionWorker
from step3_edge.runtime.planner import Plan

__all__ = ["AFDEngine", "split_segments", "start_afd", "main"]
DEFAULT_TIMEOUT = 300.0
FFN_OPTIONS = ("backend", "resident", "cache", "miss", "prefetch", "expert_counts", "bandwidths",
               "verify", "ort_threads")     # the load options an FFN rank needs


# ---------------------------------------------------------------------------- launching
def _ffn_devices(attn_dev: torch.device, n: int, given: list[str] | None) -> list[str]:
    if given is not None:
        if len(given) != n:
            raise ConfigError(f"ffn_devices={given!r} for {n} FFN rank(s)",
                              "give one device per FFN rank")
        return [str(d) for d in given]
    if attn_dev.type == "cuda" and torch.cuda.device_count() >= n + 1:
        free = [i for i in range(torch.cuda.device_count()) if i != attn_dev.index]
        return [f"cuda:{i}" for i in free[:n]]
    return [str(attn_dev)] * n


def start_afd(bundle: Path, plan: Plan, attn: AttentionWorker, o: dict[str, Any]) -> AFDEngine:
    """Start (afd=True) or join (afd="env") the FFN ranks, hand each its shard and the load
    options, and return the attention rank's engine once every FFN rank has loaded."""
    mode = o.get("afd")
    if mode not in (True, "spawn", "env"):
        raise ConfigError(f"afd={mode!r}", "use False, True (spawn FFN workers) or 'env' "
                          "(this process is rank 0 of a torchrun / env:// group)")
    micro = int(o.get("micro_batches", 3))
    if not 1 <= micro <= MAX_MICRO_BATCHES:
        raise ConfigError(f"micro_batches={micro}", f"use 1..{MAX_MICRO_BATCHES}")
    timeout = float(o.get("afd_timeout", DEFAULT_TIMEOUT))
    dev = attn.backend.device
    procs: list[Any] = []
    if dist.is_initialized() and mode != "env":
        raise ConfigError("a torch.distributed process group already exists in this process",
                          "load with afd='env' to use it, or close the other AFD runtime")
    if mode == "env":
        owns = not dist.is_initialized()
        if owns:
            backend = o.get("afd_backend") or ("nccl" if dev.type == "cuda" else "gloo")
            if backend == "nccl":
                torch.cuda.set_device(dev)
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        backend = dist.get_backend()
        if dist.get_rank() != 0 or dist.get_world_size() < 2:
            raise ConfigError(f"rank {dist.get_rank()} of {dist.get_world_size()} loaded the "
                              "AFD runtime", "only rank 0 loads it; the other ranks (at least "
                              "one) run `python -m step3_edge.runtime.afd` and serve FFN")
        devices: list[str | None] = [None] * (dist.get_world_size() - 1)
    else:
        n = int(o.get("ffn_ranks") or max(1, len(plan.ffn_devices) if
                                          any(d.role == "ffn" for d in plan.device_plans)
                                          else 1))
        devices = list(_ffn_devices(dev, n, o.get("ffn_devices")))
        cuda = [torch.device(d) for d in devices] + [dev]
        distinct = len({(d.type, d.index) for d in cuda}) == len(cuda)
        backend = o.get("afd_backend") or ("nccl" if all(d.type == "cuda" for d in cuda)
                                           and distinct else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(dev)
        procs = _spawn(backend, timeout, o.get("afd_threads"), devices)
        owns = True
    try:
        groups = make_groups(backend)
        wire_dev = dev if backend == "nccl" else torch.device("cpu")
        alive = (lambda: _dead(procs)) if procs else (lambda: None)
        wire = Wire(0, groups, backend, wire_dev, timeout, alive)
        shards = partition(plan, attn.cfg, len(devices))
        options = {k: o[k] for k in FFN_OPTIONS if o.get(k) is not None}
        if hasattr(options.get("bandwidths"), "__dataclass_fields__"):
            options["bandwidths"] = vars(options["bandwidths"])
        for r, (shard, d) in enumerate(zip(shards, devices), start=1):
            wire.send_json(r, {"protocol": PROTOCOL, "bundle": str(Path(bundle).resolve()),
                               "options": options, "shard": shard.to_dict(), "device": d,
                               "dtype": str(attn.backend.dtype).removeprefix("torch.")},
                           "receiving the handshake")
        workers = []
        for r in range(1, len(devices) + 1):
            hello = wire.recv_json(r, "loading its FFN shard")
            if not hello.get("ok"):
                raise AFDWorkerError(f"FFN rank {r} could not load: {hello.get('error')}",
                                     "see that worker's log for the traceback")
            workers.append({k: hello.get(k) for k in ("pid", "host", "device")})
    except BaseException:
        if owns and dist.is_initialized():
            dist.destroy_process_group()
        for p in procs:
            p.terminate()
        raise
    return AFDEngine(attn, wire, shards, micro, procs, owns, workers)


def _spawn(backend: str, timeout: float, threads: int | None, devices: list[str]
           ) -> list[Any]:
    """Start one FFN worker process per device and join the process group as rank 0."""
    world = len(devices) + 1
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout))
    threads = threads or max(1, (os.cpu_count() or 1) // world)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=afd_ffn.spawned_main, daemon=True,
                         args=(r, world, "127.0.0.1", store.port, backend, timeout, threads,
                               devices[r - 1]),
                         name=f"step3-edge-ffn-{r}") for r in range(1, world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    keys = [f"step3-afd-up-{r}" for r in range(1, world)]
    while not store.check(keys):                 # started workers check in, dead ones fail
        dead = _dead(procs)
        if dead or time.monotonic() > deadline:
            for p in procs:
                p.terminate()
            raise AFDWorkerError(f"an FFN worker did not start: {dead or 'timed out'}",
                                 "see the worker's stderr for its error")
        time.sleep(0.02)
    dist.init_process_group(backend, store=store, rank=0, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    return procs


def _dead(procs: list[Any]) -> str | None:
    gone = [f"FFN rank {i} (pid {p.pid}) exited with code {p.exitcode}"
            for i, p in enumerate(procs, start=1) if not p.is_alive()]
    return "; ".join(gone) or None


# ---------------------------------------------------------------------------- torchrun entry
def main(argv: list[str] | None = None) -> int:
    """`torchrun --nproc-per-node N -m step3_edge.runtime.afd --bundle B PROMPT...`: rank 0
    answers the prompts through the AFD runtime; ranks 1..N-1 serve the FFN side."""
    ap = argparse.ArgumentParser(prog="python -m step3_edge.runtime.afd",
                                 description=main.__doc__)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("prompts", nargs="*", default=["Hello"])
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--micro-batches", type=int, default=3)
    ap.add_argument("--afd-backend", default=None, choices=("gloo", "nccl"))
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--json", action="store_true")
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
        afd_ffn.serve_env(backend, args.timeout)
        return 0
    from step3_edge.runtime.api import Step3Runtime

    device = args.device or ("cuda:" + os.environ.get("LOCAL_RANK", "0") if cuda else "cpu")
    with Step3Runtime.load(args.bundle, afd="env", afd_backend=backend, device=device,
                           dtype=args.dtype, micro_batches=args.micro_batches,
                           afd_timeout=args.timeout) as rt:
        outs = rt.generate(list(args.prompts), max_new_tokens=args.max_new_tokens)
        for p, g in zip(args.prompts, outs):
            print(json.dumps({"prompt": p, "text": g.text, "token_ids": g.token_ids})
                  if args.json else f"{p!r} -> {g.text!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
