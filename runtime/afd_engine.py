"""The attention rank's side of the AFD pipeline (`AFDEngine`): the same interface as
`engine.Engine`, with the FFN side in other ranks reached over `afd_protocol.Wire`, and the
batch split into micro-batches so that one micro-batch's attention overlaps another's FFN."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from step3_edge.runtime.afd_protocol import (OP_RESET, OP_SHUTDOWN, OP_STATS, OP_STEP, OP_TRACE,
                                             AFDWorkerError, Wire, pack)
from step3_edge.runtime.engine import AttentionWorker, Shard
from step3_edge.runtime.kv import SeqKV, plan_step


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
    """The attention rank's engine: same interface as `engine.Engine`, FFN in other ranks."""

    def __init__(self, attn: AttentionWorker, wire: Wire, shards: list[Shard],
                 micro_batches: int, procs: list[Any], owns_group: bool,
                 workers: list[dict[str, Any]]) -> None:
        t = attn.cfg.text_config
        self.attn, self.wire, self.shards = attn, wire, shards
        self.micro_batches, self.procs, self.owns_group = micro_batches, procs, owns_group
        self.workers = workers
        self.ranks = list(range(1, len(shards) + 1))
        self.serving = [[r for r, s in zip(self.ranks, shards) if L in s.layers]
                        for L in range(t.num_hidden_layers)]
        self.attn_seconds = [0.0] * t.num_hidden_layers
        self.wait_seconds = 0.0
        self.steps = 0
        self.broken: AFDWorkerError | None = None
        self.closed = False

    # ------------------------------------------------------------------ the pipeline
    def run(self, segments: list[tuple[SeqKV, int]], h: torch.Tensor) -> torch.Tensor:
        """One step over `segments` with embedded rows h [N, h] -> float32 logits
        [len(segments), vocab], micro-batched across the attention and FFN ranks."""
        self._usable()
        try:
            return self._run(segments, h)
        except AFDWorkerError as e:
            self.broken = e
            raise
        except Exception as e:            # the FFN ranks are mid-step now: out of sync
            self.broken = AFDWorkerError(f"a step failed on the attention rank ({e!r}), so "
                                         "the FFN ranks are out of step",
                                         "load the runtime again")
            raise

    def _run(self, segments: list[tuple[SeqKV, int]], h: torch.Tensor) -> torch.Tensor:
        attn, wire, t = self.attn, self.wire, self.attn.cfg.text_config
        mbs = split_segments(segments, self.micro_batches)
        batches = [plan_step(attn.kv, segs) for segs in mbs]
        hs, row = [], 0
        for b in batches:                                       # [n_m, h] per micro-batch
            hs.append(h[row:row + b.rows])
            row += b.rows
        heads = [wire.send_header(r, OP_STEP, len(batches), *[b.rows for b in batches])
                 for r in self.ranks]
        pending: list[list[tuple[Any, torch.Tensor, int]]] = [[] for _ in batches]
        sends: list[tuple[Any, torch.Tensor, int]] = []
        clock = time.perf_counter
        for L in range(t.num_hidden_layers):
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
        last, finals = t.num_hidden_layers - 1, []
        for m, b in enumerate(batches):
            if pending[m]:
                hs[m] = hs[m] + self._collect(pending[m], last, m)
            b.commit()
            finals.append(hs[m].index_select(0, torch.tensor(b.last_rows, device=hs[m].device)))
        # one lm_head over every micro-batch's last rows: per micro-batch it would overlap the
        # FFN's last layer but stream the whole [vocab, h] matrix once per micro-batch
        logits = attn.logits(finals[0] if len(finals) == 1 else torch.cat(finals))
        for work, _, r in sends:
            wire.wait(work, r, "receiving FFN inputs")
        for (work, _), r in zip(heads, self.ranks):
            wire.wait(work, r, "receiving a step header", ctrl=True)
        self.steps += 1
        return logits

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

    # ------------------------------------------------------------------ control
    def _usable(self) -> None:
        if self.broken is not None:
            raise AFDWorkerError(f"the AFD pipeline is down: {self.broken.problem}",
                                 self.broken.remedy)
        if self.closed:
            raise RuntimeError("the runtime is closed")

    def _ask(self, op: int, *args: int) -> list[Any]:
        self._usable()
        try:
            heads = [self.wire.send_header(r, op, *args) for r in self.ranks]
            out = [self.wire.recv_json(r, "answering a statistics request")
                   for r in self.ranks]
            for (work, _), r in zip(heads, self.ranks):
                self.wire.wait(work, r, "receiving a request", ctrl=True)
            return out
        except AFDWorkerError as e:
            self.broken = e
            raise

    def snapshot(self) -> dict[str, Any]:
        """Backend, expert statistics (summed over FFN ranks) and time per layer side."""
        rep = self._ask(OP_STATS)
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
        ffn_s = [sum(r["ffn_s"][L] for r in rep) for L in range(len(self.attn_seconds))]
        return {"backend": self.describe(), "experts": exp,
                "time": {"steps": self.steps, "attention_s": list(self.attn_seconds),
                         "ffn_s": ffn_s, "attention_wait_s": self.wait_seconds,
                         "ffn_wait_s": [r["wait_s"] for r in rep],
                         "ffn_cpu_s": [r["cpu_s"] for r in rep]}}

    def describe(self) -> dict[str, Any]:
        return {"mode": f"AFD: 1 attention rank + {len(self.ranks)} FFN rank(s) over "
                        f"{self.wire.backend}, {self.micro_batches} micro-batches",
                **self.attn.backend.describe(), "ffn_workers": self.workers}

    def expert_stats(self) -> dict[str, Any]:
        return self.snapshot()["experts"]

    def time_stats(self) -> dict[str, Any]:
        return self.snapshot()["time"]

    def expert_counts(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for r in self._ask(OP_STATS):
            for L, c in r["counts"].items():
                prev = out.get(int(L))
                out[int(L)] = c if prev is None else [a + b for a, b in zip(prev, c)]
        return out

    def reset_stats(self) -> None:
        self._usable()
        heads = [self.wire.send_header(r, OP_RESET) for r in self.ranks]
        for (work, _), r in zip(heads, self.ranks):
            self.wire.wait(work, r, "resetting statistics", ctrl=True)
        self.attn_seconds = [0.0] * len(self.attn_seconds)
        self.wait_seconds, self.steps = 0.0, 0

    def record_trace(self, on: bool) -> list | None:
        """Per step, the routing records of every FFN rank (each for its own experts)."""
        traces = self._ask(OP_TRACE, int(on))
        if all(tr is None for tr in traces):
            return None
        steps = max(len(tr or []) for tr in traces)
        return [[rec for tr in traces if tr and i < len(tr) for rec in tr[i]]
                for i in range(steps)]

    def close(self) -> None:
        """Tell the FFN ranks to stop, leave the process group, reap spawned workers."""
        if self.closed:
            return
        self.closed = True
        if self.broken is None:
            try:
                heads = [self.wire.send_header(r, OP_SHUTDOWN) for r in self.ranks]
                for (work, _), r in zip(heads, self.ranks):
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
