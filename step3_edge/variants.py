"""The accuracy gate through every deployment variant (`step3-edge eval --variants`).

    step3-edge eval --variants [--model CKPT] [--n 500] [--only a,b] [--work DIR] [--rebuild]
                    [--runtime-dtype bfloat16|float32] [--json out.json]

For one checkpoint (default: the embedded default model) this exports the bundles the
variants need with the export stage's public `export_bundle` (into a work folder keyed by the
checkpoint's fingerprint; a complete bundle there is reused), then answers the same held-out
examples with every variant and scores them exactly as `step3-edge eval` does:

    reference      the reference PyTorch model on the checkpoint (float32)
    int8-ort       `export --target cpu` (int8 in 128-blocks), ONNX Runtime on the CPU
    int4-ort       `export --target cpu --scheme int4_block`, ONNX Runtime on the CPU
    fp8            `export --target l20` (fp8 per channel), the torch runtime, all experts
                   resident
    fp8-r25-cpu    the fp8 bundle, 25% of the routed experts resident, misses computed on
                   the CPU (`resident=0.25, miss="cpu"`)
    fp8-r25-copy   the fp8 bundle, 25% resident, misses copied into the LFU expert cache
                   (`resident=0.25, miss="copy"`)

Each row gives accuracy overall and per question type, the difference from the reference in
points, how many answers are identical to the reference's and how many examples changed from
right to wrong or back ("flips"), the bundle size and the build / load / eval seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from step3_edge.errors import ConfigError
from step3_edge.tasks import EVAL_SEED, QUESTION_TYPES, make_examples


@dataclass(frozen=True)
class BundleSpec:
    """One bundle to export: `export_bundle(ckpt, target, 1, out, scheme=scheme)`."""

    target: str
    scheme: str | None
    description: str


BUNDLES: dict[str, BundleSpec] = {
    "cpu-int8": BundleSpec("cpu", None, "target cpu: int8 128-blocks (MatMulNBits)"),
    "cpu-int4": BundleSpec("cpu", "int4_block", "target cpu, --scheme int4_block"),
    "l20-fp8": BundleSpec("l20", None, "target l20: fp8 per channel"),
}

_ORT = {"device": "cpu", "dtype": "float32", "backend": "onnxruntime"}


@dataclass(frozen=True)
class Variant:
    """A deployment variant: a bundle (None: the checkpoint itself, reference model) and the
    `Step3Runtime.load` overrides it runs with."""

    name: str
    description: str
    bundle: str | None
    load: dict[str, Any] = field(default_factory=dict)

    @property
    def uses_torch_runtime(self) -> bool:
        return self.bundle is not None and self.load.get("backend") == "torch"


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("reference", "reference PyTorch model on the checkpoint", None),
    Variant("int8-ort", "cpu bundle, int8 blocks, ONNX Runtime", "cpu-int8", _ORT),
    Variant("int4-ort", "cpu bundle, int4 blocks, ONNX Runtime", "cpu-int4", _ORT),
    Variant("fp8", "l20 bundle, fp8, torch runtime, all experts resident", "l20-fp8",
            {"backend": "torch"}),
    Variant("fp8-r25-cpu", "l20 bundle, fp8, 25% experts resident, misses on CPU", "l20-fp8",
            {"backend": "torch", "resident": 0.25, "cache": "lru", "miss": "cpu"}),
    Variant("fp8-r25-copy", "l20 bundle, fp8, 25% experts resident, misses copied (LFU)",
            "l20-fp8", {"backend": "torch", "resident": 0.25, "miss": "copy"}),
)}


def parse_only(text: str | None) -> list[str]:
    """'a,b' -> the variant names in VARIANTS order, the reference always first."""
    if not text:
        return list(VARIANTS)
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in VARIANTS]
    if unknown or not names:
        raise ConfigError(f"unknown variant(s) {unknown or text!r}",
                          f"--only takes a comma list of: {', '.join(VARIANTS)}")
    return [v for v in VARIANTS if v == "reference" or v in names]


def fingerprint(ckpt: Path) -> str:
    """A short hash of the checkpoint's config, index and weight files (contents up to
    256 MiB per file, else size plus the first and last 16 MiB)."""
    h = hashlib.sha256()
    files = sorted(f for f in ckpt.iterdir() if f.is_file() and (
        f.suffix == ".safetensors" or f.name in ("config.json", "model.safetensors.index.json",
                                                  "tokenizer.json", "tokenizer_config.json")))
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= 256 << 20:
                while block := fh.read(8 << 20):
                    h.update(block)
            else:
                h.update(fh.read(16 << 20))
                fh.seek(size - (16 << 20))
                h.update(fh.read())
    return h.hexdigest()[:16]


def default_work_dir(ckpt: Path) -> Path:
    from step3_edge.defaults import cache_dir

    return cache_dir() / "variants" / f"{ckpt.resolve().name}-{fingerprint(ckpt)}"


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def build_bundle(ckpt: Path, key: str, work: Path, rebuild: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Export bundle `key` of BUNDLES from `ckpt` into `work/key` unless a complete one is
    there. -> {"path", "bytes", "build_s", "reused"}."""
    from step3_edge.errors import BundleError
    from step3_edge.export.bundle import export_bundle
    from step3_edge.manifest import load_manifest

    spec, out = BUNDLES[key], work / key
    if not rebuild and (out / "manifest.json").is_file():
        try:
            m = load_manifest(out)
            return {"path": str(out), "bytes": sum(a.bytes for a in m.artifacts),
                    "build_s": m.export.seconds, "reused": True}
        except BundleError:
            pass                                  # damaged: export it again
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    export_bundle(ckpt, spec.target, 1, out, scheme=spec.scheme, overwrite=True,
                  progress=progress)
    m = load_manifest(out)
    return {"path": str(out), "bytes": sum(a.bytes for a in m.artifacts),
            "build_s": round(time.perf_counter() - t0, 2), "reused": False}


