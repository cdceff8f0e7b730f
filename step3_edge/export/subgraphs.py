"""Declarations of every exported subgraph (the Step3 paper's AFD split, docs/export.md):
inputs and outputs with their dynamic axes, the weights each one binds, the reference module it
must match, fresh random inputs for validation, and the instances (layers, experts) one graph
file serves.

`REGISTRY` is the single list of subgraph kinds: export, validation, the bundle and the ONNX
runner all iterate over it, and `tests/export/test_export_registry.py` fails when a kind has
no validation test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from step3_edge.checkpoint import CheckpointReader
from step3_edge.config import Step3Config
from step3_edge.export.graphs import (AttentionGraph, EmbedGraph, Graph, LMHeadGraph,
                                      SwiGLUGraph, VisionGraph)
from step3_edge.manifest import GraphIO
from step3_edge.model import (KVCache, RMSNorm, Step3DecoderLayer, Step3MLP, Step3MoE,
                              attention_mask, load_weights, rope_cos_sin)
from step3_edge.vision import (Step3VisionEncoder, build_vision_heads, project_features,
                               resize_position_embedding)

CROP_SIZE = 504  # crops of vLLM's ImagePatcher; the global view is vision_config.image_size
Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Instance:
    """What one bound session computes: a layer, an expert of a layer, or the whole model."""

    layer: int | None = None
    expert: int | None = None

    def __str__(self) -> str:
        parts = [f"layer {self.layer}"] if self.layer is not None else []
        parts += [f"expert {self.expert}"] if self.expert is not None else []
        return ", ".join(parts) or "model"


@dataclass(frozen=True)
class SubgraphDecl:
    """One subgraph kind. `prefix` + a graph weight name = the checkpoint tensor name;
    `linear` names the weights stored [out, in] in the checkpoint and [in, out] in the graph
    (the ones a quantization scheme can hold)."""

    kind: str
    doc: str
    build: Callable[[Step3Config], Graph]
    inputs: Callable[[Step3Config], tuple[GraphIO, ...]]
    outputs: Callable[[Step3Config], tuple[GraphIO, ...]]
    instances: Callable[[Step3Config], list[Instance]]
    reference: Callable[[Step3Config, CheckpointReader, Instance], Callable[..., Tensors]]
    prefix: str = ""
    linear: Callable[[str], bool] = lambda name: False
    expert: bool = False               # weights are slices of stacked [E, ...] tensors
    image_size: Callable[[Step3Config], int] | None = None  # vision: the fixed view size

    def tensor(self, weight: str, inst: Instance) -> str:
        return self.prefix.format(layer=inst.layer) + weight

    def weight_names(self, cfg: Step3Config) -> tuple[str, ...]:
        return self.build(cfg).weights

    def sample(self, cfg: Step3Config, dims: dict[str, int], gen: torch.Generator | None = None,
               device: str = "cpu") -> Tensors:
        """Random inputs of the declared shapes (dims: batch/seq/past/tokens)."""
        out: Tensors = {}
        full = {**dims, "total": dims.get("past", 0) + dims.get("seq", 0)}
        for io in self.inputs(cfg):
            shape = tuple(full[d] if isinstance(d, str) else d for d in io.shape)
            if device == "meta":
                dt = {"float32": torch.float32, "int64": torch.int64, "bool": torch.bool}
                out[io.name] = torch.empty(shape, dtype=dt[io.dtype], device="meta")
            elif io.name == "input_ids":
                out[io.name] = torch.randint(0, cfg.text_config.vocab_size, shape, generator=gen)
            elif io.dtype == "float32":
                out[io.name] = torch.randn(shape, generator=gen)
        if device != "meta" and "positions" in out.keys() | {i.name for i in self.inputs(cfg)}:
            out.update(_positions(full["batch"], full["past"], full["seq"], gen))
        return out


def _positions(b: int, past: int, seq: int, gen: torch.Generator | None) -> Tensors:
    """key_valid with row 0 left-padded inside the past (when there is one), and the positions
    the reference derives from it."""
    valid = torch.ones(b, past + seq, dtype=torch.bool)
    if past:
        pad = int(torch.randint(0, past + 1, (1,), generator=gen))
        valid[0, :pad] = False
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, past:]     # [B, T]
    return {"positions": positions, "key_valid": valid}


# ---------------------------------------------------------------------------- references
def _load(module: nn.Module, reader: CheckpointReader, prefix: str) -> nn.Module:
    """The reference's weight pass over `module`, every tensor dequantized to float32."""
    return load_weights(module, lambda name: reader.read(prefix + name, torch.float32))


def _ref_embed(cfg: Step3Config, reader: CheckpointReader, inst: Instance):
    with torch.device("meta"):
        emb = nn.Embedding(cfg.text_config.vocab_size, cfg.text_config.hidden_size)
    emb = _load(emb, reader, "model.embed_tokens.")
    return lambda input_ids: {"hidden": emb(input_ids)}


