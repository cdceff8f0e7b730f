"""Rank 0's side of the AFD pipeline (`AFDEngine`): the same interface as `engine.Engine`,
with the FFN side in other ranks reached over `afd_protocol.Wire`, the attention of other
attention ranks' sequences on those ranks (data-parallel attention; `afd_attn`), and each
rank's share split into micro-batches so that one micro-batch's attention overlaps another's
FFN."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from step3_edge.errors import RuntimeClosedError
from step3_edge.runtime.afd_attn import AttentionSide, BlockPool, FrontAttention, ShardedKV
from step3_edge.runtime.afd_protocol import (OP_RESET, OP_SHUTDOWN, OP_STATS, OP_STEP, OP_TRACE,
                                             AFDWorkerError, REMEDY, Wire)
from step3_edge.runtime.engine import AttentionWorker, Shard
from step3_edge.runtime.kv import SeqKV


def split_segments(segments: list[tuple[SeqKV, int]], parts: int
                   ) -> list[list[tuple[SeqKV, int]]]:
    """Contiguous micro-batches of `segments` with about equal token counts (at most
    `parts`, never empty)."""
    parts = max(1, min(parts, len(segments)))
    total = sum(n for _, n in segments)
    out: list[list[tuple[SeqKV, int]]] = [[]]
    acc = 0
    for i, seg in enumerate(segments):
        out[-1].append(seg)
        acc += seg[1]
        cuts_left, segs_left = parts - len(out), len(segments) - i - 1
        if cuts_left > 0 and segs_left > 0 and (acc * parts >= total * len(out)
                                                 or segs_left == cuts_left):
            out.append([])
    return out


class AFDEngine:
    """Rank 0's engine: same interface as `engine.Engine`; attention of its own sequences here,
    of the others' on attention ranks 1..A-1, FFN on ranks A..A+F-1 (afd_attn's docstring)."""

    def __init__(self, attn: AttentionWorker, wire: Wire, shards: list[Shard],
                 micro_batches: int, procs: list[Any], owns_group: bool,
                 workers: list[dict[str, Any]], attention_ranks: int = 1,
                 attention_workers: list[dict[str, Any]] | None = None,
                 lm_head_threads: int | None = None) -> None:
        t = attn.cfg.text_config
        a = attention_ranks
        self.local, self.wire, self.shards = attn, wire, shards
        self.micro_batches, self.procs, self.owns_group = micro_batches, procs, owns_group
        self.workers, self.attention_workers = workers, attention_workers or []
        self.attention_ranks = a
        # the other ranks wait for the next step while rank 0 runs the lm_head: where they
        # share this machine's cores, the lm_head takes them (None: the engine's own count)
        self.lm_head_threads = lm_head_threads
        self.remote = list(range(1, a))                       # attention ranks 1..A-1
        self.ranks = list(range(a, a + len(shards)))          # FFN ranks
        self.serving = [[r for r, s in zip(self.ranks, shards) if L in s.layers]
                        for L in range(t.num_hidden_layers)]
        self.side = AttentionSide(attn, wire, self.serving)
        pools = [attn.kv] + [BlockPool(t, attn.kv.capacity_tokens, attn.kv.dtype)
                             for _ in self.remote]
        self.kv = ShardedKV(pools)
        self.attn = FrontAttention(attn, self.kv)             # what the scheduler uses
        self.broken: AFDWorkerError | None = None
        self.closed = False

    @property
    def steps(self) -> int:
        return self.side.steps

    # ------------------------------------------------------------------ the pipeline
    def run(self, segments: list[tuple[SeqKV, int]], h: torch.Tensor) -> torch.Tensor:
        """One step over `segments` with embedded rows h [N, h] -> float32 logits
        [len(segments), vocab], micro-batched across the attention and FFN ranks."""
        self._usable()
        dead = self.wire.alive()                  # spawned workers: a dead one fails at once
        if dead:
            self.broken = AFDWorkerError(f"a worker process is gone: {dead}", REMEDY)
            raise self.broken
        try:
            return self._run(segments, h)
        except AFDWorkerError as e:
            self.broken = e
            raise
        except Exception as e:
            dead = self.wire.alive() if isinstance(e, RuntimeError) else None
            if dead:                      # e.g. gloo's "connection closed" from a dead peer
                self.broken = AFDWorkerError(f"a worker process died during a step ({dead}): "
                                             f"{str(e).strip()[:200]}", REMEDY)
                raise self.broken from e
            # the other ranks are mid-step now: out of sync
            self.broken = AFDWorkerError(f"a step failed on rank 0 ({e!r}), so the other "
                                         "ranks are out of step", "load the runtime again")
            raise

    def _run(self, segments: list[tuple[SeqKV, int]], h: torch.Tensor) -> torch.Tensor:
        wire, kv, t = self.wire, self.kv, self.local.cfg.text_config
        own: list[list[tuple[int, SeqKV, int, int]]] = [[] for _ in range(self.attention_ranks)]
        row = 0
        for i, (seq, n) in enumerate(segments):       # (segment index, seq, new tokens, row)
            own[kv.rank_of(seq)[0]].append((i, seq, n, row))
            row += n
        mbs = [split_segments([(s, n) for _, s, n, _ in o], self.micro_batches) if o else []
               for o in own]
        m_max = max(len(x) for x in mbs)
        rows = [[sum(n for _, n in mb) for mb in x] + [0] * (m_max - len(x)) for x in mbs]
        posted: list[tuple[Any, torch.Tensor, int]] = [
            (*wire.send_header(r, OP_STEP, m_max, *[n for x in rows for n in x]), r)
            for r in self.ranks]
        finals: dict[int, torch.Tensor] = {}                      # rank -> last rows [S_a, h]
        waiting = []
        for a in self.remote:                        # remote ranks first: they start at once
            if own[a]:
                posted += self._command(a, mbs[a], h, own[a])
                waiting.append((a, *wire.irecv_bytes(a, len(own[a]) * t.hidden_size
                                                     * self.local.backend.dtype.itemsize)))
        sends: list[tuple[Any, torch.Tensor, int]] = []
        if own[0]:
            finals[0], sends = self.side.step(mbs[0], _rows(h, own[0]))
        dtype, dev = self.local.backend.dtype, self.local.backend.device
        for a, work, raw in waiting:
            wire.wait(work, a, "computing its attention share of the step", ctrl=True)
            finals[a] = raw.view(dtype).view(-1, t.hidden_size).to(dev)
            for _, seq, n, _ in own[a]:
                seq.length += n
        if len(finals) == 1 and 0 in finals:
            final = finals[0]                                     # every sequence is local
        else:
            final = torch.empty(len(segments), t.hidden_size, dtype=dtype, device=dev)
            for a, rows_a in finals.items():
                final[torch.tensor([i for i, _, _, _ in own[a]], device=dev)] = rows_a
        # one lm_head over every rank's and micro-batch's last rows: the [vocab, h] matrix is
        # streamed once per step
        logits = self._logits(final)
        self.side.finish(sends)
        for work, _, r in posted:
            wire.wait(work, r, "receiving a step", ctrl=True)
        return logits

    def _logits(self, final: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head, on `lm_head_threads` intra-op threads when set."""
        n, before = self.lm_head_threads, torch.get_num_threads()
        if not n or n == before:
            return self.local.logits(final)
        torch.set_num_threads(n)
        try:
            return self.local.logits(final)
        finally:
            torch.set_num_threads(before)

    def _command(self, a: int, mbs: list[list[tuple[SeqKV, int]]], h: torch.Tensor,
                 own: list[tuple[int, SeqKV, int, int]]) -> list[tuple[Any, torch.Tensor, int]]:
        """Post attention rank a's share of the step: its sequences (new block tables, released
        ids) and embedded rows."""
        kv, new, seqs = self.kv, [], []
        for mb in mbs:
            seqs.append([])
            for seq, n in mb:
                sid = kv.rank_of(seq)[1]
                if sid not in kv.announced[a]:
                    kv.announced[a].add(sid)
                    new.append([sid, list(seq.blocks), seq.reserved])
                seqs[-1].append([sid, seq.length, n])
        drop, kv.drops[a] = kv.drops[a], []
        out = [self.wire.send_header(a, OP_STEP)]
        out += self.wire.post_json(a, {"mbs": seqs, "new": new, "drop": drop})
        out.append(self.wire.post_bytes(a, _rows(h, own)))
        return [(work, buf, a) for work, buf in out]

    # ------------------------------------------------------------------ control
    def _usable(self) -> None:
        if self.broken is not None:
            raise AFDWorkerError(f"the AFD pipeline is down: {self.broken.problem}",
                                 self.broken.remedy)
        if self.closed:
            raise RuntimeClosedError()

    def _ask(self, op: int, ranks: list[int], *args: int) -> list[Any]:
        """Send `op` to `ranks` and return each one's JSON answer."""
        self._usable()
        try:
            heads = [self.wire.send_header(r, op, *args) for r in ranks]
            out = [self.wire.recv_json(r, "answering a statistics request") for r in ranks]
            for (work, _), r in zip(heads, ranks):
                self.wire.wait(work, r, "receiving a request", ctrl=True)
            return out
        except AFDWorkerError as e:
            self.broken = e
            raise

    def snapshot(self) -> dict[str, Any]:
        """Backend, expert statistics (summed over FFN ranks) and time per layer side (summed
        over attention ranks and over FFN ranks; per rank in `attention_ranks`, `ffn_*`)."""
        rep = self._ask(OP_STATS, self.ranks)
        att = self._ask(OP_STATS, self.remote)
        exp: dict[str, Any] = {}
        for r in rep:
            for k, v in r["experts"].items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k in exp:
                    exp[k] += v
                elif k == "miss_choices" and k in exp:
                    exp[k] = {c: exp[k].get(c, 0) + n for c, n in v.items()}
                elif k not in exp:
                    exp[k] = v
        acc = exp.get("accesses", 0)
        exp["hit_rate"] = exp.get("hits", 0) / acc if acc else 1.0
        exp["ranks"] = [r["experts"] for r in rep]
        layers = range(len(self.side.attn_seconds))
        ffn_s = [sum(r["ffn_s"][L] for r in rep) for L in layers]
        side = self.side
        mine = {"attention_s": sum(side.attn_seconds), "wait_s": side.wait_seconds,
                "steps": side.steps, "sequences_placed": self.kv.placed[0]}
        ranks = [mine] + [{"attention_s": sum(r["attention_s"]), "wait_s": r["wait_s"],
                           "steps": r["steps"], "cpu_s": r["cpu_s"],
                           "sequences_placed": self.kv.placed[a]}
                          for a, r in zip(self.remote, att)]
        return {"backend": self.describe(), "experts": exp,
                "time": {"steps": self.steps,
                         "attention_s": [side.attn_seconds[L] + sum(r["attention_s"][L]
                                                                    for r in att)
                                         for L in layers],
                         "ffn_s": ffn_s,
                         "attention_wait_s": sum(r["wait_s"] for r in ranks),
                         "attention_ranks": ranks,
                         "ffn_wait_s": [r["wait_s"] for r in rep],
                         "ffn_cpu_s": [r["cpu_s"] for r in rep]}}

    def describe(self) -> dict[str, Any]:
        a = self.attention_ranks
        return {"mode": f"AFD: {a} attention rank{'s' * (a > 1)} + {len(self.ranks)} FFN "
                        f"rank(s) over {self.wire.backend}, {self.micro_batches} micro-batches",
                "lm_head_threads": self.lm_head_threads or torch.get_num_threads(),
                **self.local.backend.describe(), "ffn_workers": self.workers,
                "attention_workers": self.attention_workers}

    def expert_stats(self) -> dict[str, Any]:
        return self.snapshot()["experts"]

    def time_stats(self) -> dict[str, Any]:
        return self.snapshot()["time"]

    def expert_counts(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for r in self._ask(OP_STATS, self.ranks):
            for L, c in r["counts"].items():
                prev = out.get(int(L))
                out[int(L)] = c if prev is None else [a + b for a, b in zip(prev, c)]
        return out

    def reset_stats(self) -> None:
        self._usable()
        ranks = self.remote + self.ranks
        heads = [self.wire.send_header(r, OP_RESET) for r in ranks]
        for (work, _), r in zip(heads, ranks):
            self.wire.wait(work, r, "resetting statistics", ctrl=True)
        self.side.reset()

    def record_trace(self, on: bool) -> list | None:
        """Per step, the routing records of every FFN rank (each for its own experts)."""
        traces = self._ask(OP_TRACE, self.ranks, int(on))
        if all(tr is None for tr in traces):
            return None
        steps = max(len(tr or []) for tr in traces)
        return [[rec for tr in traces if tr and i < len(tr) for rec in tr[i]]
                for i in range(steps)]

    def close(self) -> None:
        """Tell the other ranks to stop, leave the process group, reap spawned workers."""
        if self.closed:
            return
        self.closed = True
        if self.broken is None:
            ranks = self.remote + self.ranks
            try:
                heads = [self.wire.send_header(r, OP_SHUTDOWN) for r in ranks]
                for (work, _), r in zip(heads, ranks):
                    self.wire.wait(work, r, "shutting down", timeout=30, ctrl=True)
                    self.wire.recv_json(r, "shutting down", timeout=30)
            except AFDWorkerError:
                pass
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)


def _rows(h: torch.Tensor, own: list[tuple[int, SeqKV, int, int]]) -> torch.Tensor:
    """The rows of h [N, h] of `own`'s segments (index, seq, new tokens, first row), in order."""
    if own[0][3] == 0 and sum(n for _, _, n, _ in own) == h.shape[0]:
        return h                                            # every row, already in order
    idx = torch.cat([torch.arange(r, r + n) for _, _, n, r in own])
    return h.index_select(0, idx.to(h.device))
