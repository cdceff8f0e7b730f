"""Run a bundle's ONNX subgraphs in ONNX Runtime: bound sessions, and a prefill / decode loop.

`BoundSession` is one graph file with one instance's weights bound as external initializers.
`BundleGraphs` opens a bundle and creates (lazily, cached) the session of any kind for any
layer or expert; the runtime's ORT backend builds on it (it decides where each expert runs and
may `release` sessions). `OnnxStep3` drives the AFD split end to end: embed (+ vision) ->
per layer attention side -> FFN side (shared + routed experts, or dense MLP) -> lm_head, with a
KV cache, greedy `generate` -- the same API as the reference model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from step3_edge.checkpoint import CheckpointReader
from step3_edge.config import Step3Config
from step3_edge.errors import BundleError, MissingExtraError, PromptError
from step3_edge.export.binding import FLOAT8E4M3FN, Bound, WeightBinding, bind
from step3_edge.export.subgraphs import Instance
from step3_edge.manifest import Manifest, Subgraph, load_manifest, sha256_file
from step3_edge.vision import crop_batches


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise MissingExtraError("onnxruntime", "cpu", "running ONNX subgraphs") from None
    return onnxruntime


# what ONNX Runtime raises for a graph file it cannot load: not protobuf, not a valid graph,
# an operator it lacks, initializers the graph does not have (EPFail, a provider that cannot
# start, is the machine's problem and stays as it is)
_LOAD_ERRORS = ("InvalidProtobuf", "InvalidGraph", "Fail", "InvalidArgument", "NoSuchFile",
                "NoModel", "NotImplemented", "RuntimeException")
RE_EXPORT = "the graph file was damaged or replaced; re-export the bundle (step3-edge export)"


def _load_errors(ort: Any) -> tuple[type[BaseException], ...]:
    state = ort.capi.onnxruntime_pybind11_state
    return tuple(getattr(state, n) for n in _LOAD_ERRORS if hasattr(state, n))


@dataclass
class BoundSession:
    """An ORT session of one graph with one instance's weights bound (kept alive with it)."""

    session: Any
    weights: dict[str, Any] = field(repr=False)     # name -> OrtValue, kept alive with it
    outputs: list[str] = field(default_factory=list)
    fed: bool = False                               # weights are graph inputs fed each run

    @classmethod
    def create(cls, model: str | Path | bytes, bound: dict[str, Bound],
               providers: list[str] | None = None, threads: int | None = None,
               spin: bool = True, name: str | None = None,
               lean: bool = False) -> BoundSession:
        """`threads`: intra-op threads (default: ORT's, one per core); `spin=False` stops
        idle ORT threads from busy-waiting (use it when torch shares the cores);
        `lean=True` is for a session run a few times (validation), where a second copy of a
        3.7 GB embedding or lm_head would be the peak: the bound weights enter as graph inputs
        fed on every run (ONNX Runtime copies external initializers when it creates a session,
        and reads inputs where they are, unpacked), and activations are freed after each run
        instead of kept in an arena. A graph ONNX Runtime cannot load is a `BundleError` naming
        `name` (default: the file)."""
        ort = _ort()
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        if not spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        weights = {n: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(b.array, FLOAT8E4M3FN)
                   if b.onnx_type == FLOAT8E4M3FN else ort.OrtValue.ortvalue_from_numpy(b.array)
                   for n, b in bound.items()}
        if lean:
            so.enable_cpu_mem_arena = False
            src = _weights_as_inputs(model, bound)
        else:
            so.add_external_initializers(list(weights), list(weights.values()))
            src = str(model) if isinstance(model, Path) else model
        try:
            sess = ort.InferenceSession(src, so, providers=providers or ["CPUExecutionProvider"])
        except _load_errors(ort) as e:
            what = name or (str(model) if isinstance(model, (str, Path)) else "an ONNX graph")
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise BundleError(f"{what} is not an ONNX graph ONNX Runtime "
                              f"{ort.__version__} can load with its weights: {why[:300]}",
                              RE_EXPORT) from None
        return cls(sess, weights, [o.name for o in sess.get_outputs()], lean)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.fed:
            return dict(zip(self.outputs, self.session.run(None, feeds)))
        ort = _ort()
        values = {**self.weights, **{k: ort.OrtValue.ortvalue_from_numpy(v)
                                     for k, v in feeds.items()}}
        return dict(zip(self.outputs, (v.numpy() for v in
                                       self.session.run_with_ort_values(self.outputs, values))))


