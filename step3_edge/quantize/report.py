"""Quantization error report: per tensor, the relative Frobenius error ||w - w_q|| / ||w|| and
the max abs error against the dequantized source, summarised per scheme."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class ErrorAccumulator:
    """Streams one tensor's error over chunks (experts, row blocks) in float64 sums."""

    sq_err: float = 0.0
    sq_ref: float = 0.0
    max_abs: float = 0.0

    def add(self, ref: torch.Tensor, approx: torch.Tensor) -> None:
        ref = ref.float()
        d = approx.float() - ref                                         # same shape as ref
        if not d.numel():
            return
        # float32 norms (torch reduces pairwise), squared and summed across chunks in float64
        self.sq_err += float(torch.linalg.vector_norm(d)) ** 2
        self.sq_ref += float(torch.linalg.vector_norm(ref)) ** 2
        self.max_abs = max(self.max_abs, float(torch.linalg.vector_norm(d, ord=math.inf)))

    @property
    def rel_fro(self) -> float:
        if self.sq_ref == 0.0:
            return 0.0 if self.sq_err == 0.0 else math.inf
        return math.sqrt(self.sq_err / self.sq_ref)


@dataclass(frozen=True)
class TensorError:
    name: str
    scheme: str
    source_scheme: str
    shape: tuple[int, ...]
    source_bytes: int
    bytes: int
    rel_fro: float
    max_abs: float
    copied: bool  # stored parts copied unchanged (same scheme and dtypes as the source)
    sq_err: float = 0.0
    sq_ref: float = 0.0
    seconds: float = 0.0  # wall time spent converting this tensor


@dataclass
class QuantReport:
    """Per-tensor errors of one conversion, with a per-scheme summary."""

    target: str
    tensors: list[TensorError] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> list[dict[str, Any]]:
        """One row per output scheme: tensors, parameters, bytes (source -> output), pooled
        relative Frobenius error sqrt(sum err^2 / sum w^2), worst tensor, max abs error."""
        rows: dict[str, dict[str, Any]] = {}
        for t in self.tensors:
            r = rows.setdefault(t.scheme, {"scheme": t.scheme, "tensors": 0, "params": 0,
                                           "source_bytes": 0, "bytes": 0, "sq_err": 0.0,
                                           "sq_ref": 0.0, "worst_rel_fro": 0.0,
                                           "worst_tensor": "", "max_abs": 0.0})
            r["tensors"] += 1
            r["params"] += math.prod(t.shape)
            r["source_bytes"] += t.source_bytes
            r["bytes"] += t.bytes
            r["sq_err"] += t.sq_err
            r["sq_ref"] += t.sq_ref
            r["max_abs"] = max(r["max_abs"], t.max_abs)
            if t.rel_fro > r["worst_rel_fro"] or not r["worst_tensor"]:
                r["worst_rel_fro"], r["worst_tensor"] = t.rel_fro, t.name
        out = []
        for r in rows.values():
            sq_err, sq_ref = r.pop("sq_err"), r.pop("sq_ref")
            r["rel_fro"] = math.sqrt(sq_err / sq_ref) if sq_ref else 0.0
            out.append(r)
        return sorted(out, key=lambda r: -r["bytes"])

    def table(self) -> str:
        """The summary as a fixed-width text table."""
        head = (f"{'scheme':<17}{'tensors':>8}{'params':>13}{'src MB':>10}{'out MB':>10}"
                f"{'rel fro':>10}{'worst rel':>11}{'max abs':>11}  worst tensor")
        lines = [f"quantization error vs dequantized source (target {self.target})", head,
                 "-" * len(head)]
        for r in self.summary():
            lines.append(f"{r['scheme']:<17}{r['tensors']:>8}{r['params']:>13,}"
                         f"{r['source_bytes'] / 1e6:>10.1f}{r['bytes'] / 1e6:>10.1f}"
                         f"{r['rel_fro']:>10.2e}{r['worst_rel_fro']:>11.2e}"
                         f"{r['max_abs']:>11.2e}  {r['worst_tensor']}")
        src = sum(t.source_bytes for t in self.tensors)
        dst = sum(t.bytes for t in self.tensors)
        lines.append(f"total {src / 1e9:.3f} GB -> {dst / 1e9:.3f} GB in {self.seconds:.1f} s")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        tensors = []
        for t in self.tensors:
            d = asdict(t)
            d["shape"] = list(t.shape)
            del d["sq_err"], d["sq_ref"]
            tensors.append(d)
        return {"target": self.target, "seconds": self.seconds, "summary": self.summary(),
                "tensors": tensors}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")
