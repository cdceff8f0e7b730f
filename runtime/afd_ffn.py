"""An AFD FFN rank: receives its shard and the load options from the attention rank, builds
its FFN worker (the same `build_ffn` as the one-process runtime), then serves steps, statistics
and shutdown until told to stop or the attention rank goes away.

Entered by `afd.start_afd` through `torch.multiprocessing` (`spawned_main`) or by
`python -m step3_edge.runtime.afd` under torchrun (`serve_env`)."""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist

from step3_edge.runtime.afd_protocol import (IDLE, OP_RESET, OP_SHUTDOWN, OP_STATS, OP_STEP,
                                             OP_TRACE, PROTOCOL, AFDWorkerError, Wire,
                                             make_groups, message_bytes, unpack)
from step3_edge.runtime.engine import Shard


def spawned_main(rank: int, world: int, host: str, port: int, backend: str, timeout: float,
                 threads: int | None, device: str | None = None) -> None:
    """Entry of a spawned FFN worker process."""
    if threads:
        torch.set_num_threads(threads)
    if backend == "nccl" and device:
        torch.cuda.set_device(torch.device(device))
    store = dist.TCPStore(host, port, world, is_master=False,
                          timeout=datetime.timedelta(seconds=timeout))
    store.set(f"step3-afd-up-{rank}", str(os.getpid()))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    _serve_and_exit(backend, timeout)


def serve_env(backend: str, timeout: float) -> None:
    """Entry of an FFN rank launched by torchrun (env:// rendezvous)."""
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    _serve_and_exit(backend, timeout)


def _serve_and_exit(backend: str, timeout: float) -> None:
    groups = make_groups(backend)
    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" \
        else torch.device("cpu")
    wire = Wire(rank, groups, backend, device, timeout)
    try:
        FFNRank(wire).serve()
    except AFDWorkerError as e:       # the attention rank went away: nothing left to serve
        print(f"step3-edge AFD FFN rank {rank}: stopping: {e.problem}", file=sys.stderr)
    finally:
        dist.destroy_process_group()


class FFNRank:
    """The serving loop of one FFN rank."""

    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.ffn: Any = None
        self.seconds: list[float] = []
        self.steps = 0
        self.wait_s, self.cpu0 = 0.0, time.process_time()

    def serve(self) -> None:
        hello = self.wire.recv_json(0, "sending the handshake", IDLE.total_seconds())
        try:
            self._load(hello)
        except Exception as e:  # noqa: BLE001 - any load failure goes back to the caller
            traceback.print_exc()
            self.wire.send_json(0, {"ok": False, "error": f"{type(e).__name__}: {e}"},
                                "answering the handshake")
            return
        self.wire.send_json(0, {"ok": True, "pid": os.getpid(), "host": socket.gethostname(),
                                "device": str(self.device),
                                "backend": self.ffn_backend.describe()},
                            "answering the handshake")
        with torch.inference_mode():
            while True:
                head = self.wire.recv_header(0, "waiting for a request", IDLE.total_seconds())
                op = head[0]
                if op == OP_STEP:
                    self._step(head[2:2 + head[1]])
                elif op == OP_STATS:
                    self.wire.send_json(0, {"experts": self.ffn.expert_stats(),
                                            "counts": self.ffn.expert_counts(),
                                            "ffn_s": self.seconds, "steps": self.steps,
                                            "wait_s": self.wait_s,
                                            "cpu_s": time.process_time() - self.cpu0},
                                        "sending statistics")
                elif op == OP_RESET:
                    self.ffn.reset_stats()
                    self.seconds, self.steps = [0.0] * len(self.seconds), 0
                    self.wait_s, self.cpu0 = 0.0, time.process_time()
                elif op == OP_TRACE:
                    self.wire.send_json(0, self.ffn.record_trace(bool(head[1])), "sending trace")
                elif op == OP_SHUTDOWN:
                    self.wire.send_json(0, {"ok": True}, "acknowledging shutdown")
                    return

    def _load(self, hello: dict[str, Any]) -> None:
        from step3_edge.runtime.backends import make_backend
        from step3_edge.runtime.loading import build_ffn, open_bundle

        if hello.get("protocol") != PROTOCOL:
            raise AFDWorkerError(f"AFD protocol {hello.get('protocol')} from the attention "
                                 f"rank, this worker speaks {PROTOCOL}",
                                 "run the same step3-edge version on every rank")
        o = dict(hello["options"])
        manifest, plan, cfg, reader = open_bundle(hello["bundle"], bool(o.get("verify")))
        dev = hello.get("device") or (str(self.wire.device) if self.wire.backend == "nccl"
                                      else "cpu")
        self.device = torch.device(dev)
        self.ffn_backend = make_backend(o.get("backend", "torch"), dev, hello["dtype"],
                                        manifest=manifest, threads=o.get("ort_threads"))
        self.dtype = self.ffn_backend.dtype
        self.shard = Shard.from_dict(hello["shard"])
        self.ffn = build_ffn(cfg, reader, plan, self.ffn_backend, o, self.shard)
        t = cfg.text_config
        self.cfg = t
        self.layers = sorted(self.shard.layers)
        self.seconds = [0.0] * t.num_hidden_layers

    def _step(self, rows: list[int]) -> None:
        """One forward step: for each served layer, each micro-batch's message in order."""
        t, wire = self.cfg, self.wire
        self.ffn.begin_step()
        items = [(L, m) for L in self.layers for m in range(len(rows))]
        bufs = [wire.empty(message_bytes(rows[m], t.hidden_size, self.dtype.itemsize,
                                         t.moe_top_k, t.is_moe(L))) for L, m in items]
        recvs = [wire.irecv(b, 0) for b in bufs]              # all posted up front
        sends = []
        clock = time.perf_counter
        for (L, m), buf, work in zip(items, bufs, recvs):
            t0 = clock()
            wire.wait(work, 0, f"sending layer {L} micro-batch {m}")
            self.wait_s += clock() - t0
            t0 = clock()
            x, ids, w = unpack(buf, rows[m], t.hidden_size, self.dtype, t.moe_top_k,
                               t.is_moe(L))
            y = self.ffn.layer(L, x.to(self.device), None if ids is None else
                               ids.to(self.device), None if w is None else w.to(self.device))
            out = y.contiguous().view(torch.uint8).reshape(-1).to(wire.device)
            sends.append((wire.isend(out, 0), out))
            self.seconds[L] += clock() - t0
        for work, _ in sends:
            wire.wait(work, 0, "receiving FFN outputs")
        self.steps += 1
