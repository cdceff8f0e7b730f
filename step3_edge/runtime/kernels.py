"""Which fast kernels run here, decided once when a backend is made: `KernelCaps`, a frozen
record of the native kernels' instruction set (or why they do not run), oneDNN's fast bf16
GEMM and the quantized matmuls torch has on this device. Every layer that could take a fast
path asks the backend's `caps` rather than probing or guessing on its own."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from step3_edge.errors import ConfigError
from step3_edge.runtime import native

FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class KernelCaps:
    """The fast kernels a backend uses. `native_isa` is the native kernels' instruction set
    where they run (a CPU, bf16 compute, not turned off, and they built), else None;
    `native_applies` says whether they were considered at all (a CPU under bf16 compute with
    native_kernels not False) and `native_unavailable` why they do not run where they apply."""

    device_type: str = "cpu"
    native_applies: bool = False
    native_isa: str | None = None
    native_unavailable: str = ""
    fast_bf16_gemm: bool = False       # oneDNN's prepacked bf16 GEMM (AVX512-BF16, AMX, ...)
    int4pack_cpu: bool = False         # torch._weight_int4pack_mm_for_cpu
    int_mm: bool = False               # CUDA torch._int_mm
    int8pack_cuda: bool = False        # CUDA torch._weight_int8pack_mm
    scaled_mm: bool = False            # CUDA torch._scaled_mm on fp8 (sm89+)

    @property
    def native(self) -> bool:
        """Whether the native kernels run (`native.py`)."""
        return self.native_isa is not None

    def as_dict(self) -> dict[str, bool]:
        """The probed kernels by name (`describe()["capabilities"]`)."""
        if self.device_type == "cpu":
            out = {"int4pack_cpu": self.int4pack_cpu, "mkldnn_bf16_packed": self.fast_bf16_gemm}
        else:
            out = {"int_mm": self.int_mm, "int8pack_cuda": self.int8pack_cuda,
                   "scaled_mm": self.scaled_mm}
        if self.native_applies:
            out["native_kernels"] = self.native
        return out

    @classmethod
    def probe(cls, device: torch.device, dtype: torch.dtype, native_kernels: bool | None
              ) -> KernelCaps:
        """Try each kernel once on a small matrix on `device`; the native kernels under bf16
        compute on a CPU unless `native_kernels` is False (True: required, a ConfigError
        where they cannot run)."""
        if device.type != "cpu":
            return cls(device.type, **_probe_cuda(device))
        applies = dtype == torch.bfloat16 and native_kernels is not False
        isa, why = None, ""
        if applies:
            k = native.kernel()
            isa = None if k is None else k.isa
            why = native.unavailable_reason()
            if native_kernels and isa is None:
                raise ConfigError(f"native_kernels=True, but the native kernels cannot run here "
                                  f"({why})", "leave native_kernels unset (oneDNN is used "
                                  "instead)")
        int4 = _try(lambda: torch._weight_int4pack_mm_for_cpu(
            torch.ones(1, 128), torch._convert_weight_to_int4pack_for_cpu(
                torch.full((32, 128), 8, dtype=torch.int32), 1), 128, torch.ones(1, 32, 2)))
        return cls("cpu", applies, isa, why, fast_bf16_gemm(), int4pack_cpu=int4)


# kernels no torch module runs (the ONNX Runtime / TensorRT graph backends)
NO_KERNELS = KernelCaps()


def _probe_cuda(dev: torch.device) -> dict[str, Any]:
    q = torch.ones(32, 32, dtype=torch.int8, device=dev)
    major, minor = torch.cuda.get_device_capability(dev)
    return {
        "int_mm": _try(lambda: torch._int_mm(torch.ones(32, 32, dtype=torch.int8, device=dev),
                                             q.t())),
        "int8pack_cuda": _try(lambda: torch._weight_int8pack_mm(
            torch.ones(1, 32, dtype=torch.bfloat16, device=dev), q,
            torch.ones(32, dtype=torch.bfloat16, device=dev))),
        "scaled_mm": (major, minor) >= (8, 9) and _try(lambda: torch._scaled_mm(
            torch.ones(32, 32, device=dev).to(FP8), torch.ones(32, 32, device=dev).to(FP8).t(),
            scale_a=torch.ones(32, 1, device=dev), scale_b=torch.ones(1, 32, device=dev),
            out_dtype=torch.bfloat16))}


def _try(fn: Any) -> bool:
    try:
        fn()
        return True
    except (RuntimeError, NotImplementedError, TypeError, AttributeError, ValueError):
        return False


@cache
def fast_bf16_gemm() -> bool:
    """Whether oneDNN has a fast bf16 GEMM on this CPU (AVX512-BF16, AMX or AVX-NE-CONVERT):
    it prepacks bf16 weights only there."""
    w = torch.ones(32, 64, dtype=torch.bfloat16)
    return torch.backends.mkldnn.is_available() and _try(
        lambda: torch.ops.mkldnn._linear_pointwise(
            torch.ones(2, 64, dtype=torch.bfloat16),
            torch.ops.mkldnn._reorder_linear_weight(w, 1), None, "none", [], ""))


__all__ = ["NO_KERNELS", "KernelCaps", "fast_bf16_gemm"]
