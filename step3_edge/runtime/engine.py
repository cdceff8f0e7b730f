"""The runtime's model: an attention side and an FFN side that exchange, per layer,
(hidden [N, h], top-k ids [N, k], top-k weights [N, k]) and nothing else (AFD, as in the
Step3 paper).

`AttentionWorker` holds the embeddings, the vision tower, every layer's norms, MFA attention and
router, the final norm, lm_head and the paged KV pool; `FFNWorker` holds the dense MLPs, shared
experts and the `ExpertStore`. `Engine` runs one forward step over a flat batch of N new tokens
from several sequences (continuous batching). The attention side is the reference's own layers
(`Step3DecoderLayer(..., ffn=False)`, `Step3MoE.route`), built with the runtime's ops and
filled by its weight pass (`runtime/ops.py`: the backend's linears, native RMSNorm, fused
q|k|v, native decode attention); the FFN side is the reference's `Step3MLP` over the runtime's
linears. So fp32 compute over bf16 weights gives the reference's tokens. `afd.AFDEngine` runs the same two workers in separate processes (the
micro-batched AFD pipeline); nothing here assumes they share a process except `Engine`'s loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from step3_edge.checkpoint import CheckpointReader
from step3_edge.config import Step3Config, Step3TextConfig
from step3_edge.errors import PromptError
from step3_edge.model import Step3DecoderLayer, load_weights
from step3_edge.runtime import native
from step3_edge.runtime.backends import TorchBackend
from step3_edge.runtime.expert_cache import Key
from step3_edge.runtime.expert_store import ExpertStore
from step3_edge.runtime.kv import Group, GroupCache, KVPool, SeqKV, StepBatch, plan_step
from step3_edge.runtime.mlp import make_mlp, read_linear
from step3_edge.runtime.ops import RuntimeOps, load_runtime_weights
from step3_edge.vision import (Step3VisionEncoder, build_vision_heads, embed_with_images,
                               encode_images)

if TYPE_CHECKING:
    from step3_edge.runtime.builders import AttentionSide, FFNSide


class _Embedding(nn.Module):
    """Token embedding kept as stored (bf16); rows are cast to the compute dtype on lookup."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight, self.dtype = weight, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:   # [...] -> [..., h]
        return F.embedding(ids, self.weight).to(self.dtype)


class Frontend(nn.Module):
    """Token embeddings with image features at the `<im_patch>` slots (the reference's
    `embed_with_images` and `vision.encode_images`), over the embedding table and, with
    `vision`, the vision tower and its heads."""

    def __init__(self, cfg: Step3Config, reader: CheckpointReader, backend: TorchBackend,
                 vision: bool) -> None:
        super().__init__()
        self.config, self.dtype = cfg, backend.dtype
        # on the CPU the stored table itself (memory-mapped, like every weight: a row is paged
        # in the first time its token is seen, not copied: 1.8 GB for Step3's)
        w = reader.read("model.embed_tokens.weight", torch.bfloat16).to(backend.device)
        self.embed_tokens = _Embedding(w, backend.dtype)
        self.vision_model: Step3VisionEncoder | None = None
        if vision:
            with torch.device("meta"):
                tower = Step3VisionEncoder(cfg.vision_config)
                heads = build_vision_heads(cfg)
            self.vision_model = _load_as(tower, "vision_model.", reader, backend)
            self.heads = tuple(_load_as(heads[n], f"{n}.", reader, backend) for n in
                               ("vit_downsampler", "vit_downsampler2", "vit_large_projector"))

    def embed(self, input_ids: torch.Tensor, images: list | None = None) -> torch.Tensor:
        """input_ids [B, T] -> [B, T, h], image features in place."""
        return embed_with_images(self.embed_tokens, input_ids, self.config.image_token_id,
                                 images, self.encode_images)

    def encode_images(self, images: list) -> torch.Tensor:
        if self.vision_model is None:
            raise PromptError("this runtime was loaded without the vision tower",
                              "load it with vision=True to send images")
        return encode_images(images, self.vision_model, self.heads, self.dtype)


def _load_as(module: nn.Module, prefix: str, reader: CheckpointReader, backend: TorchBackend
             ) -> nn.Module:
    """The reference's weight pass, in the compute dtype on the backend's device."""
    return load_weights(module, lambda n: reader.read(prefix + n, backend.dtype)
                        .to(backend.device))


