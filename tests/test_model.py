import pytest
import torch
import torch.nn.functional as F

from step3_edge.errors import PromptError
from step3_edge.model import (DIRECT_QUERIES, KVCache, Step3ForConditionalGeneration, apply_rope,
                              attention_mask, mfa_attention, mfa_math, rope_cos_sin)
from step3_edge.sampling import SamplingParams, sample_next
from step3_edge.vision import CROPS_PER_CALL


def _ids(rng, b, t, vocab=128815):
    return torch.randint(3, vocab, (b, t), generator=rng)


def test_moe_equals_a_per_token_loop(tiny_model, rng):
    layer = tiny_model.model.layers[1]
    moe, cfg = layer.moe, tiny_model.config.text_config
    x = torch.randn(9, cfg.hidden_size, generator=rng)
    got = moe(x)
    for i in range(x.shape[0]):
        probs = torch.softmax(x[i] @ moe.gate.weight.T, dim=-1)
        w, ids = probs.topk(cfg.moe_top_k)
        want = torch.zeros(cfg.hidden_size)
        for wk, e in zip(w, ids.tolist()):
            g = x[i] @ moe.gate_proj.weight[e].T
            u = x[i] @ moe.up_proj.weight[e].T
            want += wk * ((F.silu(g) * u) @ moe.down_proj.weight[e].T)
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)


def test_norm_expert_weight_renormalises(tiny_model, rng):
    import dataclasses

    moe = tiny_model.model.layers[1].moe
    x = torch.randn(5, moe.cfg.hidden_size, generator=rng)
    _, w = moe.route(x)
    assert (w.sum(-1) < 1).all()          # raw top-3 probabilities (vLLM's default)
    moe.cfg = dataclasses.replace(moe.cfg, norm_expert_weight=True)
    try:
        _, w2 = moe.route(x)
    finally:
        moe.cfg = tiny_model.config.text_config
    torch.testing.assert_close(w2.sum(-1), torch.ones(5))
    torch.testing.assert_close(w2, w / w.sum(-1, keepdim=True))


def test_ffn_side_adds_the_shared_expert_unweighted(tiny_model, rng):
    layer = tiny_model.model.layers[2]
    x = torch.randn(1, 4, tiny_model.config.text_config.hidden_size, generator=rng)
    torch.testing.assert_close(layer.ffn_side(x)[0],
                               layer.share_expert(x[0]) + layer.moe(x[0]))