def _ref_attention(cfg: Step3Config, reader: CheckpointReader, inst: Instance):
    t = cfg.text_config
    with torch.device("meta"):
        layer = Step3DecoderLayer(t, inst.layer, ffn=False)
    _load(layer, reader, f"model.layers.{inst.layer}.")

    def run(hidden, positions, key_valid, past_k, past_v) -> Tensors:
        b, s_new, past = hidden.shape[0], hidden.shape[1], past_k.shape[1]
        cache = KVCache(dataclasses.replace(t, num_hidden_layers=inst.layer + 1), b,
                        past + s_new)
        cache.k[inst.layer][:, :past], cache.v[inst.layer][:, :past] = past_k, past_v
        cache.length = past
        cos, sin = rope_cos_sin(positions, t.head_dim, t.rope_theta, t.rope_factor)
        mask = attention_mask(positions, key_valid, past)
        res, normed = layer.attention_side(hidden, cos, sin, mask, cache)
        out = {"residual": res, "normed": normed, "present_k": cache.k[inst.layer],
               "present_v": cache.v[inst.layer]}
        if layer.is_moe:
            flat = normed.reshape(-1, t.hidden_size)
            ids, w = layer.moe.route(flat)
            out.update(topk_ids=ids.view(b, s_new, -1), topk_weights=w.view(b, s_new, -1),
                       router_probs=torch.softmax(layer.moe.gate(flat).float(), -1))
        return out
    return run


def _ref_expert(cfg: Step3Config, reader: CheckpointReader, inst: Instance):
    t = dataclasses.replace(cfg.text_config, moe_num_experts=1)
    with torch.device("meta"):
        moe = Step3MoE(t)
    p = f"model.layers.{inst.layer}.moe."
    state = {f"{n}.weight": reader.read(f"{p}{n}.weight", torch.float32, inst.expert)[None]
             for n in ("gate_proj", "up_proj", "down_proj")}
    moe.load_state_dict(state, strict=False, assign=True)
    return lambda x: {"y": moe.expert(x, 0)}


def _ref_mlp(name: str, inter: Callable[[Step3Config], int]):
    def make(cfg: Step3Config, reader: CheckpointReader, inst: Instance):
        with torch.device("meta"):
            mlp = Step3MLP(cfg.text_config.hidden_size, inter(cfg))
        mlp = _load(mlp, reader, f"model.layers.{inst.layer}.{name}.")
        return lambda x: {"y": mlp(x)}
    return make


def _ref_lm_head(cfg: Step3Config, reader: CheckpointReader, inst: Instance):
    t = cfg.text_config
    with torch.device("meta"):
        norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
    norm, head = _load(norm, reader, "model.norm."), _load(head, reader, "lm_head.")
    return lambda hidden: {"logits": head(norm(hidden))}


def _ref_vision(cfg: Step3Config, reader: CheckpointReader, inst: Instance):
    with torch.device("meta"):
        enc = Step3VisionEncoder(cfg.vision_config)
        heads = build_vision_heads(cfg)
    enc = _load(enc, reader, "vision_model.")
    mods = [_load(heads[n], reader, n + ".") for n in
            ("vit_downsampler", "vit_downsampler2", "vit_large_projector")]
    return lambda pixel_values: {"features": project_features(enc(pixel_values), *mods)}


# ---------------------------------------------------------------------------- declarations
def _h(cfg: Step3Config) -> int:
    return cfg.text_config.hidden_size


def _attn_io(moe: bool):
    def inputs(cfg: Step3Config) -> tuple[GraphIO, ...]:
        d = cfg.text_config.head_dim
        return (GraphIO("hidden", "float32", ("batch", "seq", _h(cfg))),
                GraphIO("positions", "int64", ("batch", "seq")),
                GraphIO("key_valid", "bool", ("batch", "total")),
                GraphIO("past_k", "float32", ("batch", "past", d)),
                GraphIO("past_v", "float32", ("batch", "past", d)))

    def outputs(cfg: Step3Config) -> tuple[GraphIO, ...]:
        d, k = cfg.text_config.head_dim, cfg.text_config.moe_top_k
        out = (GraphIO("residual", "float32", ("batch", "seq", _h(cfg))),
               GraphIO("normed", "float32", ("batch", "seq", _h(cfg))),
               GraphIO("present_k", "float32", ("batch", "total", d)),
               GraphIO("present_v", "float32", ("batch", "total", d)))
        if moe:
            out += (GraphIO("topk_ids", "int64", ("batch", "seq", k)),
                    GraphIO("topk_weights", "float32", ("batch", "seq", k)))
        return out
    return inputs, outputs


def _ffn_io(cfg: Step3Config) -> tuple[GraphIO, ...]:
    return (GraphIO("x", "float32", ("tokens", _h(cfg))),)


def _ffn_out(cfg: Step3Config) -> tuple[GraphIO, ...]:
    return (GraphIO("y", "float32", ("tokens", _h(cfg))),)


def _layers(moe: bool) -> Callable[[Step3Config], list[Instance]]:
    def inst(cfg: Step3Config) -> list[Instance]:
        t = cfg.text_config
        return [Instance(L) for L in range(t.num_hidden_layers) if t.is_moe(L) == moe]
    return inst


