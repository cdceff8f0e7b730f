"""`step3-edge export`: checkpoint -> per-device engine bundle for a target."""

from __future__ import annotations

import argparse
import time

from step3_edge.targets import TARGETS, get_target


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the `export` options on `p`."""
    p.add_argument("--model", required=True, help="checkpoint folder (bf16, block-fp8 or "
                   "already quantized; real or synthetic)")
    p.add_argument("--target", required=True, help=f"card profile: {', '.join(TARGETS)}")
    p.add_argument("--devices", type=int, default=None,
                   help="number of cards (default: 1 for cpu, the target's cards per server)")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--cpu-mem", default=None, help="CPU memory for cold experts (cpu target: "
                   "for everything), e.g. 512GiB (default: what is available now)")
    p.add_argument("--scheme", help="weight scheme of the FFN linears (default: the target's; "
                   "bf16 keeps the weights unquantized -> fp32 ONNX graphs)")
    p.add_argument("--attn-scheme", help="weight scheme of the attention linears (default: "
                   "the same as --scheme; bf16 keeps them unquantized)")
    p.add_argument("--kv-tokens", type=int, help="KV cache budget in tokens for the plan "
                   "(default: one max_context sequence, and as many more as fit)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing bundle (only one export wrote: never the source, "
                   "a folder of other files, a file or the current folder)")
    p.add_argument("--no-validate", action="store_true",
                   help="skip checking each subgraph against the reference model")
    p.add_argument("--validate-all", action="store_true",
                   help="validate every layer and expert (default: first and last of each)")
    p.add_argument("--no-onnx", action="store_true", help="weights, plan and manifest only")
    p.add_argument("--no-trt", action="store_true", help="do not build TensorRT engines")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from step3_edge.export.bundle import export_bundle
    from step3_edge.manifest import load_manifest
    from step3_edge.runtime.planner import parse_size

    tgt = get_target(args.target)
    devices = tgt.device_count(args.devices)
    t0 = time.perf_counter()
    out = export_bundle(args.model, tgt, devices, args.out,
                        cpu_mem_bytes=parse_size(args.cpu_mem) if args.cpu_mem else None,
                        scheme=args.scheme, attn_scheme=args.attn_scheme,
                        kv_tokens=args.kv_tokens, onnx=not args.no_onnx,
                        validate=not args.no_validate, trt=not args.no_trt,
                        overwrite=args.force, progress=not args.quiet,
                        validate_all=args.validate_all)
    m = load_manifest(out)
    size = sum(a.bytes for a in m.artifacts)
    print(f"wrote {out}: target {tgt.name}, {devices} device(s), {len(m.artifacts)} artifacts, "
          f"{size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s")
    for name, sg in m.subgraphs.items():
        v = sg.validation
        check = (f"max err {v.max_abs:.2e} ({v.rel:.1e} of max |ref|, allowed "
                 f"{v.allowed:.2e}) on {v.output}" if v else "not validated")
        print(f"  {name:<14} {sg.precision:<5} {len(sg.instances):>5} instance(s)  {check}")
    return 0
