"""The AFD wire: what the attention ranks (0..A-1) and the FFN ranks (A..A+F-1) say to each
other over `torch.distributed` point-to-point, and how the FFN side is split across FFN ranks.
Rank 0 is the front (the scheduler's process): it sends every control message; attention ranks
1..A-1 and the FFN ranks exchange data with each other directly.

Three process groups over the same ranks: *a2f* and *f2a* carry the per-layer tensors one way
each (gloo on CPU, NCCL when every rank has its own GPU; two groups, so that with NCCL the
FFN outputs never queue behind FFN inputs on one communicator's stream); *ctrl* (always gloo,
CPU tensors) carries the step headers and the JSON messages (handshake, statistics,
shutdown). Messages between a pair of ranks in one group are matched in the order they were
posted, which both sides follow (docs/runtime.md, "Protocol" under "AFD across
processes", has the full sequence).

Per layer L and micro-batch m, from every attention rank a with n_am > 0 rows in it, to every
FFN rank that serves layer L:
  a -> F  uint8 [n_am*h*s + (MoE: n_am*k*4 + n_am*k*4)] = x [n_am, h] (compute dtype, s bytes)
          | top-k ids [n_am, k] int32 | top-k weights [n_am, k] float32
  F -> a  uint8 [n_am*h*s] = this rank's FFN output for a's rows [n_am, h] (its partial sum;
          a adds the FFN ranks' parts)
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from step3_edge.config import Step3Config
from step3_edge.errors import Step3EdgeError
from step3_edge.plan import Plan
from step3_edge.runtime.engine import Shard
from step3_edge.runtime.options import MAX_MICRO_BATCHES, STEP_SLOTS

if TYPE_CHECKING:
    from step3_edge.checkpoint import CheckpointReader
    from step3_edge.manifest import Manifest
    from step3_edge.runtime.builders import EngineBuilder
    from step3_edge.runtime.decisions import LoadDecisions

__all__ = ["MAX_MICRO_BATCHES", "STEP_SLOTS", "PROTOCOL", "Wire", "partition"]

PROTOCOL = 3                         # 3: the handshake carries the load's `LoadDecisions`
OP_SHUTDOWN, OP_STEP, OP_STATS, OP_RESET, OP_TRACE = 0, 1, 2, 3, 4
HEADER = 64                          # int64 control header: [op, args...]
# [OP_STEP, M, n_00 .. n_0(M-1), n_10 ..]: A*M <= STEP_SLOTS (checked with the options)
assert STEP_SLOTS == HEADER - 2
IDLE = datetime.timedelta(days=365)  # a worker rank may wait this long for the next request
START_TIMEOUT = 60.0                 # spawned workers get at least this long to start (import
                                     # torch, join); a dead one fails at once, and afd_timeout
                                     # bounds a step's waits
REMEDY = ("see that worker's log (stderr) for its error; check its memory and device, raise "
          "afd_timeout if it is only slow, then load the runtime again")


class AFDWorkerError(Step3EdgeError):
    """An AFD worker died, failed, or did not answer in time."""


def partition(plan: Plan, cfg: Step3Config, ranks: int) -> list[Shard]:
    """Split the FFN side over `ranks` FFN ranks. One rank serves everything. When the plan
    has exactly that many FFN devices, rank i takes FFN device i's dense MLPs, shared experts
    and hot experts, and the cold experts are dealt to the ranks with the fewest experts of
    their layer; otherwise expert e of every layer goes to rank e % ranks and the dense /
    shared units are dealt round robin."""
    t = cfg.text_config
    if ranks == 1:
        return [Shard.everything(t)]
    ffn = [d for d in plan.device_plans if d.role == "ffn"]
    experts: list[set] = [set() for _ in range(ranks)]
    dense: list[set] = [set() for _ in range(ranks)]
    shared: list[set] = [set() for _ in range(ranks)]
    if len(ffn) == ranks:
        for i, d in enumerate(ffn):
            experts[i] |= set(d.hot_experts)
            dense[i] |= set(d.dense_layers)
            shared[i] |= set(d.shared_expert_layers)
        for L, e in plan.cold_experts:
            i = min(range(ranks), key=lambda r: (sum(x[0] == L for x in experts[r]), r))
            experts[i].add((L, e))
    else:
        for L in t.moe_layers:
            for e in range(t.moe_num_experts):
                experts[e % ranks].add((L, e))
        units = [("d", L) for L in t.dense_layers] + [("s", L) for L in t.moe_layers]
        for i, (kind, L) in enumerate(sorted(units, key=lambda u: u[1])):
            (dense if kind == "d" else shared)[i % ranks].add(L)
    return [Shard(frozenset(x), frozenset(d), frozenset(s))
            for x, d, s in zip(experts, dense, shared)]


def open_worker_bundle(hello: dict[str, Any], wire: "Wire"
                       ) -> tuple[LoadDecisions, Manifest, Plan, Step3Config, CheckpointReader,
                                  EngineBuilder]:
    """A spawned or torchrun rank's start: check rank 0's protocol, open the bundle it names and
    make the backend rank 0's decisions name on this rank's device, with its builder ->
    (decisions, manifest, plan, cfg, reader, builder)."""
    from step3_edge.runtime.builders import make_builder
    from step3_edge.runtime.decisions import LoadDecisions
    from step3_edge.runtime.loading import open_bundle

    if hello.get("protocol") != PROTOCOL:
        raise AFDWorkerError(f"AFD protocol {hello.get('protocol')} from rank 0, this worker "
                             f"speaks {PROTOCOL}", "run the same step3-edge version on every rank")
    d = LoadDecisions.from_dict(hello["decisions"])
    o = d.options
    manifest, plan, cfg, reader = open_bundle(hello["bundle"], o.verify)
    dev = hello.get("device") or (str(wire.device) if wire.backend == "nccl" else "cpu")
    return d, manifest, plan, cfg, reader, make_builder(d, manifest, dev)


def answer_handshake(wire: "Wire", load: Callable[[], dict[str, Any]]) -> bool:
    """Run a worker's `load` and answer rank 0's handshake: ok with this process's pid, host
    and what `load` returns, or the load error (then False: the worker gives up)."""
    try:
        info = load()
    except Exception as e:  # noqa: BLE001 - any load failure goes back to the caller
        traceback.print_exc()
        wire.send_json(0, {"ok": False, "error": f"{type(e).__name__}: {e}"},
                       "answering the handshake")
        return False
    wire.send_json(0, {"ok": True, "pid": os.getpid(), "host": socket.gethostname(), **info},
                   "answering the handshake")
    return True


def message_bytes(rows: int, hidden: int, elem: int, top_k: int, moe: bool) -> int:
    """Bytes of one A -> F message (x, and on MoE layers the top-k ids and weights)."""
    return rows * hidden * elem + (rows * top_k * 8 if moe else 0)


def pack(x: torch.Tensor, ids: torch.Tensor | None, w: torch.Tensor | None) -> torch.Tensor:
    """x [n, h], ids / w [n, k] -> one flat uint8 message (see the module docstring)."""
    parts = [x.contiguous().view(torch.uint8).reshape(-1)]
    if ids is not None and w is not None:
        parts += [ids.to(torch.int32).contiguous().view(torch.uint8).reshape(-1),
                  w.to(torch.float32).contiguous().view(torch.uint8).reshape(-1)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def unpack(buf: torch.Tensor, rows: int, hidden: int, dtype: torch.dtype, top_k: int,
           moe: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Inverse of `pack`: (x [n, h] of `dtype`, ids [n, k] int64, w [n, k] float32)."""
    nx = rows * hidden * dtype.itemsize
    x = buf[:nx].view(dtype).view(rows, hidden)
    if not moe:
        return x, None, None
    nk = rows * top_k * 4
    ids = buf[nx:nx + nk].view(torch.int32).view(rows, top_k).long()
    w = buf[nx + nk:nx + 2 * nk].view(torch.float32).view(rows, top_k)
    return x, ids, w


