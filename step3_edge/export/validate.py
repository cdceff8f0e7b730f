"""Validation: every exported subgraph, run in ONNX Runtime on fresh random inputs with real
bound weights, against the same part of the reference model, before it enters the manifest.

The reference is the PyTorch module of `step3_edge.model` / `step3_edge.vision` with the same
stored weights dequantized to fp32, so the check isolates the graph and its kernels; weight
quantization error is measured end to end (the quantize stage's error report, and the bundle
accuracy tests in tests/export/test_export_decode.py and tests/test_real_width.py).

Tolerance per output: max |onnx - reference| <= atol + rtol * max |reference| (scale-aware,
so one number fits logits and hidden states alike). Per precision (docs/quantization.md,
"Exported subgraphs"):
- fp32 (bf16 weights computed in fp32) and fp8 (DequantizeLinear -> exact fp32 weights, fp32
  MatMul): only summation order differs, measured ~3e-7 relative on tiny; 1e-4 leaves room
  for the ~sqrt(K) growth at 7168 wide.
- int8 / int4 (MatMulNBits or fused int8 DequantizeLinear, accuracy_level 4): ORT quantizes
  the activations to int8 per block of 128. On the trained default model's cpu int8 export
  (700-2,500 draws per graph) the worst element of an output, relative to max|ref|, had a
  median of 0.6-1.4%, a 99th percentile of 1.0-3.3% and a maximum of 7.1%: rare single
  elements at ~10x the error of the rest of their row, which failed about one export in a
  few hundred at the former 5e-2. 1e-1; a graph bound to another layer's weights errs by
  far more (tested).
Router outputs are tie-aware: the graph may pick a different expert only where the reference
probabilities of the two choices are within the tolerance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from step3_edge.checkpoint import CheckpointReader
from step3_edge.config import Step3Config
from step3_edge.errors import Step3EdgeError
from step3_edge.export.binding import WeightBinding, bind
from step3_edge.export.onnx_runner import BoundSession
from step3_edge.export.subgraphs import Instance, SubgraphDecl


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float

    def allowed(self, ref_max: float) -> float:
        return self.atol + self.rtol * ref_max


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(1e-5, 1e-4), "fp8": Tolerance(1e-5, 1e-4),
    "int8": Tolerance(1e-4, 1e-1), "int4": Tolerance(1e-4, 1e-1),
}
# a prefill-like and a decode-like case (vision: batch 1 and 2 views)
SHAPES = ({"batch": 2, "seq": 5, "past": 6, "tokens": 7},
          {"batch": 3, "seq": 1, "past": 9, "tokens": 1})

# vision: one case per graph, the batch the runtime sends it (one global view per image; the
# crops of an image together). A ViT pass is ~0.4 TFLOP per layer and view at 728 px, so each
# further case would cost more than the rest of the export at Step3's depth.
VISION_SHAPES = {"vision_global": ({"batch": 1},), "vision_crop": ({"batch": 2},)}


class SubgraphValidationError(Step3EdgeError):
    """An exported subgraph does not match the reference model within its tolerance."""


@dataclass
class Check:
    output: str
    max_abs: float
    ref_max: float
    allowed: float

    @property
    def rel(self) -> float:
        return self.max_abs / max(self.ref_max, 1e-30)

    @property
    def ok(self) -> bool:
        return bool(self.max_abs <= self.allowed)


@dataclass
class ValidationResult:
    subgraph: str
    precision: str
    tolerance: Tolerance
    checks: list[tuple[str, Check]]          # (instance, check), every output of every case

    @property
    def worst(self) -> tuple[str, Check]:
        return max(self.checks, key=lambda ic: ic[1].max_abs / max(ic[1].allowed, 1e-30))

    def to_dict(self) -> dict:
        inst, c = self.worst
        return {"max_abs": c.max_abs, "rel": c.rel, "output": c.output, "instance": inst,
                "allowed": c.allowed, "cases": len(self.checks), **asdict(self.tolerance)}


def validate_subgraph(name: str, decl: SubgraphDecl, cfg: Step3Config, model: Path | bytes,
                      bindings: list[WeightBinding], reader: CheckpointReader,
                      instances: list[Instance], precision: str, *,
                      gen: torch.Generator | None = None, threads: int | None = None
                      ) -> ValidationResult:
    """Run graph `name` for each instance on fresh random inputs (SHAPES) and compare every
    output with the reference; raise SubgraphValidationError naming the subgraph, instance,
    output and error when one exceeds its tolerance."""
    if gen is None:
        gen = torch.Generator()
        gen.seed()
    tol = TOLERANCES[precision]
    result = ValidationResult(name, precision, tol, [])
    for inst in instances:
        bound = bind(bindings, reader, cfg, inst)
        sess = BoundSession.create(model, bound, threads=threads, lean=True)
        ref = decl.reference(cfg, _SharedReads(reader, bindings, bound, inst), inst)
        del bound
        for dims in (SHAPES if decl.image_size is None else VISION_SHAPES[decl.kind]):
            x = decl.sample(cfg, dims, gen)
            got = sess.run({k: v.numpy() for k, v in x.items()})
            with torch.no_grad():
                want = {k: v.float().numpy() if v.is_floating_point() else v.numpy()
                        for k, v in ref(**x).items()}
            for check in _compare(got, want, tol, cfg):
                result.checks.append((str(inst), check))
                if not check.ok:
                    raise SubgraphValidationError(
                        f"subgraph {name} ({inst}, {dims}) output {check.output}: "
                        f"max |onnx - reference| = {check.max_abs:.3g} exceeds "
                        f"{check.allowed:.3g} (atol {tol.atol:g} + rtol {tol.rtol:g} x "
                        f"max |reference| {check.ref_max:.3g}, precision {precision})",
                        "this is an export or quantization bug: report it with the command "
                        "line; --no-validate writes the bundle anyway for inspection")
    return result


class _SharedReads:
    """The checkpoint reader, except that a float32 weight the session was bound with is
    served from the bound array (a view: transposed back for [in, out] linears), so the
    reference holds no second float32 copy of it: validating lm_head and the embedding at
    Step3's vocabulary (3.7 GB each in float32) then needs one copy, not two."""

    def __init__(self, reader: CheckpointReader, bindings: list[WeightBinding],
                 bound: dict, inst: Instance) -> None:
        self._reader = reader
        self._views: dict[tuple[str, int | None], torch.Tensor] = {}
        for b in bindings:
            if b.op in ("matmul", "none") and b.layout != "position":
                t = torch.from_numpy(bound[b.name].array)
                key = (b.tensor.format(layer=inst.layer), inst.expert if b.expert else None)
                self._views[key] = t.T if b.layout == "linear" else t

    def read(self, name: str, dtype: torch.dtype = torch.float32,
             expert: int | None = None) -> torch.Tensor:
        view = self._views.get((name, expert)) if dtype == torch.float32 else None
        return view if view is not None else self._reader.read(name, dtype, expert)

    def __getattr__(self, attr: str):
        return getattr(self._reader, attr)


