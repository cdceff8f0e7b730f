"""Start-up rates (`Bandwidths`, `measure_bandwidths`) and the cost model that turns them into
seconds (`CostModel`): what the expert store asks on a miss (compute the expert on the CPU or
copy it to the device) and what decides the stacked experts' path (`stacked_experts.py`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# seconds the start-up probe gives each rate it times, beyond a first call (`_timed`)
PROBE_BUDGET_S = 0.25


@dataclass(frozen=True)
class Bandwidths:
    """Bytes/s and FLOP/s measured at start-up (or given); they feed `CostModel`."""

    host_to_device: float   # pinned CPU memory -> device (CPU-only: a memcpy)
    host_memory: float      # CPU memory traffic of a large copy (read + write)
    device_memory: float    # device memory traffic of a large copy (read + write)
    host_flops: float       # a CPU GEMM in the compute dtype
    device_flops: float     # the same on the device
    measured: bool = True
    # fixed host seconds per missed expert besides bytes and FLOPs (launches, Python, making
    # the device copy's modules): measured on an H100 machine's host for mini's 0.8 MB expert
    # (bench/results/runtime_cuda-nvidia-h100-80gb-hbm3.json: CPU 0.13 ms, copy 0.5 ms at 1
    # token); not probed
    cpu_overhead: float = 1e-4
    copy_overhead: float = 5e-4


def _timed(fn: Callable[[], object], sync: Callable[[], None], reps: int = 3,
           budget: float = PROBE_BUDGET_S) -> float:
    """Seconds per call of `fn`: its first call (warm-up) is timed too, and the repetitions
    stop at `reps` or once `budget` seconds are spent, so a slow kernel costs about
    2 x `budget` at most."""
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    n = min(reps, int(budget / max(first, 1e-9)))
    if n < 1:
        return first
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n


def measure_bandwidths(device: torch.device, dtype: torch.dtype, nbytes: int = 32 << 20,
                       backend: Any = None) -> Bandwidths:
    """Copy bandwidths and GEMM rates of this machine (well under 2 s). The host GEMM is the
    one the runtime runs on the CPU: the torch `backend`'s own bf16 matrix (`pack_bf16`:
    oneDNN's prepacked GEMM, or float32 blocks where the CPU has no fast bf16 math) under bf16
    compute, else `x @ w` in `dtype`."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    a = torch.empty(nbytes, dtype=torch.uint8)
    a.fill_(1)
    b = torch.empty_like(a)
    host = 2 * nbytes / _timed(lambda: b.copy_(a), lambda: None)
    # 64 tokens through a 4096 x 4096 weight: a 1024 x 1024 one under-measured an AMX CPU 4x
    # (0.83 vs 3.4 TFLOP/s on an expert-sized GEMM,
    # bench/results/runtime_cuda-nvidia-h100-80gb-hbm3.json)
    x, w = torch.full((64, 4096), 0.01, dtype=dtype), torch.full((4096, 4096), 0.01, dtype=dtype)
    gemm: Callable[[], object] = lambda: x @ w
    if dtype == torch.bfloat16 and hasattr(backend, "pack_bf16") and \
            backend.device.type == "cpu":
        packed = backend.pack_bf16([w])
        gemm = lambda: packed(x)
    host_flops = 2 * 64 * 4096 * 4096 / _timed(gemm, lambda: None)
    if not cuda:
        return Bandwidths(host / 2, host, host, host_flops, host_flops)
    pinned = a.pin_memory()
    d = torch.empty(nbytes, dtype=torch.uint8, device=device)
    h2d = nbytes / _timed(lambda: d.copy_(pinned, non_blocking=True), sync)
    d2 = torch.empty_like(d)
    dev = 2 * nbytes / _timed(lambda: d2.copy_(d), sync)
    xd, wd = torch.randn(512, 4096, dtype=dtype, device=device), \
        torch.randn(4096, 4096, dtype=dtype, device=device)
    dev_flops = 2 * 512 * 4096 * 4096 / _timed(lambda: xd @ wd, sync)
    return Bandwidths(h2d, host, dev, host_flops, dev_flops)


@dataclass(frozen=True)
class CostModel:
    """Seconds to serve one missed expert for `n` tokens, on the CPU or by a copy. Memory
    terms read the weight at half a large copy's (read + write) rate; `host_bytes` is what the
    CPU's kernels read (a weight dequantized at load there, fp8 on the CPU, reads twice its
    stored `nbytes`; default `nbytes`)."""

    bw: Bandwidths
    hidden: int
    act_bytes: int        # bytes per activation element
    same_memory: bool     # CPU-only: no activation transfer for CPU compute

    def cpu_seconds(self, n: int, nbytes: int, flops: float, host_bytes: int | None = None
                    ) -> float:
        move = 0.0 if self.same_memory else 2 * n * self.hidden * self.act_bytes / \
            self.bw.host_to_device
        read = host_bytes if host_bytes is not None else nbytes
        return self.bw.cpu_overhead + move + max(2 * read / self.bw.host_memory,
                                                 flops / self.bw.host_flops)

    def copy_seconds(self, n: int, nbytes: int, flops: float) -> float:
        return self.bw.copy_overhead + nbytes / self.bw.host_to_device + max(
            2 * nbytes / self.bw.device_memory, flops / self.bw.device_flops)

    def choose(self, n: int, nbytes: int, flops: float, host_bytes: int | None = None) -> str:
        """"cpu" or "copy", whichever the model says is faster (always "cpu" when the device
        is the CPU: a copy only adds a memcpy)."""
        if self.same_memory:
            return "cpu"
        copy = self.copy_seconds(n, nbytes, flops)
        return "copy" if copy < self.cpu_seconds(n, nbytes, flops, host_bytes) else "cpu"