@dataclass
class VariantsReport:
    """Per-variant evaluation rows on one set of held-out examples."""

    model: str
    seed: int
    n: int
    work: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    def row(self, name: str) -> dict[str, Any]:
        return next(r for r in self.rows if r["variant"] == name)

    def table(self) -> str:
        """Accuracy (overall and per type, %), delta vs the reference in points, agreement,
        size and seconds, one line per variant."""
        types = [q for q in QUESTION_TYPES if q in self.rows[0]["per_type"]]
        head = (f"{'variant':<13} {'all %':>6} {'Δ pts':>6} "
                + " ".join(f"{q[:6]:>6}" for q in types)
                + f" {'same':>5} {'flips':>5} {'MB':>6} {'build s':>8} {'eval s':>6}")
        lines = [head]
        for r in self.rows:
            pt = r["per_type"]
            lines.append(
                f"{r['variant']:<13} {100 * pt['all']['accuracy']:>6.1f} "
                f"{r['delta_points']:>+6.1f} "
                + " ".join(f"{100 * pt[q]['accuracy']:>6.1f}" for q in types)
                + f" {r['same_answers']:>5} {r['flips']:>5} {r['bytes'] / 1e6:>6.2f} "
                f"{_num(r['build_s']) + ('*' if r['reused'] else ' '):>8} {r['eval_s']:>6.1f}")
        if any(r["reused"] for r in self.rows):
            lines.append(f"* bundle reused from {self.work} (seconds of its export)")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "seed": self.seed, "n": self.n, "work": self.work,
                "variants": {v.name: {"description": v.description, "bundle": v.bundle,
                                      "bundle_export": _bundle_desc(v.bundle),
                                      "load": v.load} for v in VARIANTS.values()
                             if any(r["variant"] == v.name for r in self.rows)},
                "rows": self.rows}


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _bundle_desc(key: str | None) -> str | None:
    return None if key is None else BUNDLES[key].description


