"""`step3-edge inspect BUNDLE`: a readable summary of a bundle, then every artifact's sha256
and the manifest's own content hash checked (exit status 2 on any mismatch). The manifest's
schema, paths and artifact sizes are checked first in any case (docs/errors.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from step3_edge.manifest import SCHEMA_VERSION, Manifest, load_manifest


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the `inspect` options on `p`."""
    p.add_argument("bundle", help="bundle folder written by `step3-edge export`")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 checks (schema, paths and sizes are still checked)")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON")


def summary(m: Manifest) -> dict:
    """The facts `inspect` prints, as a dict."""
    by_kind: dict[str, list[int]] = {}
    for a in m.artifacts:
        by_kind.setdefault(a.kind, [0, 0])
        by_kind[a.kind][0] += 1
        by_kind[a.kind][1] += a.bytes
    t = m.config.text_config
    return {
        "bundle": str(m.bundle), "schema_version": SCHEMA_VERSION,
        "created": m.created, "step3_edge_version": m.step3_edge_version,
        "source": m.source.to_dict(), "target": m.target.name,
        "model": {k: getattr(t, k) for k in ("hidden_size", "num_hidden_layers",
                                             "moe_num_experts", "vocab_size")},
        "devices": [{k: v for k, v in dev.to_dict().items() if k != "reads"}
                    for dev in m.devices],
        "cold_experts": len(m.plan.cold_experts),
        "weights": {"schemes": m.weights.schemes, "total_bytes": m.weights.total_bytes},
        "subgraphs": {n: {"kind": s.kind, "precision": s.precision,
                          "instances": len(s.instances), "devices": list(s.devices),
                          "validation": s.validation.to_dict() if s.validation else None}
                      for n, s in m.subgraphs.items()},
        "engines": m.engines.to_dict(),
        "artifacts": {k: {"files": n, "bytes": b} for k, (n, b) in sorted(by_kind.items())},
    }


def run(args: argparse.Namespace) -> int:
    m = load_manifest(Path(args.bundle))          # refuses paths that leave the bundle
    s = summary(m)
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        _print(s)
    if not args.no_verify:
        checked = m.verify()                       # BundleError (exit 2) on any mismatch
        print(f"verified {len(checked)} artifacts: sizes and sha256 match the manifest, and "
              "the manifest matches its content hash")
    return 0


def _print(s: dict) -> None:
    src = s["source"] or {}
    print(f"bundle {s['bundle']} (schema {s['schema_version']}, step3-edge "
          f"{s['step3_edge_version']}, created {s['created']})")
    print(f"source {src.get('path')} ({src.get('format')}); target {s['target']}")
    mdl = s["model"]
    print(f"model: hidden {mdl['hidden_size']}, {mdl['num_hidden_layers']} layers, "
          f"{mdl['moe_num_experts']} experts, vocab {mdl['vocab_size']}")
    w = s["weights"]
    schemes = ", ".join(f"{k} x{v}" for k, v in (w.get("schemes") or {}).items())
    print(f"weights: {(w.get('total_bytes') or 0) / 1e6:.1f} MB ({schemes})")
    print("devices:")
    for d in s["devices"]:
        extra = f", {d['cold_experts']} cold experts" if "cold_experts" in d else \
            f", {d['hot_experts']} hot experts"
        print(f"  {str(d['index']):>4} {d['role']:<12} runs {', '.join(d['subgraphs']) or '-'}"
              f"{extra}")
    print("subgraphs:")
    for n, g in s["subgraphs"].items():
        v = g["validation"]
        val = f"validated: max err {v['rel']:.1e} of max |ref| (allowed rtol {v['rtol']:g})" \
            if v else "not validated"
        print(f"  {n:<14} {g['precision']:<5} {g['instances']:>5} instance(s)  {val}")
    trt = (s.get("engines") or {}).get("trt") or {}
    print(f"TensorRT: {'built' if trt.get('built') else 'not built'}"
          f"{' (' + trt['reason'] + ')' if trt.get('reason') else ''}")
    arts = ", ".join(f"{k} {v['files']} ({v['bytes'] / 1e6:.1f} MB)"
                     for k, v in s["artifacts"].items())
    print(f"artifacts: {arts}")
