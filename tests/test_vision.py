"""The vision reference (step3_edge.vision) against vLLM's step3_vl and an independent,
deliberately naive re-implementation written here (explicit per-head softmax, unfold convs)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from step3_edge.config import Step3Config
from step3_edge.errors import ImageError
from step3_edge.layout import vision_weights
from step3_edge.vision import (
    PAD_TP_SIZE,
    Step3VisionEncoder,
    Step3VisionEncoderLayer,
    build_vision_heads,
    project_features,
    quick_gelu,
    resize_position_embedding,
)

TINY = Step3Config.preset("tiny")  # vision: width 32, 2 layers, 2 heads, 728 px / patch 14


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (LayerNorm gains/biases and all biases included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "class_embedding" in name or "position_embedding" in name:
                scale = 1.0
            elif p.dim() >= 2:  # fan-in scaling keeps activations O(1), so fp32 stays exact
                scale = math.prod(p.shape[1:]) ** -0.5
            else:
                scale = 0.2
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
            if "layer_norm" in name and name.endswith("weight"):
                p.add_(1.0)


def _encoder(cfg: Step3Config = TINY, seed: int = 0) -> Step3VisionEncoder:
    enc = Step3VisionEncoder(cfg.vision_config)
    _randomize(enc, seed)
    return enc.eval()


def _heads(cfg: Step3Config = TINY, seed: int = 1) -> dict[str, torch.nn.Module]:
    heads = build_vision_heads(cfg)
    for i, m in enumerate(heads.values()):
        _randomize(m, seed + i)
    return heads


def _pixels(b: int, size: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ independent reference
def _ref_layer(p: dict[str, torch.Tensor], h: torch.Tensor, heads: int, eps: float,
               pre_norm: bool = False) -> torch.Tensor:
    """Explicit softmax(Q K^T * scale) V per head; post-branch LN unless pre_norm."""
    w = h.shape[-1]
    d = w // heads

    def ln(x: torch.Tensor, i: int) -> torch.Tensor:
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        y = (x - mu) / torch.sqrt(var + eps)
        return y * p[f"layer_norm{i}.weight"] + p[f"layer_norm{i}.bias"]

    def attn(x: torch.Tensor) -> torch.Tensor:
        qkv = x @ p["self_attn.qkv_proj.weight"].T + p["self_attn.qkv_proj.bias"]
        q, k, v = qkv[..., :w], qkv[..., w:2 * w], qkv[..., 2 * w:]
        outs = []
        for i in range(heads):
            sl = slice(i * d, (i + 1) * d)
            s = q[..., sl] @ k[..., sl].transpose(-1, -2) * d ** -0.5
            outs.append(torch.softmax(s, dim=-1) @ v[..., sl])
        o = torch.cat(outs, dim=-1)
        return o @ p["self_attn.out_proj.weight"].T + p["self_attn.out_proj.bias"]

    def mlp(x: torch.Tensor) -> torch.Tensor:
        y = x @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]
        y = y * (1.0 / (1.0 + torch.exp(-1.702 * y)))
        return y @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]

    if pre_norm:
        h = h + attn(ln(h, 1))
        return h + mlp(ln(h, 2))
    h = h + ln(attn(h), 1)
    return h + ln(mlp(h), 2)


def _ref_encoder(sd: dict[str, torch.Tensor], cfg: Step3Config, pixels: torch.Tensor,
                 n_pad: int = 3) -> torch.Tensor:
    v = cfg.vision_config
    b, c, s, _ = pixels.shape
    ps, g, w = v.patch_size, s // v.patch_size, v.hidden_size
    # patch embedding as a matmul over row-major patches
    x = pixels.reshape(b, c, g, ps, g, ps).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * ps * ps)
    patches = x @ sd["embeddings.patch_embedding.weight"].reshape(w, -1).T \
        + sd["embeddings.patch_embedding.bias"]
    table = sd["embeddings.position_embedding.weight"]
    g0 = v.image_size // ps
    if g != g0:
        grid = table[1:].T.reshape(1, w, g0, g0)
        grid = F.interpolate(grid, size=(g, g), mode="bicubic", antialias=True,
                             align_corners=False)
        table = torch.cat([table[:1], grid.reshape(w, g * g).T])
    cls = sd["embeddings.class_embedding"] + table[0]            # [1, w]
    h = torch.cat([cls.expand(b, 1, w), patches + table[1:]], dim=1)
    h = torch.cat([cls.expand(b, n_pad, w), h], dim=1)
    for n in range(v.num_hidden_layers):
        pre = f"transformer.layers.{n}."
        lp = {k[len(pre):]: t for k, t in sd.items() if k.startswith(pre)}
        h = _ref_layer(lp, h, v.num_attention_heads, v.layer_norm_eps)
    return h[:, n_pad + 1:]


def _ref_project(features: torch.Tensor, heads: dict[str, torch.nn.Module]) -> torch.Tensor:
    b, n, w = features.shape
    g = math.isqrt(n)
    grid = torch.empty(b, w, g, g)
    for r in range(g):
        for c in range(g):
            grid[:, :, r, c] = features[:, r * g + c]
    d1, d2, pj = heads["vit_downsampler"], heads["vit_downsampler2"], heads["vit_large_projector"]
    cols = F.unfold(grid, kernel_size=2, stride=2)                   # [B, w*4, L]
    y = (d1.weight.reshape(d1.out_channels, -1) @ cols) + d1.bias[:, None]
    g1 = g // 2
    y = y.reshape(b, -1, g1, g1)
    cols = F.unfold(y, kernel_size=3, stride=2, padding=1)
    z = (d2.weight.reshape(d2.out_channels, -1) @ cols) + d2.bias[:, None]   # [B, 2o, L2]
    return z.transpose(1, 2) @ pj.weight.T + pj.bias


# ------------------------------------------------------------------ tests
def _expected(cfg: Step3Config) -> dict[str, tuple[int, ...]]:
    return {s.name: s.shape for s in vision_weights(cfg)}


def _actual(enc: torch.nn.Module, heads: dict[str, torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    out = {f"vision_model.{k}": tuple(t.shape) for k, t in enc.state_dict().items()}
    for prefix, m in heads.items():
        out |= {f"{prefix}.{k}": tuple(t.shape) for k, t in m.state_dict().items()}
    return out


@pytest.mark.parametrize("preset", ["tiny", "full"])
@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_matches_layout(preset: str, bias: bool) -> None:
    cfg = replace(Step3Config.preset(preset), projector_bias=bias)
    with torch.device("meta"):
        enc, heads = Step3VisionEncoder(cfg.vision_config), build_vision_heads(cfg)
    assert _actual(enc, heads) == _expected(cfg)
    assert not list(enc.buffers())  # no persistent (or any) position_ids buffer


def test_output_shapes_728_and_504() -> None:
    enc, heads = _encoder(), _heads()
    hid = TINY.text_config.hidden_size
    with torch.no_grad():
        f728 = enc(_pixels(1, 728))
        f504 = enc(_pixels(2, 504))
        assert f728.shape == (1, 52 * 52, 32) and f504.shape == (2, 36 * 36, 32)
        o728, o504 = project_features(f728, **heads), project_features(f504, **heads)
    assert o728.shape == (1, 169, hid) and o504.shape == (2, 81, hid)
    assert (TINY.vision_tokens(728), TINY.vision_tokens(504)) == (169, 81)


def test_project_features_matches_explicit_reference() -> None:
    heads = _heads()
    for n in (52 * 52, 36 * 36):
        feats = torch.randn(2, n, 32, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            torch.testing.assert_close(project_features(feats, **heads),
                                       _ref_project(feats, heads), atol=1e-4, rtol=1e-4)
    with pytest.raises(ImageError):
        project_features(torch.randn(1, 50, 32), **heads)


def test_layer_matches_naive_post_norm_and_not_pre_norm() -> None:
    v = TINY.vision_config
    layer = Step3VisionEncoderLayer(v)
    _randomize(layer, 3)
    h = torch.randn(2, 37, v.hidden_size, generator=torch.Generator().manual_seed(4))
    p = dict(layer.state_dict())
    with torch.no_grad():
        got = layer(h)
    ref = _ref_layer(p, h, v.num_attention_heads, v.layer_norm_eps)
    pre = _ref_layer(p, h, v.num_attention_heads, v.layer_norm_eps, pre_norm=True)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (got - pre).abs().max() > 1e-2  # a pre-norm "fix" would fail the check above


@pytest.mark.parametrize("size", [728, 504])
def test_encoder_matches_naive_reference(size: int) -> None:
    enc = _encoder()
    px = _pixels(1, size)
    with torch.no_grad():
        got = enc(px)
        ref = _ref_encoder(dict(enc.state_dict()), TINY, px)
    assert got.shape == (1, (size // 14) ** 2, 32)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_position_table_native_and_resized() -> None:
    enc = _encoder()
    table = enc.embeddings.position_embedding.weight.detach()    # [2705, 32]
    assert resize_position_embedding(table, 52) is table
    r = resize_position_embedding(table, 36)
    assert r.shape == (36 * 36 + 1, 32)
    assert torch.equal(r[0], table[0])
    want = F.interpolate(table[1:].T.reshape(1, 32, 52, 52), size=(36, 36), mode="bicubic",
                         antialias=True, align_corners=False).reshape(32, -1).T
    torch.testing.assert_close(r[1:], want, atol=1e-6, rtol=1e-6)
    # row-major grid: a table that varies by row only stays constant along each resized row
    rows = torch.arange(52.0).repeat_interleave(52)[:, None] * torch.arange(1.0, 33.0)
    by_row = resize_position_embedding(torch.cat([table[:1], rows]), 36)[1:].reshape(36, 36, 32)
    torch.testing.assert_close(by_row, by_row[:, :1].expand_as(by_row))
    assert (by_row[1:, 0] - by_row[:-1, 0]).abs().min() > 0.1
    # bf16 table: resized in fp32, cast back
    tb = table.to(torch.bfloat16)
    rb = resize_position_embedding(tb, 36)
    assert rb.dtype == torch.bfloat16 and torch.equal(rb[0], tb[0])
    wb = F.interpolate(tb[1:].float().T.reshape(1, 32, 52, 52), size=(36, 36), mode="bicubic",
                       antialias=True, align_corners=False).to(torch.bfloat16).reshape(32, -1).T
    assert torch.equal(rb[1:], wb)
    # the embeddings use it: native table unchanged, 504 px the resized one
    emb = enc.embeddings
    with torch.no_grad():
        for size, tab in ((728, table), (504, r)):
            px = _pixels(1, size)
            patches = emb.patch_embedding(px).flatten(2).transpose(1, 2)
            torch.testing.assert_close(emb(px)[:, PAD_TP_SIZE:], patches + tab[1:])


def test_four_token_prefix() -> None:
    enc = _encoder()
    emb = enc.embeddings
    cls = emb.class_embedding + emb.position_embedding.weight[:1]   # CLS after its position add
    with torch.no_grad():
        for size in (728, 504):
            e = emb(_pixels(2, size))
            assert e.shape[1] == PAD_TP_SIZE + (size // 14) ** 2
            for i in range(PAD_TP_SIZE):  # 3 pads + CLS, all the same position-added CLS
                torch.testing.assert_close(e[:, i], cls.expand(2, -1))
            assert (e[:, 0] - emb.class_embedding).abs().max() > 1e-3  # not the raw class emb
        # the prefix takes part in attention: without the 3 pads the result differs
        px = _pixels(1, 504)
        sd = dict(enc.state_dict())
        out = enc(px)
        torch.testing.assert_close(out, _ref_encoder(sd, TINY, px, n_pad=3), atol=1e-4, rtol=1e-4)
        assert (out - _ref_encoder(sd, TINY, px, n_pad=0)).abs().max() > 1e-3
        # changing class_embedding reaches the patch outputs only through attention
        no_layers = replace(TINY.vision_config, num_hidden_layers=0)
        enc0 = Step3VisionEncoder(no_layers)
        enc0.load_state_dict({k: t for k, t in sd.items() if k.startswith("embeddings.")})
        before0, before = enc0(px), out
        emb.class_embedding.add_(1.0)
        enc0.embeddings.class_embedding.add_(1.0)
        assert torch.equal(enc0(px), before0)  # no layers: patch tokens do not see CLS
        assert (enc(px) - before).abs().max() > 1e-3
        assert enc(px).shape == (1, 36 * 36, 32)


def test_quick_gelu_numerics() -> None:
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    want = torch.tensor([xi / (1.0 + math.exp(-1.702 * xi)) for xi in x.tolist()],
                        dtype=torch.float64)
    torch.testing.assert_close(quick_gelu(x), want, atol=1e-12, rtol=0)
    assert abs(quick_gelu(torch.tensor(1.0)).item() - 0.8457957) < 1e-6
    assert (quick_gelu(x) - F.gelu(x)).abs().max() > 1e-3  # not erf-GELU
    assert quick_gelu(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_meta_build_and_assign_matches() -> None:
    enc, heads = _encoder(seed=5), _heads(seed=6)
    with torch.device("meta"):
        enc2 = Step3VisionEncoder(TINY.vision_config)
        heads2 = build_vision_heads(TINY)
    enc2.load_state_dict(enc.state_dict(), assign=True)
    for k, m in heads2.items():
        m.load_state_dict(heads[k].state_dict(), assign=True)
    assert all(p.device.type == "cpu" for p in enc2.parameters())
    px = _pixels(1, 504)
    with torch.no_grad():
        assert torch.equal(project_features(enc2.eval()(px), **heads2),
                           project_features(enc(px), **heads))


def test_follows_parameter_dtype() -> None:
    enc = _encoder()
    px = _pixels(1, 504)
    with torch.no_grad():
        ref = enc(px)
        out64 = enc.to(torch.float64)(px)          # fp32 pixels are cast to the weights' dtype
        assert out64.dtype == torch.float64
        torch.testing.assert_close(out64.float(), ref, atol=1e-4, rtol=1e-4)
        outb = enc.to(torch.bfloat16)(px)
        assert outb.dtype == torch.bfloat16 and torch.isfinite(outb.float()).all()


@pytest.mark.parametrize("shape", [(1, 3, 730, 730), (1, 1, 728, 728), (3, 728, 728),
                                   (1, 3, 728, 504)])
def test_bad_pixels_raise(shape: tuple[int, ...]) -> None:
    with pytest.raises(ImageError):
        _encoder()(torch.zeros(shape))