def _weights_as_inputs(model: str | Path | bytes, bound: dict[str, Bound]) -> bytes:
    """The graph with the initializers named in `bound` turned into graph inputs of the same
    type and shape (their data stays outside the graph, as exported)."""
    import onnx

    proto = (onnx.load_model_from_string(model) if isinstance(model, bytes) else
             onnx.load(str(model), load_external_data=False))
    g = proto.graph
    kept = [t for t in g.initializer if t.name not in bound]
    inputs = [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
              for t in g.initializer if t.name in bound]
    del g.initializer[:]
    g.initializer.extend(kept)
    g.input.extend(inputs)
    return proto.SerializeToString()


class BundleGraphs:
    """Sessions for every subgraph of a bundle, created on first use per (kind, instance)."""

    def __init__(self, bundle: str | Path | Manifest, *, providers: list[str] | None = None,
                 threads: int | None = None, spin: bool = True, verify: bool = False) -> None:
        self.manifest = bundle if isinstance(bundle, Manifest) else load_manifest(bundle, verify)
        self.bundle = self.manifest.bundle
        self.cfg = self.manifest.config
        self.reader = CheckpointReader(self.bundle, self.cfg)
        self.providers, self.threads, self.spin = providers, threads, spin
        self._route: dict[tuple[str, int | None, int | None], str] = {}
        for name, sg in self.manifest.subgraphs.items():
            for layer, expert in sg.instances:
                self._route[(sg.kind, layer, expert)] = name
        self._bindings = {n: [WeightBinding.from_dict(w) for w in sg.weights]
                          for n, sg in self.manifest.subgraphs.items()}
        self._files: dict[str, Path] = {}
        self._sessions: dict[tuple[str, int | None, int | None], BoundSession] = {}

    def subgraph_for(self, kind: str, layer: int | None = None, expert: int | None = None
                     ) -> str:
        """Name of the subgraph (graph file) that serves this kind / layer / expert."""
        try:
            return self._route[(kind, layer, expert)]
        except KeyError:
            raise BundleError(f"the bundle has no {kind} subgraph for "
                              f"{Instance(layer, expert)}",
                              "re-export the bundle (was it exported with --no-onnx?)") from None

    def _file(self, name: str) -> Path:
        """The graph file, checked against its manifest sha256 once (graphs are small)."""
        if name not in self._files:
            rel = self.manifest.subgraphs[name].file
            path = self.manifest.path(rel)
            if sha256_file(path) != self.manifest.artifact(rel).sha256:
                raise BundleError(f"{rel} does not match its sha256 in manifest.json",
                                  "the bundle was modified or damaged; re-export it")
            self._files[name] = path
        return self._files[name]

    def session(self, kind: str, layer: int | None = None, expert: int | None = None
                ) -> BoundSession:
        key = (kind, layer, expert)
        if key not in self._sessions:
            name = self.subgraph_for(*key)
            bound = bind(self._bindings[name], self.reader, self.cfg, Instance(layer, expert))
            self._sessions[key] = self._create(name, bound)
        return self._sessions[key]

    def _create(self, name: str, bound: dict[str, Bound]) -> Any:
        """The session of subgraph `name` with one instance's weights (an ORT session here;
        the runtime's TensorRT backend makes an engine instead)."""
        sg = self.manifest.subgraphs[name]
        sess = BoundSession.create(self._file(name), bound, self.providers, self.threads,
                                   self.spin, name=sg.file)
        check_io(sess.session, sg)
        return sess

    def run(self, kind: str, feeds: dict[str, np.ndarray], layer: int | None = None,
            expert: int | None = None) -> dict[str, np.ndarray]:
        return self.session(kind, layer, expert).run(feeds)

    def release(self, kind: str, layer: int | None = None, expert: int | None = None) -> None:
        """Drop a session and its bound weights (e.g. an evicted expert)."""
        self._sessions.pop((kind, layer, expert), None)

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    @property
    def active_providers(self) -> list[str]:
        """Providers the created sessions really use (empty before the first session)."""
        sess = next(iter(self._sessions.values()), None)
        return list(sess.session.get_providers()) if sess is not None else []