def _compare(got: dict[str, np.ndarray], want: dict[str, np.ndarray], tol: Tolerance,
             cfg: Step3Config) -> list[Check]:
    checks = []
    for name, g in got.items():
        if name in ("topk_ids", "topk_weights"):
            continue
        w = want[name]
        if g.shape != w.shape:
            checks.append(Check(f"{name} (shape {list(g.shape)} != {list(w.shape)})",
                                float("inf"), 0.0, 0.0))
            continue
        ref_max = float(np.abs(w).max()) if w.size else 0.0
        err = float(np.abs(g.astype(np.float64) - w).max()) if w.size else 0.0
        checks.append(Check(name, err, ref_max, tol.allowed(ref_max)))
    if "topk_ids" in got:
        checks += _router_checks(got, want, tol, cfg.text_config.norm_expert_weight)
    return checks


def _router_checks(got: dict[str, np.ndarray], want: dict[str, np.ndarray], tol: Tolerance,
                   renorm: bool) -> list[Check]:
    """Tie-aware: the reference probabilities of the graph's chosen experts must equal the
    reference top-k probabilities (so only near-ties may flip), and the graph's weights must
    match the reference probabilities of the experts it chose, within the tolerance (the
    router's softmax amplifies the attention side's quantization error when the router is
    sharp: on the trained default model's int8 / int4 exports, at most 0.067 / 0.058 of the
    largest probability over 2,800-5,000 draws)."""
    k = got["topk_ids"].shape[-1]
    probs = want["router_probs"]                                          # [N, E]
    ids = got["topk_ids"].reshape(-1, k)                                  # [N, k]
    chosen = np.take_along_axis(probs, ids, axis=-1)                      # [N, k]
    top = -np.sort(-probs, axis=-1)[:, :k]                                # [N, k]
    picked = -np.sort(-chosen, axis=-1)
    allowed = tol.allowed(1.0)
    out = [Check("topk_ids", float(np.abs(picked - top).max()), 1.0, allowed)]
    expect = chosen / chosen.sum(-1, keepdims=True) if renorm else chosen
    err = float(np.abs(got["topk_weights"].reshape(-1, k) - expect).max())
    out.append(Check("topk_weights", err, float(expect.max()), tol.allowed(float(expect.max()))))
    return out
