"""The ONNX Runtime backend: the bundle's exported subgraphs (export/subgraphs.py) run the two
AFD sides, behind the same worker interface as the torch modules (engine.py), so the
scheduler, the paged KV cache and the AFD pipeline work unchanged.

Sessions come from the export stage's `BundleGraphs` (one graph file per kind, weights bound
per layer / expert at session creation, created on first use). The attention graph takes a
dense past K/V [b, past, d] and returns [b, past + t, d]; the worker gathers each group's past
from the paged pool and writes the new rows back. Routed experts are one session each; the
worker gathers each expert's tokens and accumulates `w * expert(x)` in float32 in expert
order (as the reference does). Everything is float32 at the graph boundary.

Providers: CPU, or CUDA first when a CUDA device is asked for and onnxruntime-gpu is
installed; whether a GPU really runs the graphs is read from the first session's
`get_providers()` (never from `get_available_providers()`).

The two workers take any `GraphBackend`, so they also drive the TensorRT backend
(trt_backend.py), whose sessions are refitted engines; `builders.GraphBuilder` builds them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from step3_edge.config import Step3Config
from step3_edge.errors import ConfigError, MissingExtraError, PromptError
from step3_edge.manifest import Manifest
from step3_edge.runtime.engine import Shard
from step3_edge.runtime.kernels import NO_KERNELS, KernelCaps
from step3_edge.runtime.kv import KVPool, StepBatch

if TYPE_CHECKING:
    from step3_edge.export.onnx_runner import BundleGraphs


class GraphBackend(Protocol):
    """A backend that runs the bundle's subgraphs (`OrtBackend`, `trt_backend.TrtBackend`):
    float32 host tensors at the graph boundary (`device`, `dtype`), one session per subgraph
    instance in `graphs`."""

    name: str
    device: torch.device
    dtype: torch.dtype
    caps: KernelCaps
    graphs: BundleGraphs
    limits: dict[str, int]              # the engines' shape bounds (TensorRT), else empty

    def run(self, kind: str, feeds: dict[str, np.ndarray], layer: int | None = None,
            expert: int | None = None) -> dict[str, np.ndarray]: ...

    def describe(self) -> dict[str, Any]: ...


def check_graph_bundle(name: str, manifest: Manifest | None, dtype: torch.dtype | None,
                       needs: str, export: str) -> None:
    """A graph backend's two refusals: a bundle without subgraphs, a compute dtype other than
    float32 (the graph boundary; the weights keep their exported precision)."""
    if manifest is None or not manifest.subgraphs:
        raise ConfigError(f"backend='{name}' needs a bundle with {needs}, and this one has "
                          "none", f"{export}, or use backend='torch'")
    if dtype not in (None, torch.float32):
        raise ConfigError(f"dtype={dtype} with backend='{name}'", "the graphs take and return "
                          "float32 (weights in their exported precision): leave dtype unset or "
                          "pass 'float32'")


class OrtBackend:
    """ONNX Runtime over one bundle's subgraphs (float32 at the graph boundary)."""

    name = "onnxruntime"
    caps = NO_KERNELS                   # no torch kernels: the graphs run in ONNX Runtime
    limits: dict[str, int] = {}         # no engine bounds: ONNX Runtime takes any shape

    def __init__(self, manifest: Manifest | None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, threads: int | None = None) -> None:
        check_graph_bundle("onnxruntime", manifest, dtype, "ONNX subgraphs", "export it with "
                           "ONNX (step3-edge export without --no-onnx)")
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise MissingExtraError("onnxruntime", "cpu", "backend='onnxruntime'") from None
        from step3_edge.export.onnx_runner import BundleGraphs

        self.asked = torch.device(device)
        self.device, self.dtype = torch.device("cpu"), torch.float32   # tensors we exchange
        providers = ["CPUExecutionProvider"]
        if self.asked.type == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": self.asked.index or 0}),
                         "CPUExecutionProvider"]
        # no spinning: idle ORT threads would busy-wait on cores that torch (KV gathers, the
        # scheduler) and other AFD processes need
        self.graphs = BundleGraphs(manifest, providers=providers, threads=threads, spin=False)
        self.threads = threads
        self.used: dict[str, int] = {}

    def run(self, kind: str, feeds: dict[str, np.ndarray], layer: int | None = None,
            expert: int | None = None) -> dict[str, np.ndarray]:
        return self.graphs.run(kind, feeds, layer, expert)

    @property
    def providers(self) -> list[str]:
        """Providers the created sessions really use (empty before the first session)."""
        return self.graphs.active_providers

    def describe(self) -> dict[str, Any]:
        prov = self.providers
        subs = self.graphs.manifest.subgraphs
        return {"backend": self.name, "device": "cuda" if "CUDAExecutionProvider" in prov
                else "cpu", "dtype": "float32", "providers": prov,
                "sessions": self.graphs.num_sessions, "threads": self.threads,
                "kernels": {f"{n}: ONNX Runtime ({s.precision})": len(s.instances)
                            for n, s in subs.items()}}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


