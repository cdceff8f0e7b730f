"""Quantization schemes: analytic round-trip bounds, layouts, edge cases.

Bounds checked (w: weight, w_hat: dequantize(quantize(w)), s: the stored scale of the element's
row / group / block; float32 arithmetic adds a relative slack of 1e-4):
- int8_per_channel, int8_block: s = amax/127, round to nearest  -> |w - w_hat| <= s/2
- int4_block:                   s = amax/7,   round to nearest  -> |w - w_hat| <= s/2
- fp8_per_channel, block_fp8:   s = amax/448, x = w/s rounded to e4m3 (3 mantissa bits): for
  normal |x| >= 2^-6 the spacing is <= 2^-3 |x|, so the error is <= 2^-4 |x|; below 2^-6 the
  subnormal spacing is 2^-9, error <= 2^-10  ->  |w - w_hat| <= max(2^-4 |w|, 2^-10 s)
"""

from __future__ import annotations

import pytest
import torch

from step3_edge.errors import QuantizationError
from step3_edge.quantize.schemes import (
    BF16, FP8_MAX, SCHEMES, BlockFP8, FP8PerChannel, Int4Block, Int8Block, Int8PerChannel,
    cast_fp8, expand_blocks, get_scheme, to_matmul_nbits, unpack_int4)

SLACK = 1 + 1e-4
SHAPES = [(256, 384), (130, 257), (3, 96, 200), (1, 1), (5, 129)]  # partial blocks included