class AttentionWorker:
    """Attention side of every layer, plus embeddings, vision, final norm, lm_head, routers and
    the KV pool of its sequences."""

    def __init__(self, cfg: Step3Config, reader: CheckpointReader, backend: TorchBackend,
                 kv_tokens: int, kv_dtype: torch.dtype | None = None, vision: bool = True
                 ) -> None:
        t = cfg.text_config
        dev = backend.device
        self.cfg, self.backend = cfg, backend
        self.frontend = Frontend(cfg, reader, backend, vision)
        self.ops = RuntimeOps(backend.caps.native)
        self.layers: list[Step3DecoderLayer] = []
        # progress on a terminal (a real model's weights take minutes to read)
        for L in tqdm(range(t.num_hidden_layers), desc="load attention", unit="layer",
                      disable=None, leave=False):
            with torch.device("meta"):
                layer = Step3DecoderLayer(t, L, self.ops, ffn=False)
            self.layers.append(load_runtime_weights(layer, f"model.layers.{L}.", reader,
                                                    backend))
            self.ops.fuse_qkv(L, layer.self_attn)
        self.qkv = self.ops.qkv
        with torch.device("meta"):
            norm = self.ops.rms_norm(t.hidden_size, t.rms_norm_eps)
        self.norm = load_runtime_weights(norm, "model.norm.", reader, backend)
        self.lm_head = read_linear(reader, backend, "lm_head.weight")
        self.kv = KVPool(t, kv_tokens, kv_dtype or backend.dtype, dev)
        self.kv.native = backend.caps.native and \
            self.kv.dtype in native.KV_KINDS and t.head_dim % 16 == 0 and t.head_dim <= 512
        # a decode group: each layer's attention side and router in one native call per
        # native.BLOCK_MAX_ROWS sequences
        self.blocks = {L: b for L, layer in enumerate(self.layers)
                       if (b := self._native_block(L, layer)) is not None} \
            if self.kv.native else {}
        self._logits: torch.Tensor | None = None

    def _native_block(self, L: int, layer: Step3DecoderLayer) -> native.AttentionLayer | None:
        """`native.AttentionLayer` of a layer whose fused q|k|v, wq, o_proj and router all have
        the native GEMV, else None."""
        a, qkv = layer.self_attn, self.qkv[L]
        lins = [a.wq, a.o_proj] + ([layer.moe.gate] if layer.is_moe else [])
        gemv = [lin.gemv for lin in lins]
        if qkv is None or qkv.native is None or None in gemv:
            return None
        t = self.cfg.text_config
        norms = (layer.input_layernorm, a.inter_norm, layer.post_attention_layernorm)
        return native.AttentionLayer(tuple(n.weight.data for n in norms), t.rms_norm_eps,
                                     qkv.native, gemv[0], gemv[1],
                                     gemv[2] if layer.is_moe else None, t.num_attention_heads,
                                     t.moe_top_k, t.norm_expert_weight)

    def routers(self) -> dict[int, object]:
        """layer -> the reference router (`Step3MoE.route`) of each MoE layer."""
        return {L.layer: L.moe.route for L in self.layers if L.is_moe}

    def embed(self, ids: list[int], images: list | None = None) -> torch.Tensor:
        """One sequence's token embeddings [T, h] (image features in place)."""
        x = torch.tensor([ids], dtype=torch.long, device=self.backend.device)
        return self.frontend.embed(x, images or None)[0]

    def embed_tokens(self, ids: list[int]) -> torch.Tensor:
        """Embeddings [len(ids), h] of plain tokens (decode steps)."""
        x = torch.tensor(ids, dtype=torch.long, device=self.backend.device)
        return self.frontend.embed_tokens(x)

    def layer(self, L: int, h: torch.Tensor, batch: StepBatch
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Residual h [N, h] -> (new residual, normed FFN input [N, h], top-k ids / weights
        [N, k] on MoE layers, else None). A step's decode group (always its first) takes the
        native block where the layer has one, also beside prefill chunks (continuous
        batching); the other groups take the reference's ops."""
        block, g = self.blocks.get(L), batch.groups[0]
        if block is None or g.t != 1:
            return self._groups(L, h, batch.groups)
        first = self._native_layer(block, L, h[:g.b], g)
        if len(batch.groups) == 1:
            return first
        return _cat_fields([first, self._groups(L, h, batch.groups[1:])])

    def _groups(self, L: int, h: torch.Tensor, groups: list[Group]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """`layer` for `groups` (rows g.start .. of h, in order) through the reference's ops,
        one router call for all their rows."""
        layer = self.layers[L]
        hs, xs = [], []
        for g in groups:
            hg = h[g.start:g.start + g.b * g.t].view(g.b, g.t, -1)          # [b, t, h]
            hh, xx = layer.attention_side(hg, g.cos, g.sin, g.mask, GroupCache(self.kv, g))
            hs.append(hh.reshape(g.b * g.t, -1))
            xs.append(xx.reshape(g.b * g.t, -1))
        h, x = (hs[0], xs[0]) if len(hs) == 1 else (torch.cat(hs), torch.cat(xs))
        if not layer.is_moe:
            return h, x, None, None
        ids, w = layer.moe.route(x)                                         # [N, k] each
        return h, x, ids, w

    def _native_layer(self, block: native.AttentionLayer, L: int, h: torch.Tensor, g: Group
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                 torch.Tensor | None]:
        """A decode group's layer through `block`, in calls of at most
        `native.BLOCK_MAX_ROWS` sequences (each sequence's attention is its own)."""
        h, step = h.contiguous(), native.BLOCK_MAX_ROWS
        outs = [block(h[i:i + step], g.cos.view(g.b, -1)[i:i + step],
                      g.sin.view(g.b, -1)[i:i + step], self.kv.kv[L], g.write[i:i + step],
                      g.gather[i:i + step], g.keys[i:i + step])
                for i in range(0, g.b, step)]
        return outs[0] if len(outs) == 1 else _cat_fields(outs)

    def logits(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm and lm_head on residual rows [S, h] -> float32 logits [S, vocab], in
        `out` when given, else in a buffer reused by the next call (consume it first: a
        fresh [16, 128K] float32 tensor costs ~3 ms of page faults per step)."""
        if out is None:
            out = self.logits_buffer(h.shape[0])
        return self.lm_head.matmul_into(self.norm(h), out)

    def logits_buffer(self, rows: int) -> torch.Tensor:
        """A reused float32 [rows, vocab] buffer for `logits`."""
        buf = self._logits
        if buf is None or buf.shape[0] < rows:
            buf = self._logits = torch.empty(max(rows, 16), self.lm_head.shape[0],
                                             device=self.backend.device)
        return buf[:rows]


def _cat_fields(parts: list[tuple]) -> tuple:
    """Field-wise concatenation of `layer` results over consecutive rows (None stays None:
    dense layers have no routing)."""
    return tuple(None if f[0] is None else torch.cat(f) for f in zip(*parts))


@dataclass(frozen=True)
class Shard:
    """What one FFN worker serves: routed experts, dense-MLP layers and shared-expert layers
    (AFD with several FFN ranks splits the FFN side into shards; one worker serves all)."""

    experts: frozenset[Key]
    dense_layers: frozenset[int]
    shared_layers: frozenset[int]

    @classmethod
    def everything(cls, t: Step3TextConfig) -> Shard:
        return cls(frozenset((L, e) for L in t.moe_layers for e in range(t.moe_num_experts)),
                   frozenset(t.dense_layers), frozenset(t.moe_layers))

    @property
    def layers(self) -> frozenset[int]:
        """Layers this shard computes anything for (the layers whose FFN input it receives)."""
        return self.dense_layers | self.shared_layers | {L for L, _ in self.experts}

    def to_dict(self) -> dict[str, list]:
        return {"experts": sorted(map(list, self.experts)),
                "dense_layers": sorted(self.dense_layers),
                "shared_layers": sorted(self.shared_layers)}

    @classmethod
    def from_dict(cls, d: dict[str, list]) -> Shard:
        return cls(frozenset(map(tuple, d["experts"])), frozenset(d["dense_layers"]),
                   frozenset(d["shared_layers"]))


class FFNWorker:
    """FFN side of every layer (or of one shard): dense MLPs, shared experts and the routed
    experts' store. With a shard, `layer` returns this shard's partial sum."""

    def __init__(self, cfg: Step3Config, reader: CheckpointReader, backend: TorchBackend,
                 store: ExpertStore, shard: Shard | None = None) -> None:
        t = cfg.text_config
        self.cfg, self.store = t, store
        self.shard = shard or Shard.everything(t)
        self.mlps: dict[int, nn.Module] = {}
        self._expert_layers = {L for L, _ in self.shard.experts}
        for L in range(t.num_hidden_layers):
            moe = t.is_moe(L)
            if L not in (self.shard.shared_layers if moe else self.shard.dense_layers):
                continue
            part = "share_expert" if moe else "mlp"
            self.mlps[L] = make_mlp(*(read_linear(reader, backend,
                                                  f"model.layers.{L}.{part}.{p}.weight")
                                      for p in ("gate_proj", "up_proj", "down_proj")))

    def layer(self, L: int, x: torch.Tensor, ids: torch.Tensor | None,
              w: torch.Tensor | None) -> torch.Tensor:
        """FFN output [N, h] for normed input x [N, h] (and top-k ids / weights on MoE layers)."""
        mlp = self.mlps.get(L)
        if ids is None or w is None or L not in self._expert_layers:
            return mlp(x) if mlp is not None else torch.zeros_like(x)
        nxt = L + 1 if self.cfg.is_moe(L + 1) else None
        return self.store.compute(L, x, ids, w, next_layer=nxt, shared=mlp)

    def begin_step(self) -> None:
        self.store.begin_step()

    def expert_stats(self) -> dict[str, Any]:
        return self.store.summary()

    def reset_stats(self) -> None:
        self.store.reset_stats()

    def expert_counts(self) -> dict[int, list[int]]:
        return {L: list(c) for L, c in self.store.counts.items()}

    def record_trace(self, on: bool) -> list | None:
        return self.store.record_trace(on)


class Engine:
    """One process, one device: the attention side then the FFN side of each layer (the
    torch workers here, or a graph backend's)."""

    micro_batches = 1

    def __init__(self, attn: AttentionSide, ffn: FFNSide, sync_timing: bool = False
                 ) -> None:
        self.attn, self.ffn = attn, ffn
        n = attn.cfg.text_config.num_hidden_layers
        self.attn_seconds = [0.0] * n
        self.ffn_seconds = [0.0] * n
        self.steps = 0
        dev = attn.backend.device
        self._sync = (lambda: torch.cuda.synchronize(dev)) if sync_timing and \
            dev.type == "cuda" else (lambda: None)

    def reset_stats(self) -> None:
        """Zero the timings and the FFN side's expert counters."""
        n = len(self.attn_seconds)
        self.attn_seconds, self.ffn_seconds, self.steps = [0.0] * n, [0.0] * n, 0
        self.ffn.reset_stats()

    def expert_stats(self) -> dict[str, Any]:
        return self.ffn.expert_stats()

    def expert_counts(self) -> dict[int, list[int]]:
        return self.ffn.expert_counts()

    def record_trace(self, on: bool) -> list | None:
        return self.ffn.record_trace(on)

    def time_stats(self) -> dict[str, Any]:
        return {"steps": self.steps, "attention_s": list(self.attn_seconds),
                "ffn_s": list(self.ffn_seconds)}

    def describe(self) -> dict[str, Any]:
        return {"mode": "single process", **self.attn.backend.describe()}

    def snapshot(self) -> dict[str, Any]:
        """Backend, expert statistics and time per layer side (`Step3Runtime.stats`)."""
        return {"backend": self.describe(), "experts": self.expert_stats(),
                "time": self.time_stats()}

    def close(self) -> None:
        """Nothing to release (the AFD engine stops its workers here)."""

    def run(self, segments: list[tuple[SeqKV, int]], h: torch.Tensor) -> torch.Tensor:
        """One step over `segments` (sequence KV, new tokens) with embedded rows h [N, h] ->
        float32 logits [len(segments), vocab]."""
        return self.forward(plan_step(self.attn.kv, segments), h)

    def forward(self, batch: StepBatch, h: torch.Tensor) -> torch.Tensor:
        """Embedded new tokens h [N, h] (flat rows in `batch` order) -> float32 logits
        [sequences, vocab] at each sequence's last new token; advances the KV lengths."""
        self.ffn.begin_step()
        clock = time.perf_counter
        for L in range(len(self.attn.layers)):
            t0 = clock()
            h, x, ids, w = self.attn.layer(L, h, batch)
            self._sync()
            t1 = clock()
            f = self.ffn.layer(L, x, ids, w)
            self._sync()
            self.attn_seconds[L] += t1 - t0
            self.ffn_seconds[L] += clock() - t1
            h = h + f
        batch.commit()
        self.steps += 1
        rows = torch.tensor(batch.last_rows, device=h.device)
        return self.attn.logits(h.index_select(0, rows))