class OrtAttentionWorker:
    """Attention side through ONNX Runtime: embed, per-layer attention graphs (norms, MFA,
    router top-k), lm_head; the paged KV pool in float32."""

    def __init__(self, cfg: Step3Config, backend: GraphBackend, kv_tokens: int,
                 vision: bool = True) -> None:
        from step3_edge.export.onnx_runner import OnnxStep3

        t = cfg.text_config
        self.cfg, self.backend, self.has_vision = cfg, backend, vision
        self.kv = KVPool(t, kv_tokens, torch.float32, torch.device("cpu"))
        self.layers = list(range(t.num_hidden_layers))
        self._model = OnnxStep3(backend.graphs)
        for kind, layer in [("embed", None), ("lm_head", None)] + [
                ("attn_moe" if t.is_moe(L) else "attn_dense", L) for L in self.layers]:
            backend.graphs.session(kind, layer)            # created now, not mid-request

    def routers(self) -> dict[int, object]:
        return {}                          # no torch routers: the FFN side does not prefetch

    def embed(self, ids: list[int], images: list | None = None) -> torch.Tensor:
        """One sequence's embeddings [T, h] (image features in place)."""
        if images and not self.has_vision:
            raise PromptError("this runtime was loaded without the vision tower",
                              "load it with vision=True to send images")
        x = self._model.embed(np.asarray([ids], dtype=np.int64), images or None)
        return torch.from_numpy(np.ascontiguousarray(x[0]))

    def embed_tokens(self, ids: list[int]) -> torch.Tensor:
        x = self.backend.run("embed", {"input_ids": np.asarray([ids], dtype=np.int64)})
        return torch.from_numpy(x["hidden"][0])

    def layer(self, L: int, h: torch.Tensor, batch: StepBatch
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Residual h [N, h] -> (new residual, normed FFN input [N, h], top-k ids / weights
        [N, k] on MoE layers, else None)."""
        t = self.cfg.text_config
        moe = t.is_moe(L)
        kind = "attn_moe" if moe else "attn_dense"
        pk, pv, d = self.kv.k[L], self.kv.v[L], t.head_dim                  # [slots, d]
        res, nrm, ids, ws = [], [], [], []
        for g in batch.groups:
            past = g.gather.shape[1] - g.t
            idx = g.gather[:, :past].reshape(-1)
            valid = torch.cat([torch.arange(past)[None] < g.positions[:, :1],
                               torch.ones(g.b, g.t, dtype=torch.bool)], 1)  # [b, past + t]
            out = self.backend.run(kind, {
                "hidden": _np(h[g.start:g.start + g.b * g.t].view(g.b, g.t, -1)),
                "positions": _np(g.positions), "key_valid": _np(valid),
                "past_k": _np(pk.index_select(0, idx).view(g.b, past, d)),
                "past_v": _np(pv.index_select(0, idx).view(g.b, past, d))}, L)
            for pool, new in ((pk, out["present_k"]), (pv, out["present_v"])):
                pool.index_copy_(0, g.write, torch.from_numpy(new[:, past:]).reshape(g.b * g.t, -1))
            res.append(torch.from_numpy(out["residual"]).reshape(g.b * g.t, -1))
            nrm.append(torch.from_numpy(out["normed"]).reshape(g.b * g.t, -1))
            if moe:
                ids.append(torch.from_numpy(out["topk_ids"]).reshape(g.b * g.t, -1))
                ws.append(torch.from_numpy(out["topk_weights"]).reshape(g.b * g.t, -1))
        cat = (lambda xs: xs[0] if len(xs) == 1 else torch.cat(xs))
        return cat(res), cat(nrm), cat(ids) if moe else None, cat(ws) if moe else None

    def logits(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm and lm_head on residual rows [S, h] -> float32 logits [S, vocab]."""
        y = torch.from_numpy(self.backend.run("lm_head", {"hidden": _np(h[None])})
                             ["logits"][0])
        return y if out is None else out.copy_(y)

    def logits_buffer(self, rows: int) -> torch.Tensor:
        return torch.empty(rows, self.cfg.text_config.vocab_size)


class OrtFFNWorker:
    """FFN side (or one shard) through ONNX Runtime: dense MLP, shared expert and one session
    per routed expert; every expert is resident (ORT holds the bound weights)."""

    def __init__(self, cfg: Step3Config, backend: GraphBackend, shard: Shard | None = None
                 ) -> None:
        t = cfg.text_config
        self.cfg, self.backend = t, backend
        self.shard = shard or Shard.everything(t)
        self.counts = {L: torch.zeros(t.moe_num_experts, dtype=torch.long)
                       for L in t.moe_layers}
        self.mask = {L: torch.tensor([int((L, e) in self.shard.experts)
                                      for e in range(t.moe_num_experts)]) for L in t.moe_layers}
        self.accesses = 0
        self.trace: list | None = None
        g = backend.graphs                                  # sessions created now
        for L in sorted(self.shard.dense_layers):
            g.session("dense_mlp", L)
        for L in sorted(self.shard.shared_layers):
            g.session("shared_expert", L)
        for L, e in sorted(self.shard.experts):
            g.session("expert", L, e)

    def layer(self, L: int, x: torch.Tensor, ids: torch.Tensor | None,
              w: torch.Tensor | None) -> torch.Tensor:
        """FFN output [N, h] for normed input x [N, h] (this shard's part)."""
        xn = _np(x)
        run = self.backend.run
        if ids is None or w is None:
            if L in self.shard.dense_layers:
                return torch.from_numpy(run("dense_mlp", {"x": xn}, L)["y"])
            return torch.zeros_like(x)
        flat = ids.reshape(-1)
        self.counts[L] += torch.bincount(flat, minlength=self.cfg.moe_num_experts) * self.mask[L]
        order = torch.argsort(flat, stable=True)                 # (token, slot) by expert
        per = torch.bincount(flat, minlength=self.cfg.moe_num_experts).tolist()
        k = ids.shape[1]
        tok = order // k
        xs = _np(x.index_select(0, tok))                                  # [N*k, h]
        ys = torch.zeros(len(order), x.shape[1])
        start, used = 0, []
        for e, n in enumerate(per):
            if n and (L, e) in self.shard.experts:
                ys[start:start + n] = torch.from_numpy(
                    run("expert", {"x": xs[start:start + n]}, L, e)["y"])
                used.append(e)
            start += n
        self.accesses += len(used)
        if self.trace is not None and self.trace:
            self.trace[-1].append({"layer": L, "experts": used})
        out = torch.zeros_like(x)
        keep = self.mask[L][flat[order]].bool()
        out.index_add_(0, tok[keep], ys[keep] * w.reshape(-1)[order][keep, None])
        if L in self.shard.shared_layers:
            out = torch.from_numpy(run("shared_expert", {"x": xn}, L)["y"]) + out
        return out

    def begin_step(self) -> None:
        if self.trace is not None:
            self.trace.append([])

    def expert_stats(self) -> dict[str, Any]:
        return {"accesses": self.accesses, "hits": self.accesses, "misses": 0,
                "hit_rate": 1.0, "cpu_computed": 0, "copied": 0, "bytes_copied": 0,
                "resident": len(self.shard.experts), "policy": "static", "miss": "none",
                "prefetch": False, "note": f"{self.backend.name}: every expert has its own "
                                           "session with its weights bound"}

    def reset_stats(self) -> None:
        self.accesses = 0
        for c in self.counts.values():
            c.zero_()

    def expert_counts(self) -> dict[int, list[int]]:
        return {L: c.tolist() for L, c in self.counts.items()}

    def record_trace(self, on: bool) -> list | None:
        trace, self.trace = self.trace, ([] if on else None)
        return trace
