"""Real scale: each offline stage and the runtime load on real-width slices of Step3, and the
projection to the real model (61 layers, 48 experts) from the marginal costs measured here.

Every slice has Step3's real widths (hidden 7168, 64 heads of 256, experts of 5120, vocabulary
128,815, ViT width 1792); only depth and expert count shrink (`step3-edge synth --preset full
--layers L --experts E`). For each slice (L decoder layers, the first dense, E experts per MoE
layer) the stages run as the CLI runs them, each in its own process:

  synth     step3-edge synth --preset full --layers L --experts E --format block-fp8
  quantize  step3-edge quantize --target cpu (int8 experts: the cpu target's recipe)
  export    step3-edge export --target cpu (quantize + weights + ONNX graphs + validation)
  load      Step3Runtime.load of the bundle, then greedy decode at batch 1

For each: wall time and peak anonymous memory (RssAnon of the process tree, sampled every
50 ms: page cache and file-backed mmaps excluded), against the goal of 2x the largest stored
tensor + 2 GB. The load row (a KV pool of `KV_TOKENS`) also has the load time against the time
to read the bundle's files, the anonymous memory the load added, decode tokens/s against the
roofline (weight bytes a step reads / copy bandwidth measured in the same process), and the
host bytes the plan places (weights + KV pool) against the process's RSS once every page of
the bundle it maps and of the KV pool has been touched (what a server that has run every
weight holds; file pages included).

Costs (`stage_costs`): a linear model per stage fitted to the slices: per routed expert from
E=8 vs E=16 at L=2, per MoE layer without its experts from L=2 vs L=3 at E=8, a dense layer
counted as that plus its 18432-wide MLP (3.6 experts' bytes) less the shared expert (1), and
per ViT layer from a `2x8vV` slice when one is measured (else 0: the ViT stays at 2 of its 63
layers). They are written to `step3_edge/assets/scale-costs.json`, from which
`step3_edge.projection` projects the real model (56 MoE layers of 48 experts, 5 dense, 63 ViT
layers) for this script and for `step3-edge plan`.

    python bench/bench_scale.py [--work DIR] [--slices 2x8,3x8,2x16] [--clean] [--merge JSON]
                                [--out FILE]

Needs ~40 GB of disk for the three default slices and their bundles (removed as it goes with
--clean) and ~1 hour on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from hostinfo import host, results_path


ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "step3_edge.cli"]
KV_TOKENS = 65536     # the load row's KV pool: a fixed size, written in full before RSS is read


def rss_anon(pid: int) -> int:
    """Anonymous resident bytes of one process (not page cache, not file-backed maps)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run `cmd`; wall seconds and the peak anonymous memory of its process tree."""
    peak = 0
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            p = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    tree = [p, *p.children(recursive=True)]
                except psutil.NoSuchProcess:
                    break
                peak = max(peak, sum(rss_anon(q.pid) for q in tree))
                time.sleep(0.05)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        rc = proc.wait()
        done.set()
        th.join()
        seconds = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); see {log}:\n"
                         + log.read_text()[-3000:])
    return {"seconds": seconds, "peak_anon_GB": peak / 1e9}


def largest_stored_tensor(folder: Path) -> int:
    from step3_edge.checkpoint import CheckpointReader

    r = CheckpointReader(folder)
    return max(r.stored_dtype(n).itemsize * math.prod(r.stored_shape(n))
               for n in r.stored_names())


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


LOAD_CHILD = r"""
import ctypes, json, os, sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path(sys.argv[2]) / "bench"))
from bench_cpu import read_seconds
from bench_runtime import bandwidth, bytes_per_step, decode_rate_runtime
from bench_scale import rss_anon, folder_bytes
from step3_edge.runtime import Step3Runtime


def rss() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            return int(line.split()[1]) * 1024
    return 0


