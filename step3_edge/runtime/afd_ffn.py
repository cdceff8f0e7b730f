"""An AFD worker rank (every rank but 0). Its handshake from rank 0 makes it an attention rank
(`afd_attn.AttentionRank`) or an FFN rank: an FFN rank builds its FFN side for its shard (with
the builder the one-process runtime uses: `builders.make_builder`), then serves steps,
statistics and shutdown until told to stop or rank 0 goes away. Each step it takes every
(layer, micro-batch) from all the attention ranks with rows in it, runs the FFN once on their
concatenation and returns each attention rank its rows (see afd_attn's docstring for the
order and why it cannot deadlock).

Entered by `afd.start_afd` through `torch.multiprocessing` (`spawned_main`) or by
`python -m step3_edge.runtime.afd` under torchrun (`serve_env`)."""

from __future__ import annotations

import datetime
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from step3_edge.runtime.afd_protocol import (IDLE, OP_RESET, OP_SHUTDOWN, OP_STATS, OP_STEP,
                                             OP_TRACE, START_TIMEOUT, AFDWorkerError, Wire,
                                             answer_handshake,
                                             open_worker_bundle,
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
                          timeout=datetime.timedelta(seconds=max(timeout, START_TIMEOUT)))
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
    role = "FFN"
    try:
        hello = wire.recv_json(0, "sending the handshake", IDLE.total_seconds())
        wire.attention_ranks = int(hello.get("attention_ranks", 1))
        if hello.get("role") == "attention":
            from step3_edge.runtime.afd_attn import serve_attention

            role = "attention"
            serve_attention(wire, hello)
        else:
            FFNRank(wire).serve(hello)
    except AFDWorkerError as e:       # a peer went away: nothing left to serve
        print(f"step3-edge AFD {role} rank {rank}: stopping: {e.problem}", file=sys.stderr)
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

    def serve(self, hello: dict[str, Any]) -> None:
        if not answer_handshake(self.wire, lambda: self._load(hello)):
            return
        with torch.inference_mode():
            while True:
                head = self.wire.recv_header(0, "waiting for a request", IDLE.total_seconds())
                op = head[0]
                if op == OP_STEP:
                    a, m = self.wire.attention_ranks, head[1]
                    self._step([head[2 + i * m:2 + (i + 1) * m] for i in range(a)])
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

    def _load(self, hello: dict[str, Any]) -> dict[str, Any]:
        d, _, plan, cfg, reader, builder = open_worker_bundle(hello, self.wire)
        self.device, self.dtype = builder.backend.device, builder.backend.dtype
        self.shard = Shard.from_dict(hello["shard"])
        self.ffn = builder.build_ffn(cfg, reader, plan, d.options.experts,
                                     d.options.bandwidths, shard=self.shard)
        t = cfg.text_config
        self.cfg = t
        self.layers = sorted(self.shard.layers)
        self.seconds = [0.0] * t.num_hidden_layers
        return {"device": str(self.device), "backend": builder.backend.describe()}

    def _step(self, rows: list[list[int]]) -> None:
        """One forward step; rows[a][m] = attention rank a's rows in micro-batch m. For each
        served layer and micro-batch in order: every attention rank's message, one FFN call
        on their concatenation, each rank's rows back."""
        t, wire = self.cfg, self.wire
        self.ffn.begin_step()
        mbs = len(rows[0]) if rows else 0
        items = [(L, m) for L in self.layers for m in range(mbs) if any(r[m] for r in rows)]
        posted = []                                           # all receives posted up front
        for L, m in items:
            parts = []
            for a, r in enumerate(rows):
                if r[m]:
                    buf = wire.empty(message_bytes(r[m], t.hidden_size, self.dtype.itemsize,
                                                   t.moe_top_k, t.is_moe(L)))
                    parts.append((a, buf, wire.irecv(buf, a)))
            posted.append(parts)
        sends = []
        clock = time.perf_counter
        for (L, m), parts in zip(items, posted):
            t0 = clock()
            for a, _, work in parts:
                wire.wait(work, a, f"sending layer {L} micro-batch {m}")
            self.wait_s += clock() - t0
            t0 = clock()
            got = [unpack(buf, rows[a][m], t.hidden_size, self.dtype, t.moe_top_k,
                          t.is_moe(L)) for a, buf, _ in parts]
            x, ids, w = got[0] if len(got) == 1 else _concat(got)        # [sum n_a, .]
            y = self.ffn.layer(L, x.to(self.device), None if ids is None else
                               ids.to(self.device), None if w is None else w.to(self.device))
            ys = [y] if len(parts) == 1 else y.split([rows[a][m] for a, _, _ in parts])
            for (a, _, _), part in zip(parts, ys):
                out = part.contiguous().view(torch.uint8).reshape(-1).to(wire.device)
                sends.append((wire.isend(out, a), out, a))
            self.seconds[L] += clock() - t0
        for work, _, a in sends:
            wire.wait(work, a, "receiving FFN outputs")
        self.steps += 1


def _concat(parts: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The attention ranks' (x, ids, w) of one micro-batch, rows one rank after another."""
    x = torch.cat([p[0] for p in parts])
    if parts[0][1] is None:
        return x, None, None
    return x, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