def _weights(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    w = torch.randn(shape, generator=g)
    rows = torch.exp(2 * torch.randn(*shape[:-1], 1, generator=g))   # rows of varied scale
    return w * rows


def _elementwise_scale(scheme, parts, shape) -> torch.Tensor:
    """The scale that applies to each element, broadcast to [..., out, in]."""
    if isinstance(scheme, BlockFP8):
        return expand_blocks(parts["_scale_inv"], 128, 128, shape)
    s = parts["_scale"]
    if isinstance(scheme, Int8Block | Int4Block):
        return s.repeat_interleave(scheme.group, dim=-1)[..., : shape[-1]]
    return s.expand(shape)


def _bound(scheme, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    if isinstance(scheme, Int8PerChannel | Int8Block | Int4Block):
        return s / 2 * SLACK
    return torch.maximum(w.abs() * 2.0**-4, s * 2.0**-10) * SLACK


QUANTIZED = [BlockFP8(), FP8PerChannel(), Int8PerChannel(), Int8Block(), Int4Block()]


@pytest.mark.parametrize("scheme", QUANTIZED, ids=lambda s: s.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_within_analytic_bound(scheme, shape, rng) -> None:
    for _ in range(3):
        w = _weights(shape, rng)
        parts = scheme.quantize(w)
        assert {k: tuple(v.shape) for k, v in parts.items()} == scheme.part_shapes(shape)
        assert {k: v.dtype for k, v in parts.items()} == scheme.part_dtypes()
        assert sum(v.numel() * v.element_size() for v in parts.values()) == scheme.nbytes(shape)
        w_hat = scheme.dequantize(parts, shape)
        assert w_hat.shape == w.shape and w_hat.dtype == torch.float32
        s = _elementwise_scale(scheme, parts, shape)
        err = (w - w_hat).abs()
        worst = float((err / _bound(scheme, w, s)).max())
        assert worst <= 1.0, f"seed {rng.initial_seed()}: error {worst:.4f} x the bound"
        # the scale is amax / qmax of its own row / group / block
        qmax = {"int8_per_channel": 127, "int8_block": 127, "int4_block": 7}.get(scheme.name,
                                                                               FP8_MAX)
        assert float((s * qmax).max()) == pytest.approx(float(w.abs().max()), rel=1e-6)


def test_bf16_round_trip_is_bf16_rounding() -> None:
    w = torch.randn(7, 9)
    assert torch.equal(BF16().dequantize(BF16().quantize(w), (7, 9)),
                       w.to(torch.bfloat16).float())


@pytest.mark.parametrize("scheme", QUANTIZED, ids=lambda s: s.name)
def test_zero_rows_and_zero_blocks(scheme) -> None:
    w = torch.randn(2, 256, 300)
    w[0, 5] = 0                      # a zero row
    w[1, :128, 128:256] = 0          # a zero 128x128 block (and zero 128-groups)
    w[1, 128:, :] = 0                # a whole 128-row block of zero rows
    parts = scheme.quantize(w)
    for t in parts.values():
        if t.is_floating_point() and t.dtype != torch.float8_e4m3fn:
            assert bool(torch.isfinite(t).all())
    w_hat = scheme.dequantize(parts, tuple(w.shape))
    assert bool(torch.isfinite(w_hat).all())
    assert bool((w_hat[0, 5] == 0).all()) and bool((w_hat[1, :128, 128:256] == 0).all())
    assert bool((w_hat[1, 128:] == 0).all())
    s = _elementwise_scale(scheme, parts, tuple(w.shape))
    assert float(s[1, 128:].min()) == 1.0 and float(s[1, 128:].max()) == 1.0  # zero -> 1
    assert float(s[1, :128, 128:256].min()) == 1.0 or not isinstance(scheme, BlockFP8)
    z = torch.zeros(3, 130)
    assert torch.equal(scheme.dequantize(scheme.quantize(z), (3, 130)), z)


@pytest.mark.parametrize("scheme", QUANTIZED, ids=lambda s: s.name)
@pytest.mark.parametrize("value", [1e30, -1e6, 3e38, 1e-45], ids=str)
def test_extreme_values_stay_finite_and_saturate(scheme, value) -> None:
    # 1e30 / -1e6: outliers, the block scale grows and nothing overflows; 3e38: near float32
    # max; 1e-45: subnormal, amax / qmax underflows to 0 and the scale falls back to 1
    w = torch.randn(4, 200)
    w[1, 3] = value
    if value == 1e-45:
        w.fill_(value)
    parts = scheme.quantize(w)
    w_hat = scheme.dequantize(parts, (4, 200))
    assert bool(torch.isfinite(w_hat).all())
    if value == 1e-45:
        assert float(w_hat.abs().max()) <= 1e-44
    else:
        assert float(w_hat[1, 3]) == pytest.approx(value, rel=2**-4)
    q = parts[""]
    if q.dtype == torch.int8:
        assert int(q.min()) >= -127 and int(q.max()) <= 127
    if q.dtype == torch.uint8:
        assert int(unpack_int4(q, 200).abs().max()) <= 7
    if q.dtype == torch.float8_e4m3fn:
        assert float(q.float().abs().max()) <= FP8_MAX


def test_cast_fp8_saturates() -> None:
    x = torch.tensor([1e6, -1e6, 449.0, 460.0, 500.0, -470.0, 3e38])
    assert cast_fp8(x).float().tolist() == [448, -448, 448, 448, 448, -448, 448]
    assert bool(torch.isfinite(cast_fp8(x).float()).all())


def test_int8_saturates_at_127_not_128() -> None:
    # w / s can land a hair above 127 through float rounding; it must clamp, never wrap
    w = torch.tensor([[1.0, -1.0, 0.5]]) * 0.3
    q = Int8PerChannel().quantize(w)[""]
    assert q.tolist() == [[127, -127, 64]]


@pytest.mark.parametrize("scheme", QUANTIZED, ids=lambda s: s.name)
def test_non_finite_or_1d_input_is_a_quantization_error(scheme) -> None:
    w = torch.randn(4, 8)
    w[1, 2] = float("nan")
    with pytest.raises(QuantizationError):
        scheme.quantize(w)
    w[1, 2] = float("inf")
    with pytest.raises(QuantizationError):
        scheme.quantize(w)
    with pytest.raises(QuantizationError):
        scheme.quantize(torch.randn(8))


def test_partial_last_group_uses_its_own_amax() -> None:
    w = torch.randn(3, 300)                                  # groups: 128, 128, 44
    for scheme, qmax in ((Int8Block(), 127), (Int4Block(), 7)):
        s = scheme.quantize(w)["_scale"]
        assert s.shape == (3, 3)
        torch.testing.assert_close(s[:, 2], w[:, 256:].abs().amax(-1) / qmax, rtol=0, atol=0)
        torch.testing.assert_close(s[:, 0], w[:, :128].abs().amax(-1) / qmax, rtol=0, atol=0)
    s = BlockFP8().quantize(torch.randn(130, 300))["_scale_inv"]
    assert s.shape == (2, 3)


def test_int4_nibble_order_low_is_even() -> None:
    w = torch.zeros(1, 5)
    w[0] = torch.tensor([7.0, -7.0, 1.0, 0.0, -3.0])         # amax 7 -> s = 1, q = w
    p = Int4Block().quantize(w)
    packed = p[""]
    assert packed.shape == (1, 3) and packed.dtype == torch.uint8
    # byte j: low nibble = q[2j] + 8, high nibble = q[2j+1] + 8; odd tail padded with 8 (zero)
    assert packed[0].tolist() == [(7 + 8) | ((-7 + 8) << 4), (1 + 8) | ((0 + 8) << 4),
                                  (-3 + 8) | (8 << 4)]
    assert unpack_int4(packed, 5)[0].tolist() == [7, -7, 1, 0, -3]


@pytest.mark.parametrize("scheme", [Int8Block(), Int4Block()], ids=lambda s: s.name)
def test_matmul_nbits_packing_dequantizes_to_the_same_weight(scheme) -> None:
    n, k = 5, 300
    w = torch.randn(n, k)
    parts = scheme.quantize(w)
    b, scales, bits = to_matmul_nbits(scheme, parts, (n, k))
    nb = 3
    assert b.shape == (n, nb, 128 * bits // 8) and b.dtype == torch.uint8
    assert scales.shape == (n * nb,)
    # ORT MatMulNBits reference: value = (u - 2^(bits-1)) * scales[n * nb + block]
    if bits == 8:
        u = b.reshape(n, nb * 128).float()
    else:
        u = torch.stack([b & 0x0F, b >> 4], dim=-1).reshape(n, nb * 128).float()
    deq = (u - 2 ** (bits - 1)) * scales.view(n, nb).repeat_interleave(128, dim=1)
    torch.testing.assert_close(deq[:, :k], scheme.dequantize(parts, (n, k)), rtol=0, atol=0)
    assert bool((deq[:, k:] == 0).all())
    with pytest.raises(QuantizationError):
        to_matmul_nbits(Int8PerChannel(), Int8PerChannel().quantize(w), (n, k))


def test_leading_dims_equal_per_slice() -> None:
    w = torch.randn(3, 130, 260)
    for scheme in QUANTIZED:
        whole = scheme.quantize(w)
        for e in range(3):
            one = scheme.quantize(w[e])
            for k in whole:
                assert torch.equal(whole[k][e].view(torch.uint8) if whole[k].dtype ==
                                   torch.float8_e4m3fn else whole[k][e],
                                   one[k].view(torch.uint8) if one[k].dtype ==
                                   torch.float8_e4m3fn else one[k]), (scheme.name, k)


def test_registry() -> None:
    assert set(SCHEMES) == {"bf16", "block_fp8", "fp8_per_channel", "int8_per_channel",
                            "int8_block", "int4_block"}
    assert get_scheme("int4_block") == Int4Block()
    with pytest.raises(QuantizationError, match="unknown quantization scheme"):
        get_scheme("int3")


@pytest.mark.parametrize("scheme", [Int8Block(), Int4Block()], ids=lambda s: s.name)
@pytest.mark.parametrize("k", [256, 300])
def test_onnxruntime_matmul_nbits_consumes_the_layout(scheme, k, rng) -> None:
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    n = 40
    w = torch.randn(n, k, generator=rng)
    parts = scheme.quantize(w)
    b, scales, bits = to_matmul_nbits(scheme, parts, (n, k))
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=128, accuracy_level=0)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, n])],
        initializer=[numpy_helper.from_array(b.numpy(), "B"),
                     numpy_helper.from_array(scales.numpy(), "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = torch.randn(3, k, generator=rng)
    y = torch.from_numpy(sess.run(None, {"A": a.numpy()})[0])
    torch.testing.assert_close(y, a @ scheme.dequantize(parts, (n, k)).T, rtol=1e-4, atol=1e-4)