def touch_bundle_maps(root: Path) -> int:
    # one read per page of every map of a bundle file: what a server that has run every
    # weight (vision included) holds resident
    n = 0
    for line in Path("/proc/self/maps").read_text().splitlines():
        f = line.split()
        if len(f) >= 6 and f[5].startswith(str(root)) and f[1][0] == "r":
            a, b = (int(x, 16) for x in f[0].split("-"))
            np.frombuffer((ctypes.c_uint8 * (b - a)).from_address(a), np.uint8)[::4096].max()
            n += b - a
    return n


bundle = Path(sys.argv[1]).resolve()
read = read_seconds(bundle)
a0 = rss_anon(os.getpid())
t0 = time.perf_counter()
rt = Step3Runtime.load(bundle, device="cpu", kv_tokens=int(sys.argv[3]))
load = time.perf_counter() - t0
anon = rss_anon(os.getpid()) - a0
p = rt.plan
kv = rt.engine.attn.kv.kv
weights = sum(d.weights_total for d in p.device_plans) + p.cold_bytes
row = decode_rate_runtime(rt, 1, 16)
bw = bandwidth(reps=2)
row["bytes_per_step"] = bytes_per_step(rt, row["experts_per_step"], 1, 32 + 8)
row["fraction_of_roofline"] = row["tokens_per_s"] / (bw / row["bytes_per_step"])
mapped = touch_bundle_maps(bundle)
kv.fill_(0)                                   # every KV page written, as a full pool is
print("RESULT " + json.dumps({"read_files_s": read, "load_s": load, "load_anon_GB": anon / 1e9,
                              "bundle_GB": folder_bytes(bundle) / 1e9,
                              "planned_weights_GB": weights / 1e9,
                              "kv_pool_GB": kv.nbytes / 1e9, "mapped_bundle_GB": mapped / 1e9,
                              "host_planned_GB": (weights + kv.nbytes) / 1e9,
                              "rss_all_touched_GB": rss() / 1e9,
                              "decode": row, "bandwidth_GBps": bw / 1e9}))