ONNX_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)",
              "int32": "tensor(int32)", "bool": "tensor(bool)", "bfloat16": "tensor(bfloat16)"}


def check_io(session: Any, sg: Subgraph) -> None:
    """The graph's inputs and outputs are the ones manifest.json declares for its subgraph:
    names, element types, ranks and fixed sizes (a graph file swapped for another of the
    bundle may load with the same weights, and would compute something else)."""
    for side, declared, have in (("inputs", sg.inputs, session.get_inputs()),
                                 ("outputs", sg.outputs, session.get_outputs())):
        want = {io.name: io for io in declared}
        got = {io.name: io for io in have}
        if sorted(got) != sorted(want):
            raise BundleError(f"{sg.file} has {side} {list(got)}, but manifest.json "
                              f"declares {list(want)} for its subgraph", RE_EXPORT)
        for name, io in got.items():
            shape, dtype = list(want[name].shape), want[name].dtype
            fixed = io.shape is not None and len(io.shape) == len(shape) and all(
                not isinstance(d, int) or not isinstance(g, int) or d == g
                for d, g in zip(shape, io.shape))
            if not fixed or ONNX_TYPES.get(dtype, io.type) != io.type:
                raise BundleError(f"{sg.file}: {name} is {io.type} {io.shape}, but "
                                  f"manifest.json declares {dtype} {shape}", RE_EXPORT)


@dataclass
class OnnxKVCache:
    """Per layer k, v [B, S, head_dim] float32 (the attention graphs return the whole cache)."""

    k: list[np.ndarray]
    v: list[np.ndarray]
    length: int = 0

    @classmethod
    def empty(cls, cfg: Step3Config, batch: int) -> OnnxKVCache:
        t = cfg.text_config
        z = np.zeros((batch, 0, t.head_dim), dtype=np.float32)
        return cls([z] * t.num_hidden_layers, [z] * t.num_hidden_layers)


