"""Torch backend kernels against the dequantized weight; CUDA paths skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from step3_edge.errors import ConfigError
from step3_edge.quantize.schemes import get_scheme
from step3_edge.runtime.backends import NativeQuant, TorchBackend, make_backend

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _weight(out: int = 96, inp: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) / inp ** 0.5


@pytest.mark.parametrize("scheme,kernel", [
    ("bf16", "F.linear"),
    ("int8_per_channel", "_weight_int8pack_mm"),
    ("int4_block", "_weight_int4pack_mm_for_cpu"),
    ("int8_block", "dequantized at load"),
    ("fp8_per_channel", "dequantized at load"),
    ("block_fp8", "dequantized at load"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_linear_matches_dequantized_weight(scheme: str, kernel: str,
                                               dtype: torch.dtype) -> None:
    be = TorchBackend("cpu", dtype)
    sch = get_scheme(scheme)
    w = _weight()
    parts = sch.quantize(w)
    lin = be.linear(sch, parts, tuple(w.shape))
    if scheme == "bf16" and dtype == torch.bfloat16:
        kernel = "oneDNN prepacked bf16" if be.caps.fast_bf16_gemm else \
            "float32 GEMM on bf16 row blocks"
    if dtype == torch.bfloat16 and be.caps.native and NativeQuant.takes(sch):
        kernel = "native int8/fp8 GEMV"                             # the stored bytes
    assert kernel in lin.kernel
    # 15 rows (the GEMM paths) and 2 (a decode step's: the native GEMV where it runs)
    for x in (torch.randn(5, 3, w.shape[1]), torch.randn(2, w.shape[1])):     # [..., in]
        want = x @ sch.dequantize(parts, tuple(w.shape)).t()        # [..., out] fp32
        got = lin(x.to(dtype)).float()
        tol = 1e-4 if dtype == torch.float32 and "int" not in kernel else 3e-2
        assert got.shape == want.shape
        assert (got - want).abs().max() <= tol * want.abs().max() + 1e-5
    assert lin.nbytes == sch.nbytes(tuple(w.shape))
    again = lin.remake(be)                                          # the copy path
    assert torch.equal(again(x.to(dtype)), lin(x.to(dtype)))
    assert any(kernel in k for k in be.describe()["kernels"])


def test_bf16_weights_stay_bf16_under_bf16_compute() -> None:
    be = TorchBackend("cpu", torch.bfloat16)
    parts = get_scheme("bf16").quantize(_weight())
    lin = be.linear("bf16", parts, (96, 256))
    assert lin.weight.data_ptr() == parts[""].data_ptr()            # no copy, as stored
    lin32 = TorchBackend("cpu", torch.float32).linear("bf16", parts, (96, 256))
    assert lin32.weight.dtype == torch.float32                      # upcast once at load


@pytest.mark.parametrize("m", [1, 5, 16])
def test_prepacked_bf16_is_bit_identical_to_f_linear(m: int) -> None:
    be = TorchBackend("cpu", torch.bfloat16, native_kernels=False)
    if not be.caps.fast_bf16_gemm:
        pytest.skip("no oneDNN bf16 on this CPU")
    for out, inp in ((256, 512), (1536, 512), (512, 1536), (48, 512), (96, 256)):
        parts = get_scheme("bf16").quantize(_weight(out, inp, seed=out))
        lin = be.linear("bf16", parts, (out, inp))
        x = torch.randn(m, inp).to(torch.bfloat16)
        assert torch.equal(lin(x), torch.nn.functional.linear(x, parts[""]))


def _misaligned(t: torch.Tensor, offset: int = 8) -> torch.Tensor:
    """A copy of t whose data starts `offset` bytes past a 64-byte boundary (as tensors read
    from a safetensors file can)."""
    n = t.numel() * t.element_size()
    buf = torch.zeros(n + 128, dtype=torch.uint8)
    start = (-buf.data_ptr()) % 64 + offset
    out = buf[start:start + n].view(t.dtype).view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 64 == offset
    return out


def test_int8_kernel_takes_misaligned_weights_and_inputs() -> None:
    """torch's CPU _weight_int8pack_mm crashes on data that is not 64-byte aligned: the
    backend hands it aligned copies (the native int8 GEMV, off here, takes any alignment)."""
    be = TorchBackend("cpu", torch.bfloat16, native_kernels=False)
    sch = get_scheme("int8_per_channel")
    parts = {k: _misaligned(v) for k, v in sch.quantize(_weight(64, 128)).items()}
    lin = be.linear(sch, parts, (64, 128))
    assert "_weight_int8pack_mm" in lin.kernel
    x = torch.randn(16, 128).to(torch.bfloat16)
    want = x.float() @ sch.dequantize(parts, (64, 128)).t()
    for inp in (x, _misaligned(x)):
        assert (lin(inp).float() - want).abs().max() <= 3e-2 * want.abs().max()


def test_make_backend_choices() -> None:
    assert make_backend("torch", "cpu", "float32").dtype == torch.float32
    with pytest.raises(ConfigError, match="TensorRT engines"):      # no bundle given
        make_backend("tensorrt", "cpu")
    with pytest.raises(ConfigError, match="unknown backend"):
        make_backend("tvm", "cpu")
    with pytest.raises(ConfigError, match="dtype"):
        make_backend("torch", "cpu", "int8")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            make_backend("torch", "cuda")


@CUDA
@pytest.mark.parametrize("scheme", ["bf16", "int8_per_channel", "fp8_per_channel"])
@pytest.mark.parametrize("rows", [1, 64])
def test_cuda_linear_matches_dequantized_weight(scheme: str, rows: int) -> None:
    be = TorchBackend("cuda", torch.bfloat16)
    sch = get_scheme(scheme)
    w = _weight(256, 512)
    parts = {k: v.cuda() for k, v in sch.quantize(w).items()}
    lin = be.linear(sch, parts, (256, 512))
    if scheme == "int8_per_channel" and be.caps.int_mm:
        assert "_int_mm" in lin.kernel
    if scheme == "fp8_per_channel" and be.caps.scaled_mm:
        assert "_scaled_mm" in lin.kernel
    x = torch.randn(rows, 512, device="cuda")
    want = x @ sch.dequantize({k: v.cpu() for k, v in parts.items()}, (256, 512)).cuda().t()
    got = lin(x.to(torch.bfloat16)).float()
    assert (got - want).abs().max() <= 5e-2 * want.abs().max()


@CUDA
def test_cuda_copy_from_pinned_host() -> None:
    host, dev = TorchBackend("cpu", torch.bfloat16), TorchBackend("cuda", torch.bfloat16)
    sch = get_scheme("int8_per_channel")
    lin = host.linear(sch, sch.quantize(_weight(256, 512)), (256, 512)).pin()
    assert all(t.is_pinned() for t in lin.parts.values())
    assert lin.q is lin.parts[""]                      # the kernel reads the pinned copy
    on_dev = lin.remake(dev, non_blocking=True)
    torch.cuda.synchronize()
    x = torch.randn(3, 512, dtype=torch.bfloat16)
    assert (on_dev(x.cuda()).cpu().float() - lin(x).float()).abs().max() < 0.1


def test_kernel_capabilities_are_decided_once_per_backend() -> None:
    """`caps` is one frozen `KernelCaps` made with the backend; `describe()` reports it, and
    the graph backends (no torch kernels) carry `NO_KERNELS`."""
    import dataclasses

    from step3_edge.runtime.kernels import NO_KERNELS, KernelCaps
    from step3_edge.runtime.ort_backend import OrtBackend
    from step3_edge.runtime.trt_backend import TrtBackend

    be = TorchBackend("cpu", torch.bfloat16)
    assert isinstance(be.caps, KernelCaps) and be.caps.native_applies
    with pytest.raises(dataclasses.FrozenInstanceError):
        be.caps.native_isa = "x"  # type: ignore[misc]
    d = be.describe()
    assert d["capabilities"] == be.caps.as_dict() and d["native_isa"] == be.caps.native_isa
    assert d["capabilities"]["native_kernels"] == be.caps.native
    off = TorchBackend("cpu", torch.bfloat16, native_kernels=False).caps
    assert not off.native and not off.native_applies
    assert OrtBackend.caps is TrtBackend.caps is NO_KERNELS and not NO_KERNELS.native