"""


def load_row(bundle: Path, log: Path) -> dict:
    cmd = [sys.executable, "-c", LOAD_CHILD, str(bundle), str(ROOT), str(KV_TOKENS)]
    m = run_measured(cmd, log)
    res = json.loads(next(line for line in log.read_text().splitlines()
                          if line.startswith("RESULT "))[7:])
    return {**m, **res}


def measure_slice(work: Path, tag: str, clean: bool) -> dict:
    """One slice, tag LAYERSxEXPERTS[vVISION_LAYERS] (vision layers default 2)."""
    m = re.fullmatch(r"(\d+)x(\d+)(?:v(\d+))?", tag)
    if not m:
        raise SystemExit(f"slice {tag!r}: expected LAYERSxEXPERTS[vVISION], e.g. 2x8 or 2x8v4")
    layers, experts, vision = int(m[1]), int(m[2]), int(m[3] or 2)
    ck, q, b = work / f"ck-{tag}", work / f"q-{tag}", work / f"bundle-{tag}"
    row: dict = {"layers": layers, "experts": experts, "vision_layers": vision}
    row["synth"] = run_measured(
        CLI + ["synth", "--preset", "full", "--layers", str(layers), "--experts", str(experts),
               "--vision-layers", str(vision), "--format", "block-fp8", "--out", str(ck),
               "--force", "--quiet"], work / f"synth-{tag}.log")
    row["checkpoint_GB"] = folder_bytes(ck) / 1e9
    row["largest_tensor_GB"] = largest_stored_tensor(ck) / 1e9
    row["quantize"] = run_measured(
        CLI + ["quantize", "--model", str(ck), "--target", "cpu", "--out", str(q), "--force",
               "--quiet"], work / f"quantize-{tag}.log")
    shutil.rmtree(q)
    row["export"] = run_measured(
        CLI + ["export", "--model", str(ck), "--target", "cpu", "--out", str(b), "--force",
               "--quiet"], work / f"export-{tag}.log")
    row["load"] = load_row(b, work / f"load-{tag}.log")
    goal = 2 * row["largest_tensor_GB"] + 2
    for stage in ("synth", "quantize", "export"):
        row[stage]["goal_GB"] = goal
        row[stage]["within_goal"] = row[stage]["peak_anon_GB"] <= goal
    if clean:
        shutil.rmtree(ck)
        shutil.rmtree(b)
    return row


def stage_costs(rows: dict[str, dict]) -> dict:
    """Per stage, the linear model fitted to the slices: fixed seconds, seconds per MoE layer
    without its routed experts (attention, router, shared expert), per routed expert, per
    dense layer (a MoE layer's part plus the 18432-wide MLP, 3.6 experts' bytes, less the
    shared expert's 1), and per ViT layer (from a `v` slice, when measured)."""
    base, deeper, wider = rows.get("2x8"), rows.get("3x8"), rows.get("2x16")
    if not (base and deeper and wider):
        return {}
    out = {}
    for stage in ("synth", "quantize", "export"):
        t2, t3, t16 = (r[stage]["seconds"] for r in (base, deeper, wider))
        expert = (t16 - t2) / 8
        layer = t3 - t2 - 8 * expert
        vit = 0.0
        for tag, r in rows.items():
            if "v" in tag and tag.split("v")[0] == "2x8":
                vit = (r[stage]["seconds"] - t2) / (r["vision_layers"] - 2)
        # a marginal cost below 0 is the noise of a term near 0 (e.g. quantize's per MoE
        # layer, whose time is in its experts): counted as 0, the fixed part keeping t2
        layer, expert, vit = max(layer, 0.0), max(expert, 0.0), max(vit, 0.0)
        fixed = t2 - layer - 8 * expert - (layer + 2.6 * expert)      # 1 MoE + 1 dense layer
        out[stage] = {"fixed_s": fixed - 2 * vit, "per_moe_layer_s": layer,
                      "per_expert_s": expert, "per_dense_layer_s": layer + 2.6 * expert,
                      "per_vit_layer_s": vit,
                      "peak_anon_GB": [r[stage]["peak_anon_GB"] for r in (base, deeper, wider)]}
    loads = [r["load"] for r in rows.values()]
    out["load"] = {"s_per_bundle_GB": max(x["load_s"] / x["bundle_GB"] for x in loads),
                   "read_s_per_GB": max(x["read_files_s"] / x["bundle_GB"] for x in loads)}
    return out


def project(costs: dict) -> dict:
    """Seconds of each stage for the real Step3 (56 MoE layers of 48 experts, 5 dense
    layers, 63 ViT layers) on the host the costs were measured on."""
    from step3_edge.config import Step3Config
    from step3_edge.projection import project_stages

    return project_stages(Step3Config.preset("full"), costs) if costs else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/step3-edge-scale"))
    ap.add_argument("--slices", default="2x8,3x8,2x16",
                    help="LAYERSxEXPERTS, comma-separated")
    ap.add_argument("--clean", action="store_true", help="remove each slice once measured")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--merge", type=Path, help="a results file whose slices are kept (measured "
                    "earlier on this host)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    res = {"host": host(), "slices": {}}
    if args.merge and args.merge.is_file():
        res["slices"].update(json.loads(args.merge.read_text())["slices"])
    for s in filter(None, args.slices.split(",")):
        res["slices"][s] = measure_slice(args.work, s, args.clean)
        print(json.dumps({s: res["slices"][s]}, indent=1), flush=True)
    res["costs"] = stage_costs(res["slices"])
    res["projection"] = project(res["costs"])
    print(json.dumps(res["projection"], indent=1))
    if res["costs"]:
        costs = ROOT / "step3_edge" / "assets" / "scale-costs.json"
        costs.write_text(json.dumps({"host": res["host"], **res["costs"]}, indent=1) + "\n")
        print(f"wrote {costs}")
    out = args.out or results_path("scale", res["host"])
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