class OnnxStep3:
    """Step3 driven through the exported subgraphs (same API shape as the reference model)."""

    def __init__(self, graphs: BundleGraphs) -> None:
        self.graphs = graphs
        self.cfg = graphs.cfg

    @classmethod
    def load(cls, bundle: str | Path, **kwargs: Any) -> OnnxStep3:
        return cls(BundleGraphs(bundle, **kwargs))

    def encode_images(self, images: list) -> np.ndarray:
        """Vision features [n_image_tokens, h] for a list of ImageViews (crops,
        `CROPS_PER_CALL` per graph call, then global)."""
        feats = []
        for views in images:
            for crops in crop_batches(views.crops):
                f = self.graphs.run("vision_crop", {"pixel_values": _np(crops)})
                feats.append(f["features"].reshape(-1, f["features"].shape[-1]))
            g = self.graphs.run("vision_global", {"pixel_values": _np(views.global_view[None])})
            feats.append(g["features"][0])
        return np.concatenate(feats)

    def embed(self, input_ids: np.ndarray, images: list | None = None) -> np.ndarray:
        """Token embeddings [B, T, h] with image features at the `<im_patch>` positions."""
        x = self.graphs.run("embed", {"input_ids": input_ids})["hidden"]
        slots = input_ids == self.cfg.image_token_id
        if not images:
            if slots.any():
                raise PromptError(f"the prompt holds {int(slots.sum())} <im_patch> tokens but "
                                  "no image", "pass the images, or remove the placeholders")
            return x
        feats = self.encode_images(images)
        if feats.shape[0] != int(slots.sum()):
            raise PromptError(f"{feats.shape[0]} image features for {int(slots.sum())} "
                              "<im_patch> tokens", "build the prompt with Step3Processor")
        x[slots] = feats
        return x

    def attention(self, layer: int, hidden: np.ndarray, positions: np.ndarray,
                  key_valid: np.ndarray, past_k: np.ndarray, past_v: np.ndarray
                  ) -> dict[str, np.ndarray]:
        """Attention side of one layer: residual, normed, present_k/v (+ topk on MoE)."""
        kind = "attn_moe" if self.cfg.text_config.is_moe(layer) else "attn_dense"
        return self.graphs.run(kind, {"hidden": hidden, "positions": positions,
                                      "key_valid": key_valid, "past_k": past_k,
                                      "past_v": past_v}, layer)

    def ffn(self, layer: int, normed: np.ndarray, topk_ids: np.ndarray | None = None,
            topk_weights: np.ndarray | None = None) -> np.ndarray:
        """FFN side of one layer on normed [B, T, h]: dense MLP, or shared expert plus the
        routed experts each token chose (weighted, accumulated in fp32)."""
        flat = np.ascontiguousarray(normed.reshape(-1, normed.shape[-1]))        # [N, h]
        if not self.cfg.text_config.is_moe(layer):
            return self.graphs.run("dense_mlp", {"x": flat}, layer)["y"].reshape(normed.shape)
        shared = self.graphs.run("shared_expert", {"x": flat}, layer)["y"]
        ids = topk_ids.reshape(flat.shape[0], -1)                                # [N, k]
        w = topk_weights.reshape(flat.shape[0], -1)                              # [N, k]
        routed = np.zeros_like(flat)
        for e in np.unique(ids).tolist():
            tok, slot = np.nonzero(ids == e)
            y = self.graphs.run("expert", {"x": flat[tok]}, layer, e)["y"]       # [n_e, h]
            np.add.at(routed, tok, y * w[tok, slot, None])
        return (shared + routed).reshape(normed.shape)

    def forward(self, input_ids: np.ndarray | torch.Tensor | None = None,
                images: list | None = None, cache: OnnxKVCache | None = None,
                key_valid: np.ndarray | torch.Tensor | None = None,
                inputs_embeds: np.ndarray | None = None, last_only: bool = False
                ) -> np.ndarray:
        """Logits [B, T, vocab] (or [B, 1, vocab] with last_only). With `cache`, the tokens
        continue after `cache.length`; `key_valid` [B, past + T] marks non-padding slots."""
        t = self.cfg.text_config
        h = inputs_embeds if inputs_embeds is not None else self.embed(_np(input_ids), images)
        b, n = h.shape[:2]
        cache = cache if cache is not None else OnnxKVCache.empty(self.cfg, b)
        past = cache.length
        valid = np.ones((b, past + n), dtype=bool) if key_valid is None else _np(key_valid)
        if past + n > t.max_context:
            raise PromptError(f"{past + n} tokens exceed the context of {t.max_context}",
                              "shorten the prompt or lower max_new_tokens")
        positions = np.clip(valid.astype(np.int64).cumsum(-1) - 1, 0, None)[:, past:]
        for layer in range(t.num_hidden_layers):
            a = self.attention(layer, h, positions, valid, cache.k[layer], cache.v[layer])
            cache.k[layer], cache.v[layer] = a["present_k"], a["present_v"]
            h = a["residual"] + self.ffn(layer, a["normed"], a.get("topk_ids"),
                                         a.get("topk_weights"))
        cache.length += n
        h = h[:, -1:] if last_only else h
        return self.graphs.run("lm_head", {"hidden": np.ascontiguousarray(h)})["logits"]

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 16,
                 images: list | None = None, stop_token_ids: tuple[int, ...] = (),
                 key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy prefill + decode; returns [B, T + new] like the reference `generate`."""
        ids = _np(input_ids).astype(np.int64)
        b = ids.shape[0]
        cache = OnnxKVCache.empty(self.cfg, b)
        valid = np.ones(ids.shape, dtype=bool) if key_valid is None else _np(key_valid)
        logits = self.forward(ids, images, cache, valid, last_only=True)[:, -1]
        out, done = [ids], np.zeros(b, dtype=bool)
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1)                                              # [B]
            nxt = np.where(done, out[-1][:, -1], nxt)
            out.append(nxt[:, None])
            done |= np.isin(nxt, list(stop_token_ids))
            if step == max_new_tokens - 1 or done.all():
                break
            valid = np.concatenate([valid, np.ones((b, 1), dtype=bool)], axis=1)
            logits = self.forward(nxt[:, None], cache=cache, key_valid=valid,
                                  last_only=True)[:, -1]
        return torch.from_numpy(np.concatenate(out, axis=1))


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