def make_groups(backend: str) -> tuple[Any, Any, Any]:
    """(a2f, f2a, ctrl); collective: every rank calls it right after joining the world."""
    a2f = dist.new_group(backend=backend)
    f2a = dist.new_group(backend=backend)
    return a2f, f2a, dist.new_group(backend="gloo", timeout=IDLE)


def peer_name(peer: int, attention_ranks: int) -> str:
    """How errors name a rank."""
    if peer < attention_ranks:
        return "the attention rank (0)" if attention_ranks == 1 else f"attention rank {peer}"
    return f"FFN rank {peer}"


class Wire:
    """Point-to-point messages of one rank: data tensors sent on `tx` and received on `rx`
    (on `device`: the CPU for gloo, this rank's GPU for NCCL), headers, JSON and the front's
    per-step rows on the gloo group `ctrl`. Ranks below `attention_ranks` are attention ranks
    (a worker learns the count from its handshake). Every wait has a deadline; a failure or a
    timeout raises `AFDWorkerError` naming the peer."""

    def __init__(self, rank: int, groups: tuple[Any, Any, Any], backend: str,
                 device: torch.device, timeout: float,
                 alive: Callable[[], str | None] = lambda: None,
                 attention_ranks: int = 1) -> None:
        self.a2f, self.f2a, self.ctrl = groups
        self.rank, self.backend, self.attention_ranks = rank, backend, attention_ranks
        self.device, self.timeout, self.alive = device, timeout, alive

    @property
    def tx(self) -> Any:
        return self.a2f if self.rank < self.attention_ranks else self.f2a

    @property
    def rx(self) -> Any:
        return self.f2a if self.rank < self.attention_ranks else self.a2f

    # ------------------------------------------------------------------ waiting
    def wait(self, work: Any, peer: int, what: str, timeout: float | None = None,
             ctrl: bool = False) -> None:
        """Block until `work` completes; AFDWorkerError if the peer failed or `timeout`
        (default: the wire's) passed."""
        limit = self.timeout if timeout is None else timeout
        try:
            if self.backend == "nccl" and not ctrl:
                deadline = time.monotonic() + limit
                while not work.is_completed():       # NCCL hangs on a dead peer: poll
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no answer in {limit:g} s")
                    dead = self.alive()
                    if dead:
                        raise RuntimeError(dead)
                    time.sleep(20e-6)
            work.wait(datetime.timedelta(seconds=limit))
        except (RuntimeError, TimeoutError, dist.DistBackendError) as e:
            raise self.error(peer, what, e) from e

    def error(self, peer: int, what: str, cause: BaseException | str) -> AFDWorkerError:
        who = peer_name(peer, self.attention_ranks)
        dead = self.alive()
        if dead is None and self.rank == 0:
            time.sleep(0.25)                   # a killed worker may not be reaped yet
            dead = self.alive()
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else repr(cause)
        return AFDWorkerError(
            f"{who} failed while {what}: {text}" + (f" ({dead})" if dead else ""), REMEDY)

    # ------------------------------------------------------------------ data
    def isend(self, t: torch.Tensor, dst: int) -> Any:
        return dist.isend(t, dst, group=self.tx)

    def irecv(self, t: torch.Tensor, src: int) -> Any:
        return dist.irecv(t, src, group=self.rx)

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    # ------------------------------------------------------------------ control
    def send_header(self, dst: int, op: int, *args: int) -> tuple[Any, torch.Tensor]:
        """Post a control header; returns (work, buffer): keep both until waited."""
        head = torch.zeros(HEADER, dtype=torch.int64)
        head[0] = op
        if args:
            head[1:1 + len(args)] = torch.tensor(args, dtype=torch.int64)
        return dist.isend(head, dst, group=self.ctrl), head

    def recv_header(self, src: int, what: str, timeout: float | None = None) -> list[int]:
        head = torch.empty(HEADER, dtype=torch.int64)
        self.wait(dist.irecv(head, src, group=self.ctrl), src, what, timeout, ctrl=True)
        return head.tolist()

    def post_json(self, dst: int, obj: Any) -> list[tuple[Any, torch.Tensor]]:
        """Post a JSON message on ctrl; returns [(work, buffer)]: keep them until waited."""
        raw = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
        size = torch.tensor([raw.numel()], dtype=torch.int64)
        return [(dist.isend(t, dst, group=self.ctrl), t) for t in (size, raw)]

    def send_json(self, dst: int, obj: Any, what: str) -> None:
        for work, _ in self.post_json(dst, obj):
            self.wait(work, dst, what, ctrl=True)

    def post_bytes(self, dst: int, t: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """Post a tensor's bytes on ctrl (copied to the CPU); returns (work, buffer)."""
        raw = t.detach().contiguous().cpu().view(torch.uint8).reshape(-1)
        return dist.isend(raw, dst, group=self.ctrl), raw

    def irecv_bytes(self, src: int, nbytes: int) -> tuple[Any, torch.Tensor]:
        """Post the receive of `nbytes` on ctrl; returns (work, CPU uint8 buffer)."""
        raw = torch.empty(nbytes, dtype=torch.uint8)
        return dist.irecv(raw, src, group=self.ctrl), raw

    def recv_json(self, src: int, what: str, timeout: float | None = None) -> Any:
        size = torch.empty(1, dtype=torch.int64)
        self.wait(dist.irecv(size, src, group=self.ctrl), src, what, timeout, ctrl=True)
        raw = torch.empty(int(size), dtype=torch.uint8)
        self.wait(dist.irecv(raw, src, group=self.ctrl), src, what, timeout, ctrl=True)
        return json.loads(bytes(raw.numpy()).decode())