def run_variants(ckpt: str | Path, n: int, *, seed: int = EVAL_SEED,
                 only: Sequence[str] | None = None, work: str | Path | None = None,
                 rebuild: bool = False, runtime_dtype: str | None = None,
                 device: str | None = None, reference_dtype: str = "float32",
                 max_new_tokens: int | None = None, types: tuple[str, ...] = QUESTION_TYPES,
                 progress: bool = True) -> VariantsReport:
    """Build the bundles `only` (default: all VARIANTS) need from checkpoint `ckpt` and
    evaluate every variant on the first `n` held-out examples of `seed`.

    `runtime_dtype` / `device` apply to the torch-runtime variants (default: the runtime's
    own, bfloat16 compute on CUDA when present, else the CPU); the ONNX Runtime variants
    always run the CPU graphs in float32; the reference runs in `reference_dtype`.
    `max_new_tokens` caps each answer (default: evaluate.MAX_NEW_TOKENS); `types` restricts
    the examples to those question types (in rotation)."""
    import torch

    from step3_edge.evaluate import MAX_NEW_TOKENS, ReferenceAnswerer, RuntimeAnswerer, evaluate

    ckpt = Path(ckpt)
    if (ckpt / "manifest.json").is_file() or not (ckpt / "config.json").is_file():
        what = ("it is a bundle (manifest.json); the variants start from the checkpoint it "
                "was exported from") if (ckpt / "manifest.json").is_file() else "no config.json"
        raise ConfigError(f"{ckpt} is not a checkpoint folder: {what}",
                          "pass --model CKPT (a checkpoint folder), or nothing for the "
                          "embedded default model")
    if n < 1:
        raise ConfigError(f"n is {n}", "pass a positive number of examples")
    for what, dt in (("runtime", runtime_dtype), ("reference", reference_dtype)):
        if dt not in (None, "bfloat16", "float32"):
            raise ConfigError(f"{what} dtype {dt!r}", "use bfloat16 or float32")
    names = list(only) if only else list(VARIANTS)
    unknown = [s for s in names if s not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}", f"choose from {', '.join(VARIANTS)}")
    if "reference" not in names:
        names.insert(0, "reference")
    work = Path(work) if work else default_work_dir(ckpt)
    max_new = max_new_tokens or MAX_NEW_TOKENS
    examples = make_examples(seed, n, types=tuple(types))
    report = VariantsReport(str(ckpt), seed, n, str(work))

    keys = list(dict.fromkeys(VARIANTS[v].bundle for v in names if VARIANTS[v].bundle))
    bundles = {}
    for key in tqdm(keys, desc="bundles", unit="bundle", disable=not progress):
        bundles[key] = build_bundle(ckpt, key, work, rebuild, progress)

    ref_records: list[dict[str, Any]] = []
    for name in tqdm(names, desc="variants", unit="variant", disable=not progress):
        v = VARIANTS[name]
        t0 = time.perf_counter()
        stats: dict[str, Any] = {}
        if v.bundle is None:
            answerer: Any = ReferenceAnswerer(ckpt, getattr(torch, reference_dtype), max_new)
            size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
            build_s, reused, path = None, None, str(ckpt)
        else:
            load = dict(v.load)
            if v.uses_torch_runtime:
                load.update({k: x for k, x in (("dtype", runtime_dtype), ("device", device))
                             if x is not None})
            answerer = RuntimeAnswerer(bundles[v.bundle]["path"], max_new, **load)
            b = bundles[v.bundle]
            size, build_s, reused, path = b["bytes"], b["build_s"], b["reused"], b["path"]
        load_s = time.perf_counter() - t0
        try:
            rep = evaluate(answerer, examples, name, progress=progress)
            if v.bundle is not None:
                snap = answerer.runtime.stats()
                stats = {"backend": snap["backend"].get("backend"),
                         "dtype": snap["backend"].get("dtype"),
                         "device": snap["backend"].get("device"),
                         "experts": {k: snap["experts"].get(k) for k in (
                             "resident", "policy", "miss", "accesses", "hit_rate",
                             "cpu_computed", "copied", "bytes_copied")}}
        finally:
            if v.bundle is not None:
                answerer.runtime.close()
        if v.bundle is None:
            ref_records = rep.records
            stats = {"backend": "reference", "dtype": reference_dtype, "device": "cpu"}
        report.rows.append(_row(v, rep, ref_records, path, size, build_s, reused, load_s,
                                stats))
    return report


def _row(v: Variant, rep: Any, ref: list[dict[str, Any]], path: str, size: int,
         build_s: float | None, reused: bool | None, load_s: float,
         stats: dict[str, Any]) -> dict[str, Any]:
    per_type = rep.per_type()
    ref_acc = sum(r["correct"] for r in ref) / len(ref)
    differ = [(a, b) for a, b in zip(rep.records, ref) if a["got"] != b["got"]]
    return {
        "variant": v.name, "description": v.description, "path": path,
        "per_type": per_type, "correct": per_type["all"]["correct"],
        "delta_points": round(100 * (per_type["all"]["accuracy"] - ref_acc), 2),
        "same_answers": len(rep.records) - len(differ),
        "flips": sum(a["correct"] != b["correct"] for a, b in differ),
        "bytes": size, "build_s": build_s, "reused": reused,
        "load_s": round(load_s, 2), "eval_s": round(rep.seconds, 2), **stats,
        "differences": [{"index": a["index"], "qtype": a["qtype"], "expected": a["expected"],
                         "reference": b["got"], "got": a["got"], "correct": a["correct"],
                         "reference_correct": b["correct"]} for a, b in differ],
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `--variants` options of `step3-edge eval` (the rest are eval's own)."""
    g = p.add_argument_group("deployment variants (--variants)")
    g.add_argument("--variants", action="store_true",
                   help="export the cpu int8 / int4 and l20 fp8 bundles and evaluate every "
                   "variant on the same examples (" + ", ".join(VARIANTS) + ")")
    g.add_argument("--only", help="comma list of variants (the reference always runs; "
                   "default: every variant)")
    g.add_argument("--work", type=Path, help="folder for the bundles (default: the cache, "
                   "keyed by the checkpoint's fingerprint; complete bundles are reused)")
    g.add_argument("--rebuild", action="store_true", help="export the bundles again")
    g.add_argument("--runtime-dtype", choices=["bfloat16", "float32"],
                   help="compute dtype of the torch-runtime variants (default: the "
                   "runtime's, bfloat16)")
    g.add_argument("--device", help="torch device of the torch-runtime variants "
                   "(default: CUDA when present, else cpu)")


def run(args: argparse.Namespace) -> int:
    from step3_edge.defaults import default_model

    folder = Path(args.model) if args.model else default_model()
    interactive = sys.stderr.isatty()
    report = run_variants(folder, args.n, seed=args.seed, only=parse_only(args.only),
                          work=args.work, rebuild=args.rebuild,
                          runtime_dtype=args.runtime_dtype, device=args.device,
                          reference_dtype=args.dtype, progress=interactive)
    print(f"model {folder}  held-out seed {args.seed}  n={args.n}  bundles in {report.work}")
    print(report.table())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0