def _experts(cfg: Step3Config) -> list[Instance]:
    t = cfg.text_config
    return [Instance(L, e) for L in t.moe_layers for e in range(t.moe_num_experts)]


def _vision(kind: str, size: Callable[[Step3Config], int], doc: str) -> SubgraphDecl:
    return SubgraphDecl(
        kind, doc, VisionGraph,
        lambda cfg: (GraphIO("pixel_values", "float32", ("batch", 3, size(cfg), size(cfg))),),
        lambda cfg: (GraphIO("features", "float32",
                        ("batch", cfg.vision_tokens(size(cfg)), _h(cfg))),),
        lambda cfg: [Instance()], _ref_vision,
        linear=lambda n: n.endswith(("proj.weight", "fc1.weight", "fc2.weight",
                                     "projector.weight")),
        image_size=size)


def _attn_linear(n: str) -> bool:
    return n.startswith("self_attn.") and n != "self_attn.inter_norm.weight" or \
        n == "moe.gate.weight"


def _mlp_linear(n: str) -> bool:
    return n.endswith("_proj.weight")


REGISTRY: dict[str, SubgraphDecl] = {d.kind: d for d in (
    SubgraphDecl("embed", "token embedding: input_ids [B, T] -> hidden [B, T, h]", EmbedGraph,
                 lambda cfg: (GraphIO("input_ids", "int64", ("batch", "seq")),),
                 lambda cfg: (GraphIO("hidden", "float32", ("batch", "seq", _h(cfg))),),
                 lambda cfg: [Instance()], _ref_embed),
    SubgraphDecl("attn_dense", "attention side of a dense layer (norm, MFA + KV, residual, "
                 "post-attention norm)", lambda cfg: AttentionGraph(cfg, moe=False),
                 *_attn_io(False), _layers(False), _ref_attention,
                 prefix="model.layers.{layer}.", linear=_attn_linear),
    SubgraphDecl("attn_moe", "attention side of a MoE layer, plus the router's softmax top-k "
                 "ids and weights", lambda cfg: AttentionGraph(cfg, moe=True),
                 *_attn_io(True), _layers(True), _ref_attention,
                 prefix="model.layers.{layer}.", linear=_attn_linear),
    SubgraphDecl("expert", "one routed expert (SwiGLU), unweighted: the runtime gathers its "
                 "tokens and applies the routing weight", lambda cfg: SwiGLUGraph(cfg, "moe"),
                 _ffn_io, _ffn_out, _experts, _ref_expert, prefix="model.layers.{layer}.",
                 linear=_mlp_linear, expert=True),
    SubgraphDecl("shared_expert", "the always-on shared expert of a MoE layer",
                 lambda cfg: SwiGLUGraph(cfg, "share_expert"), _ffn_io, _ffn_out,
                 _layers(True), _ref_mlp("share_expert", lambda c: c.text_config
                                         .share_expert_dim),
                 prefix="model.layers.{layer}.", linear=_mlp_linear),
    SubgraphDecl("dense_mlp", "the dense SwiGLU MLP of layers 0-3 and 60",
                 lambda cfg: SwiGLUGraph(cfg, "mlp"), _ffn_io, _ffn_out, _layers(False),
                 _ref_mlp("mlp", lambda c: c.text_config.intermediate_size),
                 prefix="model.layers.{layer}.", linear=_mlp_linear),
    SubgraphDecl("lm_head", "final RMSNorm + lm_head: hidden [B, T, h] -> logits [B, T, V]",
                 LMHeadGraph,
                 lambda cfg: (GraphIO("hidden", "float32", ("batch", "seq", _h(cfg))),),
                 lambda cfg: (GraphIO("logits", "float32",
                                 ("batch", "seq", cfg.text_config.vocab_size)),),
                 lambda cfg: [Instance()], _ref_lm_head,
                 linear=lambda n: n == "lm_head.weight"),
    _vision("vision_global", lambda cfg: cfg.vision_config.image_size,
            "vision encoder + downsamplers + projector for the global view"),
    _vision("vision_crop", lambda cfg: CROP_SIZE,
            "vision encoder + downsamplers + projector for 504 px crops (position table "
            "resized when bound)"),
)}


def graph_weight_shape(decl: SubgraphDecl, cfg: Step3Config, weight: str) -> tuple[int, ...]:
    """Shape of one weight as the fp32 graph takes it (linear weights transposed)."""
    from step3_edge.layout import expected_weights

    inst = decl.instances(cfg)[0]
    spec = expected_weights(cfg)[decl.tensor(weight, inst)]
    shape = spec.shape[1:] if decl.expert else spec.shape
    if weight == "vision_model.embeddings.position_embedding.weight" and decl.image_size:
        g = decl.image_size(cfg) // cfg.vision_config.patch_size
        return (g * g + 1, shape[1])
    return tuple(reversed(shape)) if decl.linear(weight) else tuple(shape)


def resized_position_table(cfg: Step3Config, table: torch.Tensor, image_size: int
                           ) -> torch.Tensor:
    """The position table of one view size (the reference resizes it the same way)."""
    return resize_position_embedding(table, image_size // cfg.vision_config.patch_size)


