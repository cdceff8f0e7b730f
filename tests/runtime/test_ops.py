"""The runtime's ops and weight pass (runtime/ops.py) against the reference they stand in for:
the reference's layers built with `RuntimeOps` and filled by `load_runtime_weights`, the fused
q|k|v rows the native decode attention reads, the CPU flash kernel for a later prefill chunk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from step3_edge.checkpoint import CheckpointReader
from step3_edge.model import KVCache, Step3DecoderLayer, mfa_attention, rope_cos_sin
from step3_edge.runtime import ops
from step3_edge.runtime.backends import TorchBackend
from step3_edge.runtime.ops import RuntimeOps, causal_after_past, load_runtime_weights


@pytest.mark.skipif(ops._FLASH_CPU is None, reason="this torch has no CPU flash kernel")
@pytest.mark.parametrize("t,s", [(24, 70), (17, 100), (40, 41)])
def test_causal_after_past_equals_the_reference_attention(t: int, s: int, rng) -> None:
    """A later prefill chunk as two flash calls merged by their log-sum-exp: the reference's
    causal attention within one bf16 step in bf16, within float32 rounding in float32 (a wrong
    merge weight or split point is off by the values' scale)."""
    b, n, d = 2, 4, 32
    causal = (torch.arange(s)[None, :] <= torch.arange(s - t, s)[:, None]).expand(b, 1, t, s)
    q = torch.randn(b, n, t, d, generator=rng)
    k, v = torch.randn(b, s, d, generator=rng), torch.randn(b, s, d, generator=rng)
    torch.testing.assert_close(causal_after_past(q, k, v, d ** -0.5),
                               mfa_attention(q, k, v, causal, d ** -0.5))
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    got = causal_after_past(q, k, v, d ** -0.5).float()
    want = mfa_attention(q, k, v, causal, d ** -0.5).float()
    assert ((got - want).abs() <= want.abs().clamp(min=1) * 2 ** -7).all()   # a bf16 step
    assert RuntimeOps(False).mfa(q, k, v, None, d ** -0.5).dtype == torch.bfloat16


def test_key_value_rows_only_of_one_fused_output(rng) -> None:
    """The rows [b, 2d] the native decode attention reads: the key and the value of one
    q|k|v output side by side; none for separate tensors or more than one new token."""
    b, sq, d = 3, 16, 8
    y = torch.randn(b, 1, sq + 2 * d, generator=rng)
    q, k, v = y.split([sq, d, d], dim=-1)
    assert torch.equal(ops._key_value_rows(k, v), y[:, 0, sq:])
    assert ops._key_value_rows(k, v.clone()) is None
    assert ops._key_value_rows(v, k) is None
    y2 = torch.randn(b, 2, sq + 2 * d, generator=rng)
    assert ops._key_value_rows(*y2.split([sq, d, d], dim=-1)[1:]) is None


def test_runtime_layer_equals_the_reference_layer(text_ckpt: Path, ref_model, rng) -> None:
    """Each layer's attention side built with `RuntimeOps` and filled by the runtime's weight
    pass (the backend's linears over the stored bf16 weights) under float32 compute: the
    reference layer's residual, normed output, KV cache and routing bit for bit over a prompt
    and a decode step; a later prefill chunk (the flash kernel, where the reference takes SDPA)
    within float32 rounding."""
    t = ref_model.config.text_config
    reader = CheckpointReader(text_ckpt)
    backend = TorchBackend("cpu", torch.float32)
    b, steps = 2, (20, 1, 18)
    cache = {"ref": KVCache(t, b, sum(steps)), "rt": KVCache(t, b, sum(steps))}
    layers = {"ref": list(ref_model.model.layers), "rt": []}
    run_ops = RuntimeOps(backend.caps.native)
    for L in range(t.num_hidden_layers):
        with torch.device("meta"):
            layer = Step3DecoderLayer(t, L, run_ops, ffn=False)
        layers["rt"].append(load_runtime_weights(layer, f"model.layers.{L}.", reader, backend))
        run_ops.fuse_qkv(L, layer.self_attn)
        assert not hasattr(layer, "mlp") and not hasattr(layer, "share_expert")
    past = 0
    with torch.inference_mode():
        for n in steps:
            pos = torch.arange(past, past + n)[None].expand(b, n)
            cos, sin = rope_cos_sin(pos, t.head_dim, t.rope_theta, t.rope_factor)
            h = torch.randn(b, n, t.hidden_size, generator=rng)
            for L in range(t.num_hidden_layers):
                ref, got = (layers[w][L].attention_side(h, cos, sin, None, cache[w])
                            for w in ("ref", "rt"))
                if n > 16 and past:                 # the flash kernel: float32 rounding
                    torch.testing.assert_close(got, ref)
                    continue
                assert all(torch.equal(a, c) for a, c in zip(got, ref))
                assert torch.equal(cache["rt"].k[L], cache["ref"].k[L])
                assert torch.equal(cache["rt"].v[L], cache["ref"].v[L])
                if layers["ref"][L].is_moe:
                    x = ref[1].reshape(-1, t.hidden_size)
                    for a, c in zip(layers["rt"][L].moe.route(x), layers["ref"][L].moe.route(x)):
                        assert torch.equal(a, c)
            for c in cache.values():
                c.length += n
            past += n