def test_rope_rotates_all_dims_neox_style(rng):
    d = 32
    x = torch.randn(1, 1, 3, d, generator=rng)
    pos = torch.tensor([[0, 1, 7]])
    cos, sin = rope_cos_sin(pos, d, 500000.0)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y[0, 0, 0], x[0, 0, 0])            # position 0 is identity
    half = d // 2
    inv = 1.0 / 500000.0 ** (torch.arange(0, d, 2).double() / d)
    a = (7 * inv).float()
    x1, x2 = x[0, 0, 2, :half], x[0, 0, 2, half:]
    want = torch.cat([x1 * a.cos() - x2 * a.sin(), x2 * a.cos() + x1 * a.sin()])
    torch.testing.assert_close(y[0, 0, 2], want, rtol=1e-5, atol=1e-6)
    # relative: q.k depends on position difference only
    q, k = torch.randn(1, 1, 1, d, generator=rng), torch.randn(1, 1, 1, d, generator=rng)
    def dot(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([[pq]]), d, 500000.0)
        ck, sk = rope_cos_sin(torch.tensor([[pk]]), d, 500000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()
    torch.testing.assert_close(dot(10, 3), dot(107, 100), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("t", [1, 5, DIRECT_QUERIES, 40])
def test_mfa_attention_equals_sdpa_over_shared_kv(t, rng):
    """Both formulations (`mfa_math`, and SDPA past DIRECT_QUERIES queries) against SDPA over
    K and V copied to every head, a row with no visible key included."""
    b, n, s, d = 3, 4, 45, 32
    q = torch.randn(b, n, t, d, generator=rng)
    k, v = torch.randn(b, s, d, generator=rng), torch.randn(b, s, d, generator=rng)
    mask = torch.rand(b, 1, t, s, generator=rng) < 0.7
    mask[0, 0, 0] = False                           # a row with no visible key (left padding)
    mask[1:, :, :, -1] = True                       # every other row sees a key
    want = F.scaled_dot_product_attention(q, k[:, None].repeat(1, n, 1, 1),
                                          v[:, None].repeat(1, n, 1, 1), attn_mask=mask,
                                          scale=d ** -0.5)
    seen = mask.any(-1, keepdim=True).expand(b, n, t, 1)
    for got in (mfa_attention(q, k, v, mask, d ** -0.5), mfa_math(q, k, v, mask, d ** -0.5)):
        # fp32 both ways, different summation order: agreement to fp32 rounding
        torch.testing.assert_close(got.masked_select(seen), want.masked_select(seen),
                                   rtol=1e-5, atol=1e-6)
        assert torch.isfinite(got).all()            # the math's unseen row stays finite
    if t <= DIRECT_QUERIES:                         # the math itself on a CPU
        assert torch.equal(mfa_attention(q, k, v, mask, d ** -0.5),
                           mfa_math(q, k, v, mask, d ** -0.5))


@pytest.mark.parametrize("t,s", [(1, 9), (6, 6), (5, 12), (40, 40), (24, 70)])
def test_plain_causal_runs_maskless_with_the_same_bits(t, s, rng):
    b, n, d = 2, 4, 32
    past = s - t
    positions = torch.arange(past, s)[None].expand(b, t)
    assert attention_mask(positions, torch.ones(b, s, dtype=torch.bool), past) is None
    causal = (torch.arange(s)[None, :] <= torch.arange(past, s)[:, None]).expand(b, 1, t, s)
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[1, 0] = False                             # one padding key: a mask tensor again
    assert torch.equal(attention_mask(positions, valid, past), causal & valid[:, None, None])
    for dtype in (torch.bfloat16, torch.float32):
        q = torch.randn(b, n, t, d, generator=rng).to(dtype)
        k = torch.randn(b, s, d, generator=rng).to(dtype)
        v = torch.randn(b, s, d, generator=rng).to(dtype)
        assert torch.equal(mfa_attention(q, k, v, None, d ** -0.5),
                           mfa_attention(q, k, v, causal, d ** -0.5))
        assert torch.equal(mfa_math(q, k, v, None, d ** -0.5),
                           mfa_math(q, k, v, causal, d ** -0.5))


def test_prefill_then_decode_equals_one_forward(tiny_model, rng):
    ids = _ids(rng, 2, 14)
    with torch.no_grad():
        full = tiny_model(ids)
        cache = KVCache(tiny_model.config.text_config, 2, 14)
        parts = [tiny_model(ids[:, :9], cache=cache)]
        for t in range(9, 14):
            parts.append(tiny_model(ids[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)


def test_generate_is_greedy_and_matches_full_forward(tiny_model, rng):
    ids = _ids(rng, 1, 6)
    out = tiny_model.generate(ids, max_new_tokens=6)
    with torch.no_grad():
        logits = tiny_model(out[:, :-1])
    assert torch.equal(logits[:, 5:].argmax(-1), out[:, 6:])


def test_left_padded_batch_equals_single_rows(tiny_model, rng):
    a, b = _ids(rng, 1, 7), _ids(rng, 1, 4)
    batch = torch.cat([a, torch.cat([torch.full((1, 3), 2), b], 1)])
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :3] = False
    out = tiny_model.generate(batch, max_new_tokens=5, key_valid=valid)
    assert torch.equal(out[0, 7:], tiny_model.generate(a, max_new_tokens=5)[0, 7:])
    assert torch.equal(out[1, 7:], tiny_model.generate(b, max_new_tokens=5)[0, 4:])


def test_stop_tokens_end_rows(tiny_model, rng):
    ids = _ids(rng, 1, 5)
    free = tiny_model.generate(ids, max_new_tokens=4)
    stop = int(free[0, 6])                        # the 2nd generated token
    out = tiny_model.generate(ids, max_new_tokens=4, stop_token_ids=(stop,))
    assert out.shape[1] == 7 and int(out[0, -1]) == stop


def test_bf16_and_block_fp8_checkpoints_agree_within_fp8_error(tiny_model, tiny_fp8, rng):
    fp8 = Step3ForConditionalGeneration.from_pretrained(tiny_fp8)
    ids = _ids(rng, 2, 10)
    with torch.no_grad():
        a, b = tiny_model(ids), fp8(ids)
    # Same bf16 weights, e4m3 rounding: per weight relative error <= 2^-4 (RMS ~2.6%).
    # Through 4 layers with ~7 matmuls in series the logit error adds up to < 15 %;
    # unrelated weights would give ~141 % (two independent unit-variance outputs).
    rel = float((a - b).norm() / a.norm())
    assert 0 < rel < 0.15
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) > 0.6


def test_images_are_merged_at_im_patch_positions(tiny_model, rng):
    from types import SimpleNamespace

    cfg = tiny_model.config
    views = SimpleNamespace(global_view=torch.randn(3, 728, 728, generator=rng),
                            crops=torch.randn(2, 3, 504, 504, generator=rng))
    n = 2 * 81 + 169
    ids = torch.cat([_ids(rng, 1, 3), torch.full((1, n), cfg.image_token_id), _ids(rng, 1, 2)], 1)
    with torch.no_grad():
        emb = tiny_model.embed(ids, [views])
        feats = tiny_model.encode_images([views])
    assert feats.shape == (n, cfg.text_config.hidden_size)
    torch.testing.assert_close(emb[0, 3:3 + n], feats)
    torch.testing.assert_close(emb[0, :3], tiny_model.model.embed_tokens(ids[0, :3]))
    # crop features come first, then the global view
    with torch.no_grad():
        only_global = tiny_model.encode_images([SimpleNamespace(
            global_view=views.global_view, crops=torch.empty(0, 3, 504, 504))])
    torch.testing.assert_close(feats[-169:], only_global)
    with pytest.raises(PromptError, match="image features"):
        tiny_model.embed(ids[:, :-5], [views])
    with pytest.raises(PromptError, match="no image"):
        tiny_model.embed(ids)


def test_many_crops_run_in_bounded_calls(tiny_model, rng, monkeypatch):
    """An image with more crops than `CROPS_PER_CALL` (a 64x20000 image gets 336) goes
    through the tower in calls of at most that many crops, with the features of one call
    over all of them (within float32 rounding: other GEMM blockings)."""
    from types import SimpleNamespace

    import step3_edge.vision as vision_module

    n = 2 * CROPS_PER_CALL + 3
    views = SimpleNamespace(global_view=torch.randn(3, 728, 728, generator=rng),
                            crops=torch.randn(n, 3, 504, 504, generator=rng))
    sizes: list[int] = []
    tower = tiny_model.vision_model.forward
    monkeypatch.setattr(tiny_model.vision_model, "forward",
                        lambda x: sizes.append(x.shape[0]) or tower(x))
    with torch.no_grad():
        feats = tiny_model.encode_images([views])
        monkeypatch.setattr(vision_module, "CROPS_PER_CALL", n)
        whole = tiny_model.encode_images([views])
    assert sizes == [CROPS_PER_CALL, CROPS_PER_CALL, 3, 1, n, 1]
    assert feats.shape == (n * 81 + 169, tiny_model.config.text_config.hidden_size)
    torch.testing.assert_close(feats, whole, rtol=1e-5, atol=1e-5)


def test_context_overflow_is_a_prompt_error(tiny_model):
    cache = KVCache(tiny_model.config.text_config, 1, 4)
    with pytest.raises(PromptError, match="KV cache"):
        tiny_model(torch.ones(1, 5, dtype=torch.long), cache=cache)


def test_sampling_filters(rng):
    logits = torch.randn(4, 50, generator=rng)
    greedy = sample_next(logits, SamplingParams())
    assert torch.equal(greedy, logits.argmax(-1))
    # ties (a row's maximum at several places, as bf16 logits often have) and a vocabulary
    # past torch's vectorized chunks: still argmax's first index
    wide = torch.randn(6, 128815, generator=rng).to(torch.bfloat16).float()
    for row in range(6):
        top = wide[row].max()
        spots = torch.randint(0, wide.shape[1], (3,), generator=rng)
        wide[row, spots] = top + 1
    assert torch.equal(sample_next(wide, SamplingParams()), wide.argmax(-1))
    top2 = logits.topk(2, dim=-1).indices
    for _ in range(20):
        s = sample_next(logits, SamplingParams(temperature=1.0, top_k=2), rng)
        assert (s[:, None] == top2).any(-1).all()
    peaked = torch.full((2, 10), -10.0)
    peaked[:, 3] = 10.0
    s = sample_next(peaked, SamplingParams(temperature=1.0, top_p=0.5), rng)
    assert torch.equal(s, torch.tensor([3, 3]))
    with pytest.raises(PromptError):
        SamplingParams(top_p=0)
