"""The machine a benchmark ran on, recorded in every results file and in its name.

`host()` is the CPU model and the SIMD flags that decide the runtime's kernels (and the GPU
where one is used); `results_path(what)` is `bench/results/<what>-<cpu>-<isa>.json`, so that
figures from different machines never overwrite each other and always say where they were
measured.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import psutil
import torch

from step3_edge.runtime import native
from step3_edge.runtime.backends import resolve_dtype

RESULTS = Path(__file__).resolve().parent / "results"
SIMD = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
        "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


def cpu_model() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return model.group(1).strip() if model else (platform.processor() or platform.machine())


def host() -> dict:
    """CPU model, flags, cores, memory, the native kernels' build and the compute dtype the
    runtime picks here, torch's version; the GPU when CUDA is available."""
    dtype, why = resolve_dtype(None, "cpu")
    out = {"cpu": cpu_model(), "machine": platform.machine(), "cores": os.cpu_count(),
           "threads": torch.get_num_threads(), "memory_GB": psutil.virtual_memory().total / 1e9,
           "simd_flags": [f for f in SIMD if f in native.cpu_flags()],
           "native_isa": native.kernel().isa if native.kernel() else None,
           "native_unavailable": native.unavailable_reason(),
           "auto_dtype": str(dtype).removeprefix("torch."), "auto_dtype_reason": why,
           "torch": torch.__version__}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def slug(h: dict) -> str:
    """The machine in a file name: the GPU where one was used, else the CPU model and the
    instruction set the native kernels were built for (or the widest SIMD flag)."""
    name = h.get("gpu") or "-".join([h["cpu"], h.get("native_isa") or
                                     (h["simd_flags"] or ["no-simd"])[-1]])
    return re.sub(r"[^a-z0-9_]+", "-", name.lower()).strip("-")


def results_path(what: str, h: dict | None = None, suffix: str = ".json") -> Path:
    return RESULTS / f"{what}-{slug(h or host())}{suffix}"
