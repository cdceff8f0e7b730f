"""Data-parallel attention for AFD: A attention ranks x F FFN ranks.

Each attention rank holds the attention-side weights and the paged KV cache of its own
sequences (Step3 has one K/V head, so tensor parallelism would replicate the cache; data
parallelism splits it). Rank 0, the scheduler's process, is the front:

* **Placement.** `ShardedKV` is the scheduler's KV pool: a new sequence goes to the attention
  rank with the fewest live sequences (then the fewest reserved tokens, then the lowest rank)
  that has room for its prompt + max_new_tokens. Rank 0 keeps the block tables of every rank
  (`BlockPool` mirrors the remote pools' allocation, without storage), so a remote rank only
  stores K/V at the slots it is told.
* **A step (lockstep).** The scheduler's step is split by owner; each rank splits its share into
  up to `micro_batches` micro-batches (`split_segments`). Rank 0 sends the FFN ranks one header
  with the rows of every (attention rank, micro-batch), and each remote attention rank with
  rows this step a command (ctrl: JSON of its sequences' ids / lengths / new tokens, block
  tables of new sequences, ids of released ones; then its embedded rows [N_a, h]). Embeddings
  and the vision tower run on rank 0, the scheduler's process (they are computed where the
  scheduler embeds a prompt; the rows travel with the step, one [N_a, h] message against 61
  layer exchanges).
* **The pipeline** (`AttentionSide.run`, the same on every attention rank): layers x own
  micro-batches; for micro-batch m of layer L wait for its FFN output of layer L-1, run the
  attention side and router, post x | top-k ids | weights to every FFN rank serving L, post the
  output receive, go on to m+1.
* **FFN ranks** wait, per (L, m) in that order, for the message of every attention rank with
  rows in m, run the FFN once on their concatenation (bigger expert batches, as the Step3 paper's
  FFN instances serve several attention instances) and send each attention rank its rows back.
  Deadlock-free: every rank walks (L, m) in the same ascending order, and (L, m) on an FFN rank
  needs only messages each attention rank posts after receiving (L-1, m), which every FFN rank
  sent before it took up (L, m).
* **Finish.** A remote rank sends rank 0 the final residual rows of its sequences [S_a, h];
  rank 0 puts every rank's rows in the scheduler's order and runs one final norm + lm_head
  (the [vocab, h] matrix is read once per step, not once per rank).

One attention rank (A = 1) is the same code with no remote attention ranks.
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import torch

from step3_edge.config import Step3TextConfig
from step3_edge.runtime.afd_protocol import (IDLE, OP_RESET, OP_SHUTDOWN, OP_STATS, OP_STEP,
                                             AFDWorkerError, Wire, answer_handshake,
                                             open_worker_bundle,
                                             pack)
from step3_edge.runtime.kv import BLOCK, KVPool, SeqKV, StepBatch, plan_step


# ---------------------------------------------------------------------------- placement
class BlockPool(KVPool):
    """A remote attention rank's KV pool as rank 0 sees it: block allocation only, no storage
    (the blocks it hands out are the slots the remote rank writes)."""

    def __init__(self, cfg: Step3TextConfig, capacity_tokens: int, dtype: torch.dtype
                 ) -> None:   # noqa: D107 - no super().__init__: it would allocate K/V
        self.cfg, self.device, self.dtype = cfg, torch.device("meta"), dtype
        self._init_blocks(capacity_tokens)


class ShardedKV:
    """The scheduler's KV pool over the attention ranks' pools (rank 0's real one first):
    `allocate` places a sequence on the least-loaded rank with room (among equally loaded ones,
    the one that caches the longest prefix of its prompt); the rest of the pool interface
    spans all ranks (`check`: one sequence must fit one rank's pool)."""

    def __init__(self, pools: list[KVPool]) -> None:
        self.pools = pools
        self.owner: dict[int, tuple[int, int]] = {}       # id(seq) -> (rank, sequence id)
        self.live = [0] * len(pools)
        self.placed = [0] * len(pools)                    # sequences ever placed per rank
        self.announced: list[set[int]] = [set() for _ in pools]
        self.drops: list[list[int]] = [[] for _ in pools]
        self._next = 0

    @property
    def capacity_tokens(self) -> int:
        return sum(p.capacity_tokens for p in self.pools)

    @property
    def free_tokens(self) -> int:
        return sum(p.free_tokens for p in self.pools)

    @property
    def cached_tokens(self) -> int:
        return sum(p.cached_tokens for p in self.pools)

    def check(self, tokens: int) -> None:
        self.pools[0].check(tokens)

    def allocate(self, tokens: int, keys: Sequence[bytes] = (), prompt: int = 0
                 ) -> SeqKV | None:
        """Reserve `tokens` on the least-loaded attention rank with room, among equally loaded
        ones the one caching the longest prefix of the prompt (block `keys`), then the one
        with the fewest reserved tokens; None if none has room. Load comes first: a system
        prompt every request shares must not send them all to one rank."""
        self.check(tokens)
        need = math.ceil(tokens / BLOCK)
        hits = [p.cached_prefix(keys, prompt) for p in self.pools]
        fits = [a for a, p in enumerate(self.pools) if p.fits(need, hits[a])]
        if not fits:
            return None
        a = min(fits, key=lambda a: (self.live[a], -len(hits[a]),
                                     self.pools[a].capacity_tokens - self.pools[a].free_tokens,
                                     a))
        seq = self.pools[a].allocate(tokens, keys, prompt)
        assert seq is not None
        self.owner[id(seq)] = (a, self._next)
        self._next += 1
        self.live[a] += 1
        self.placed[a] += 1
        return seq

    def release(self, seq: SeqKV, keys: Sequence[bytes] = ()) -> None:
        a, sid = self.owner.pop(id(seq))
        self.pools[a].release(seq, keys)
        self.live[a] -= 1
        if sid in self.announced[a]:
            self.announced[a].discard(sid)
            self.drops[a].append(sid)

    def rank_of(self, seq: SeqKV) -> tuple[int, int]:
        """(attention rank, sequence id) of an allocated sequence."""
        return self.owner[id(seq)]

    def __getattr__(self, name: str) -> Any:          # k, v, dtype, ... of rank 0's pool
        if name == "pools":
            raise AttributeError(name)
        return getattr(self.pools[0], name)


class FrontAttention:
    """`engine.attn` on rank 0: the local attention worker (embeddings, vision, lm_head, ...)
    with `kv` spanning every attention rank."""

    def __init__(self, local: Any, kv: ShardedKV) -> None:
        self.local, self.kv = local, kv

    def __getattr__(self, name: str) -> Any:
        if name == "local":
            raise AttributeError(name)
        return getattr(self.local, name)


# ---------------------------------------------------------------------------- the pipeline
class AttentionSide:
    """One attention rank's half of the AFD pipeline over its own micro-batches."""

    def __init__(self, attn: Any, wire: Wire, serving: list[list[int]]) -> None:
        self.attn, self.wire, self.serving = attn, wire, serving
        self.attn_seconds = [0.0] * len(serving)
        self.wait_seconds = 0.0
        self.steps = 0

    def reset(self) -> None:
        self.attn_seconds = [0.0] * len(self.serving)
        self.wait_seconds, self.steps = 0.0, 0

    def run(self, batches: list[StepBatch], hs: list[torch.Tensor]
            ) -> tuple[list[torch.Tensor], list[tuple[Any, torch.Tensor, int]]]:
        """Embedded rows hs[m] [n_m, h] of micro-batch m -> (final residual rows of each
        micro-batch, the posted FFN-input sends: `finish` them once other work is queued)."""
        attn, wire = self.attn, self.wire
        hs = list(hs)
        pending: list[list[tuple[Any, torch.Tensor, int]]] = [[] for _ in batches]
        sends: list[tuple[Any, torch.Tensor, int]] = []
        clock = time.perf_counter
        for L in range(len(self.serving)):
            for m, b in enumerate(batches):
                if pending[m]:
                    hs[m] = hs[m] + self._collect(pending[m], L - 1, m)
                t0 = clock()
                hs[m], x, ids, w = attn.layer(L, hs[m], b)
                msg = pack(x, ids, w).to(wire.device)
                for r in self.serving[L]:
                    buf = wire.empty(x.numel() * x.element_size())
                    sends.append((wire.isend(msg, r), msg, r))
                    pending[m].append((wire.irecv(buf, r), buf, r))
                self.attn_seconds[L] += clock() - t0
        last = len(self.serving) - 1
        for m in range(len(batches)):
            if pending[m]:
                hs[m] = hs[m] + self._collect(pending[m], last, m)
        self.steps += 1
        return hs, sends

    def step(self, micro_batches: list[list[tuple[SeqKV, int]]], h: torch.Tensor
             ) -> tuple[torch.Tensor, list[tuple[Any, torch.Tensor, int]]]:
        """One step of this rank's sequences: micro_batches[m] = (sequence, new rows) in the
        order of the embedded rows h [N, h] -> (each sequence's last residual row [S, h], the
        posted sends to `finish`). KV slots are planned here and committed after the run."""
        batches = [plan_step(self.attn.kv, segs) for segs in micro_batches]
        hs = list(torch.split(h, [b.rows for b in batches]))    # [n_m, h] per micro-batch
        outs, sends = self.run(batches, hs)
        for b in batches:
            b.commit()
        last = [last_rows(b, o) for b, o in zip(batches, outs)]
        return (last[0] if len(last) == 1 else torch.cat(last)), sends

    def finish(self, sends: list[tuple[Any, torch.Tensor, int]]) -> None:
        for work, _, r in sends:
            self.wire.wait(work, r, "receiving FFN inputs")

    def _collect(self, pending: list[tuple[Any, torch.Tensor, int]], L: int, m: int
                 ) -> torch.Tensor:
        """Wait for layer L's FFN outputs of micro-batch m and sum the ranks' parts [n, h]."""
        t0 = time.perf_counter()
        total = None
        dtype, dev = self.attn.backend.dtype, self.attn.backend.device
        for work, buf, r in pending:
            self.wire.wait(work, r, f"computing layer {L} micro-batch {m}")
            y = buf.view(dtype).view(-1, self.attn.cfg.text_config.hidden_size).to(dev)
            total = y if total is None else total + y
        pending.clear()
        self.wait_seconds += time.perf_counter() - t0
        assert total is not None
        return total


def last_rows(batch: StepBatch, h: torch.Tensor) -> torch.Tensor:
    """Each sequence's last new row of a micro-batch's residual h [n, h] -> [seqs, h]."""
    return h.index_select(0, torch.tensor(batch.last_rows, device=h.device))


# ---------------------------------------------------------------------------- remote rank
class AttentionRank:
    """The serving loop of attention rank a >= 1: rank 0 sends it the load options, then per
    step its sequences and embedded rows; it runs the attention side of its sequences against
    the FFN ranks and returns their final residual rows."""

    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.seqs: dict[int, SeqKV] = {}
        self.cpu0 = time.process_time()

    def serve(self, hello: dict[str, Any]) -> None:
        if not answer_handshake(self.wire, lambda: self._load(hello)):
            return
        with torch.inference_mode():
            while True:
                op = self.wire.recv_header(0, "waiting for a request", IDLE.total_seconds())[0]
                if op == OP_STEP:
                    self._step()
                elif op == OP_STATS:
                    s = self.side
                    self.wire.send_json(0, {"attention_s": s.attn_seconds, "steps": s.steps,
                                            "wait_s": s.wait_seconds,
                                            "cpu_s": time.process_time() - self.cpu0,
                                            "sequences": len(self.seqs)},
                                        "sending statistics")
                elif op == OP_RESET:
                    self.side.reset()
                    self.cpu0 = time.process_time()
                elif op == OP_SHUTDOWN:
                    self.wire.send_json(0, {"ok": True}, "acknowledging shutdown")
                    return
                else:
                    raise AFDWorkerError(f"attention rank {self.wire.rank} got op {op}",
                                         "run the same step3-edge version on every rank")

    def _load(self, hello: dict[str, Any]) -> dict[str, Any]:
        _, _, _, cfg, reader, builder = open_worker_bundle(hello, self.wire)
        self.attn = builder.build_attention(cfg, reader, int(hello["kv_tokens"]),
                                            getattr(torch, hello["kv_dtype"]), vision=False)
        self.side = AttentionSide(self.attn, self.wire, hello["serving"])
        return {"device": str(self.attn.backend.device), "kv_blocks": self.attn.kv.num_blocks}

    def _step(self) -> None:
        wire, attn = self.wire, self.attn
        meta = wire.recv_json(0, "sending a step")
        for sid, blocks, reserved in meta["new"]:
            self.seqs[sid] = SeqKV(blocks, reserved)
        for sid in meta["drop"]:
            self.seqs.pop(sid, None)
        t = attn.cfg.text_config
        dtype = attn.backend.dtype
        rows = sum(n for mb in meta["mbs"] for _, _, n in mb)
        work, raw = wire.irecv_bytes(0, rows * t.hidden_size * dtype.itemsize)
        wire.wait(work, 0, "sending a step's rows", ctrl=True)
        h = raw.view(dtype).view(rows, t.hidden_size).to(attn.backend.device)
        micro_batches = []
        for mb in meta["mbs"]:
            segs = []
            for sid, length, n in mb:
                seq = self.seqs[sid]
                seq.length = length
                segs.append((seq, n))
            micro_batches.append(segs)
        final, sends = self.side.step(micro_batches, h)
        out_work, out = wire.post_bytes(0, final)
        self.side.finish(sends)
        wire.wait(out_work, 0, "receiving a step's final rows", ctrl=True)
        del out


def serve_attention(wire: Wire, hello: dict[str, Any]) -> None:
    """Entry of a worker whose handshake made it an attention rank; a step that fails here
    ends the process (its peers see the connection close and fail at once)."""
    try:
        AttentionRank(wire).serve(hello)
    except AFDWorkerError:
        raise
    except Exception:
        traceback.print_exc()
        print(f"step3-edge AFD attention rank {wire.rank}: step failed", file=sys.stderr)
        os._exit(1)
