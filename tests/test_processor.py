"""Tokenizer, image loading, multi-crop (vLLM's ImagePatcher), pixel pipeline and prompt
expansion."""

from __future__ import annotations

import base64
import io
import json
import random
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from step3_edge.config import Step3Config
from step3_edge.errors import ConfigError, ImageError, PromptError
import step3_edge.processor as processor_module
from step3_edge.processor import (CLIP_MEAN, CLIP_STD, ImagePatcher, ImageViews, Step3Processor,
                                  image_token_layout, load_image, to_pixel_values)
from step3_edge.tasks import COLOURS, SHAPES, task_texts
from step3_edge.tokenizer import (SPECIAL_TOKENS, THINK_END, build_synthetic_tokenizer,
                                  learn_merges, load_tokenizer, write_tokenizer_files)

ID = SPECIAL_TOKENS
IM_PATCH = ID["<im_patch>"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("ckpt")
    Step3Config.preset("tiny").save(folder)
    write_tokenizer_files(folder)
    return folder


@pytest.fixture(scope="module")
def proc(ckpt) -> Step3Processor:
    return Step3Processor.from_pretrained(ckpt)


def _rand_image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


# ------------------------------------------------------------------------ tokenizer
def test_special_tokens_at_their_ids_after_save_and_load(ckpt) -> None:
    tok = load_tokenizer(ckpt)
    for text, i in SPECIAL_TOKENS.items():
        assert tok.token_to_id(text) == i and tok.id_to_token(i) == text
    assert tok.token_to_id("<patch_newline>") == 128004 and tok.token_to_id("</think>") == 128009
    data = json.loads((ckpt / "tokenizer.json").read_text(encoding="utf-8"))
    assert {t["content"]: t["id"] for t in data["added_tokens"]} == SPECIAL_TOKENS
    assert all(t["special"] for t in data["added_tokens"])
    conf = json.loads((ckpt / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert conf["bos_token"] == "<｜begin▁of▁sentence｜>" and conf["eos_token"] == "<｜end▁of▁sentence｜>"
    assert conf["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert conf["added_tokens_decoder"]["128001"]["content"] == "<im_patch>"
    assert isinstance(conf["chat_template"], str)
    assert tok.encode("A").ids == [3 + ord("A")]              # byte b -> id 3 + b


def test_random_unicode_round_trip_and_specials_never_split(proc: Step3Processor) -> None:
    rng = random.Random()
    specials = list(SPECIAL_TOKENS)
    for _ in range(20):
        chars = [chr(rng.choice([rng.randint(32, 126), rng.randint(0xA0, 0xD7FF),
                                 rng.randint(0xE000, 0x10FFFF), 10, 9]))
                 for _ in range(rng.randint(0, 60))]
        text = "".join(chars)
        ids = proc.encode(text)
        assert all(3 <= i <= 258 for i in ids)
        assert proc.decode(ids, skip_special_tokens=False) == text
        picks = [rng.choice(specials) for _ in range(5)]
        mixed = "".join(p + text[k::5] for k, p in enumerate(picks))
        mids = proc.encode(mixed)
        assert [i for i in mids if i > 258 or i < 3] == [SPECIAL_TOKENS[p] for p in picks]
        assert proc.decode(mids, skip_special_tokens=False) == mixed
        # skipping specials keeps </think>, the reasoning / answer boundary
        assert proc.decode(mids, skip_special_tokens=True) == "".join(
            (p if p == THINK_END else "") + text[k::5] for k, p in enumerate(picks))


def test_decode_tolerates_unknown_ids(proc: Step3Processor) -> None:
    good = proc.encode("ok")
    assert proc.decode([500, *good, 127999, 999_999, -4, 2**40]) == "ok"
    assert proc.decode(torch.tensor(good)) == "ok"


def test_tokenizer_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(ConfigError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ConfigError):
        build_synthetic_tokenizer({"<a>": 5})                  # inside the byte-token range
    with pytest.raises(ConfigError):
        build_synthetic_tokenizer({"<a>": 300, "<b>": 300})
    with pytest.raises(ConfigError, match="no earlier merge"):
        build_synthetic_tokenizer({"<a>": 300}, [("ab", "c")])


def test_learned_merges_make_task_words_one_token() -> None:
    special = {"<a>": 259, "<b>": 260}
    merges = learn_merges(task_texts(), 240)
    tok = build_synthetic_tokenizer(special, merges)
    assert max(tok.get_vocab().values()) == 260 + len(merges)     # new ids follow the specials
    for word in (*COLOURS, *SHAPES, "yes", "no"):
        assert len(tok.encode(word).ids) == 1, word                # an answer is one token
    for word in (*COLOURS, *SHAPES):
        assert len(tok.encode(" " + word).ids) == 1, word          # ... and so is a question word
    q = "Is there a purple cross in the image?"
    enc = tok.encode(q + "<b>")
    assert enc.ids[-1] == 260 and len(enc.ids) == 10
    assert tok.decode(enc.ids, skip_special_tokens=False) == q + "<b>"
    odd = "Zebra ünïcode 🙂 text"                                # outside the corpus: bytes
    assert tok.decode(tok.encode(odd).ids) == odd


# ------------------------------------------------------------------------ multi-crop
TABLE = [  # (w, h, crops, grid (rows, cols), newlines, tokens) — vLLM's step3_vl ImagePatcher
    (640, 480, 0, (0, 0), 0, 171),
    (1024, 768, 4, (2, 2), 1, 504),
    (1920, 1080, 8, (2, 4), 1, 836),
    (4000, 3000, 30, (5, 6), 4, 2665),
    (500, 200, 3, (1, 3), 0, 420),
]


@pytest.mark.parametrize("w, h, crops, grid, newlines, tokens", TABLE)
def test_token_counts_and_expanded_ids(proc: Step3Processor, w: int, h: int, crops: int,
                                       grid: tuple[int, int], newlines: int, tokens: int) -> None:
    plan = proc.patcher.plan(w, h)
    assert (plan.num_crops, plan.grid, plan.num_newlines) == (crops, grid, newlines)
    assert proc.num_image_tokens(w, h) == tokens
    img = Image.new("RGB", (w, h), (200, 30, 90))
    ids, views = proc("Look: <im_patch> ok", [img])
    (v,) = views
    assert v.num_tokens == tokens and v.grid == grid
    assert len(ids) - len(proc.encode("Look:  ok")) == tokens
    assert ids.count(IM_PATCH) == crops * 81 + 169 == v.num_image_features
    assert ids.count(ID["<patch_start>"]) == ids.count(ID["<patch_end>"]) == crops
    assert ids.count(ID["<patch_newline>"]) == newlines
    assert ids.count(ID["<im_start>"]) == ids.count(ID["<im_end>"]) == 1
    assert v.global_view.shape == (3, 728, 728) and v.global_view.dtype == torch.float32
    assert v.crops.shape == (crops, 3, 504, 504)


@pytest.mark.parametrize("inclusive, crops, tokens", [(False, 4, 504), (True, 0, 171)])
def test_728_square_under_both_thresholds(inclusive: bool, crops: int, tokens: int) -> None:
    p = ImagePatcher(crop_threshold_inclusive=inclusive)
    plan = p.plan(728, 728)
    assert plan.num_crops == crops
    assert plan.num_crops * 83 + plan.num_newlines + 171 == tokens
    assert p.plan(727, 727).num_crops == 0 and p.plan(729, 729).num_crops == 4


def test_crop_boxes_and_sizes() -> None:
    p = ImagePatcher()
    plan = p.plan(1920, 1080)
    assert plan.window == 504 and plan.canvas == (2016, 1008)
    assert plan.boxes == tuple((x, y, x + 504, y + 504) for y in (0, 504)
                               for x in (0, 504, 1008, 1512))
    big = p.plan(4000, 3000)                                    # 3024 cap, int() truncation
    assert big.resized == (3024, 2268) and big.canvas == (3024, 2520)
    assert p.plan(5000, 3333).resized == (3024, 2015)           # round() would give 2016
    thin = p.plan(500, 200)
    assert thin.window == 200 and thin.canvas == (600, 200)
    long = p.plan(3000, 600)                                    # aspect > 4: window = short
    assert long.window == 504 and p.plan(3000, 500).window == 500
    assert p.plan(700, 400).window == 400                       # small, aspect > 1.5
    assert ImagePatcher._starts(1100, 504) == [0, 504, 596]     # last tile shifted back
    assert ImagePatcher._starts(400, 504) == [0]


def test_tiny_extreme_image_is_padded_top_left_on_black() -> None:
    img = Image.new("RGB", (10, 100), (255, 0, 0))
    glob, crops, plan = ImagePatcher()(img)
    assert plan.padded == (100, 100) and glob.size == (100, 100) and crops == []
    arr = np.asarray(glob)
    assert (arr[:, :10] == [255, 0, 0]).all() and (arr[:, 10:] == 0).all()
    assert ImagePatcher().plan(40, 200).padded == (40, 200)    # short side >= 32: no pad


def test_crops_are_exact_tiles_when_no_resize_is_needed() -> None:
    img = _rand_image(1008, 1008, seed=random.randrange(1 << 30))  # canvas == size: no resize
    glob, crops, plan = ImagePatcher()(img)
    arr = np.asarray(img)
    assert plan.grid == (2, 2) and glob.size == (1008, 1008)
    for crop, (l, t, r, b) in zip(crops, plan.boxes):
        assert np.array_equal(np.asarray(crop), arr[t:b, l:r])


def test_box_past_short_side_is_black() -> None:
    img = Image.new("RGB", (1000, 400), (9, 9, 9))             # window 504 > height 400
    _, crops, plan = ImagePatcher()(img)
    assert plan.canvas == (1008, 400) and len(crops) == 2
    a = np.asarray(crops[0])
    assert a.shape == (504, 504, 3) and (a[:400] == 9).all() and (a[400:] == 0).all()


# ------------------------------------------------------------------------ pixels
def _norm(arr: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def _aa_halve(x: np.ndarray) -> np.ndarray:
    """2x antialiased bilinear downscale along axis 0: weights 1,3,3,1 renormalized at edges."""
    n = x.shape[0] // 2
    out = np.empty((n, *x.shape[1:]))
    for i in range(n):
        idx = [2 * i - 1, 2 * i, 2 * i + 1, 2 * i + 2]
        w = np.array([1.0, 3.0, 3.0, 1.0])
        keep = [k for k, j in enumerate(idx) if 0 <= j < x.shape[0]]
        w = w[keep] / w[keep].sum()
        out[i] = np.tensordot(w, x[[idx[k] for k in keep]], axes=1)
    return out


def test_pixel_pipeline_identity_and_2x_downscale() -> None:
    seed = random.randrange(1 << 30)
    img = _rand_image(24, 24, seed)
    arr = np.asarray(img)
    same = to_pixel_values(img, 24)
    assert same.shape == (3, 24, 24)
    assert torch.equal(same, _norm(arr.copy()))                 # identity size: exact
    half = to_pixel_values(img, 12).double().numpy()            # [3, 12, 12]
    ref = _norm(arr.copy()).double().numpy()                    # normalize, then resize
    ref = _aa_halve(_aa_halve(ref.transpose(1, 2, 0)).transpose(1, 0, 2)).transpose(2, 1, 0)
    np.testing.assert_allclose(half, ref, atol=1e-5, err_msg=f"seed {seed}")


def test_mean_std_per_channel() -> None:
    rgb = tuple(random.randrange(256) for _ in range(3))
    x = to_pixel_values(Image.new("RGB", (30, 20), rgb), 7)
    for c in range(3):
        want = (rgb[c] / 255 - CLIP_MEAN[c]) / CLIP_STD[c]
        assert torch.allclose(x[c], torch.full((7, 7), want), atol=1e-5)


def test_views_hold_normalized_crops_in_raster_order(proc: Step3Processor) -> None:
    img = _rand_image(1008, 1008, seed=random.randrange(1 << 30))
    v = proc.preprocess(img)
    arr = np.asarray(img)
    for k, (t, l) in enumerate([(0, 0), (0, 504), (504, 0), (504, 504)]):
        assert torch.equal(v.crops[k], _norm(arr[t:t + 504, l:l + 504].copy()))
    assert ImageViews(v.global_view, v.crops[:0], (0, 0)).num_tokens == 171


def test_image_token_layout_order() -> None:
    lay = image_token_layout((2, 2))
    crop = ["<patch_start>", *["<im_patch>"] * 81, "<patch_end>"]
    tail = ["<im_start>", *["<im_patch>"] * 169, "<im_end>"]
    assert lay == crop + crop + ["<patch_newline>"] + crop + crop + tail
    assert image_token_layout((0, 0)) == tail


# ------------------------------------------------------------------------ loading
def _modes() -> dict[str, Image.Image]:
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    p_trans = Image.new("P", (4, 4), 1)
    p_trans.putpalette([0, 0, 0, 50, 60, 70] + [0] * 762)
    p_trans.info["transparency"] = 0
    p_trans.putpixel((0, 0), 0)
    i16 = Image.fromarray(np.full((4, 4), 257 * 100, dtype=np.uint16))
    return {"RGBA": rgba, "LA": Image.new("LA", (4, 4), (80, 0)), "P": p_trans,
            "L": Image.new("L", (4, 4), 80), "I;16": i16,
            "I": Image.fromarray(np.full((4, 4), 65535, dtype=np.int32)),
            "CMYK": Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "1": Image.new("1", (4, 4), 1),
            "RGB": Image.new("RGB", (4, 4), (1, 2, 3))}


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "I;16", "I", "CMYK", "1", "RGB"])
def test_every_mode_converts_to_rgb(mode: str) -> None:
    src = _modes()[mode]
    assert src.mode == mode
    out = load_image(src)
    assert out.mode == "RGB" and out.size == (4, 4) and out is not src
    a = np.asarray(out)
    expect = {"RGBA": (10, 20, 30), "LA": (255, 255, 255), "P": (50, 60, 70), "L": (80,) * 3,
              "I;16": (100,) * 3, "I": (255,) * 3, "CMYK": (255, 0, 0), "1": (255,) * 3,
              "RGB": (1, 2, 3)}[mode]
    assert tuple(a[3, 3]) == expect
    if mode in ("RGBA", "P"):
        assert tuple(a[0, 0]) == (255, 255, 255)               # transparent -> white


def test_sources_path_bytes_data_uri(tmp_path) -> None:
    img = _rand_image(9, 7, seed=random.randrange(1 << 30))
    data = _png(img)
    (tmp_path / "a.png").write_bytes(data)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    for src in (tmp_path / "a.png", str(tmp_path / "a.png"), data, bytearray(data), uri):
        assert np.array_equal(np.asarray(load_image(src)), np.asarray(img))
    la = Image.new("LA", (3, 3), (7, 0))
    assert tuple(np.asarray(load_image(_png(la)))[1, 1]) == (255, 255, 255)
    i16 = Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16))
    assert tuple(np.asarray(load_image(_png(i16)))[1, 1]) == (255, 255, 255)


def _png_claiming(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels (a decompression bomb in 70 bytes)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_bad_images_raise_image_error(tmp_path) -> None:
    good = _png(_rand_image(64, 64, seed=1))
    text_file = tmp_path / "notes.png"
    text_file.write_text("just some text\n")
    cases = {
        "corrupt": bytes(random.randrange(256) for _ in range(300)),
        "truncated": good[: len(good) // 2],
        "header only": good[:40],
        "non-image file": text_file,
        "bomb header": _png_claiming(100_000, 100_000),         # PIL's own bomb guard
        "missing": tmp_path / "nope.jpg",
        "url": "https://example.com/cat.png",
        "bad base64": "data:image/png;base64,@@@",
        "not base64": "data:image/png,abc",
        "wrong type": 12345,
    }
    for name, src in cases.items():
        with pytest.raises(ImageError) as ei:
            load_image(src)
        assert ei.value.remedy, name
    with pytest.raises(ImageError, match="too large to decode safely"):
        load_image(cases["bomb header"])
    with pytest.raises(ImageError, match="81000000 pixels, above the limit of 64000000"):
        load_image(_png_claiming(9000, 9000))                   # our cap, before decoding
    with pytest.raises(ImageError, match="limit of 1000"):
        load_image(good, max_pixels=1000)
    with pytest.raises(ImageError, match="limit of 1000"):
        load_image(Image.new("RGB", (50, 50)), max_pixels=1000)


def test_extreme_aspect_ratios_are_refused_before_cropping(proc: Step3Processor,
                                                          monkeypatch) -> None:
    """A 200000x32 image's short side scales to 0 px (ImagePatcher's rule would divide by it);
    a 60000x32 one expands to 3024 crops, 251K tokens, over the context: both are ImageErrors
    raised before a crop is made. A 20000x64 one (336 crops) still runs."""
    with pytest.raises(ImageError, match="too thin") as ei:
        proc.preprocess(Image.new("RGB", (200_000, 32)))
    assert ei.value.remedy
    made: list[int] = []
    views = processor_module.image_views
    monkeypatch.setattr(processor_module, "image_views",
                        lambda img, *a: made.append(img.size) or views(img, *a))
    with pytest.raises(ImageError, match="3024 crops = 251,163 tokens, over the context of "
                                         "65,536") as ei:
        proc.preprocess(Image.new("RGB", (60_000, 32)))
    assert ei.value.remedy and not made
    assert proc.preprocess(Image.new("RGB", (20_000, 64))).num_crops == 336 and made


# ------------------------------------------------------------------------ processor
def test_processor_checks(ckpt, proc: Step3Processor) -> None:
    assert proc.stop_token_ids == [1, 128007]
    assert proc.image_token_id == IM_PATCH
    with pytest.raises(PromptError, match="1 <im_patch> placeholders but 0 images"):
        proc("<im_patch>", [])
    with pytest.raises(PromptError, match="0 <im_patch> placeholders but 1 images"):
        proc("text", [Image.new("RGB", (8, 8))])
    img = Image.new("RGB", (300, 200), (5, 6, 7))
    ids, (v,) = proc("x<im_patch>", img)                         # a bare image, not a list
    ids2, (v2,) = proc("x<im_patch>", [v])                       # ready ImageViews pass through
    assert ids == ids2 and v2 is v and len(ids) == 1 + 171
    data = Step3Config.preset("tiny").to_dict()
    data["image_token_id"] = 128000
    with pytest.raises(ConfigError, match="image_token_id"):
        Step3Processor.from_pretrained(ckpt, Step3Config.from_dict(data))


def test_apply_chat_end_to_end(proc: Step3Processor) -> None:
    img = Image.new("RGB", (640, 480), (0, 128, 255))
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image", "image": img},
                                         {"type": "text", "text": "Color?"}]}]
    ids, views = proc.apply_chat(msgs)
    assert ids[0] == 0
    assert ids[-2:] == [ID["<think>"], 3 + ord("\n")]
    assert len(views) == 1 and ids.count(IM_PATCH) == 169
    text = proc.decode(ids, skip_special_tokens=False)
    assert text.count("<im_patch>") == 169 and text.startswith("<｜begin▁of▁sentence｜>Be brief.")
    assert text.endswith("Color?<|EOT|><|BOT|>assistant\n<think>\n")
    assert proc.decode(ids) == "Be brief.user\nColor?assistant\n\n"


@pytest.mark.parametrize("size", [(1, 100000), (100000, 1), (9, 20000)])
def test_a_thin_image_gets_an_answer_without_allocating_its_square_pad(
        proc: Step3Processor, monkeypatch, size) -> None:
    rng = random.Random()
    colour = tuple(rng.randrange(1, 256) for _ in range(3))
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    assert len(buf.getvalue()) < 2000                     # a few hundred bytes on disk
    biggest = []
    real_new = Image.new

    def new(mode, sz, *a, **k):
        biggest.append(sz[0] * sz[1])
        return real_new(mode, sz, *a, **k)
    monkeypatch.setattr(processor_module.Image, "new", new)
    views = proc.preprocess(buf.getvalue())
    assert max(biggest) <= processor_module.MAX_IMAGE_SIZE ** 2
    assert views.global_view.shape == (3, 728, 728) and views.num_crops > 0
    black = torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    g = views.global_view
    assert torch.allclose(g[:, -1, -1], black, atol=1e-4)  # the pad is black ...
    assert (g[:, 0, 0] - black).abs().max() > 0.05         # ... and the image sits top-left


@pytest.mark.parametrize("w,h", [(0, 5), (5, -1), (2.5, 3), ("7", 7), (True, 4)])
def test_crop_plan_refuses_sizes_that_are_not_positive_integers(w, h) -> None:
    with pytest.raises(ImageError, match="not a pair of positive integers"):
        ImagePatcher().plan(w, h)


def test_undecodable_text_is_a_prompt_error(proc: Step3Processor) -> None:
    raw = bytes(random.Random().randrange(0x80, 0x100) for _ in range(5))
    text = "x" + raw.decode("utf-8", "surrogateescape")
    with pytest.raises(PromptError, match="not valid Unicode at position 1"):
        proc.encode(text)
    with pytest.raises(PromptError, match="not valid Unicode"):
        proc(text)


@pytest.mark.parametrize("kw,match", [
    ({"temperature": float("nan")}, "temperature nan"),
    ({"temperature": float("inf")}, "temperature inf"),
    ({"temperature": -0.5}, "temperature -0.5"),
    ({"top_k": -3}, "top_k -3"),
    ({"top_k": 2.5}, "top_k 2.5"),
    ({"top_p": float("nan")}, "top_p nan"),
    ({"top_p": 0.0}, "top_p 0.0"),
    ({"top_p": 1.5}, "top_p 1.5"),
])
def test_sampling_parameters_are_checked(kw, match) -> None:
    from step3_edge.sampling import SamplingParams

    with pytest.raises(PromptError, match=match):
        SamplingParams(**kw)


def test_seed_and_max_new_tokens_checks() -> None:
    from step3_edge.sampling import MAX_SEED, check_max_new_tokens, check_seed

    r = random.Random()
    seed = r.randrange(0, MAX_SEED)
    assert check_seed(seed) == seed and check_seed(None) is None
    for bad in (MAX_SEED + 1, -1, 1.5, "3", True):
        with pytest.raises(PromptError, match="seed"):
            check_seed(bad)
    ctx, prompt = r.randrange(100, 10000), r.randrange(1, 99)
    assert check_max_new_tokens(ctx - prompt, prompt, ctx) == ctx - prompt
    for bad in (0, -5, ctx - prompt + 1, 10**9, 2.0):
        with pytest.raises(PromptError, match=f"between 1 and {ctx - prompt:,}"):
            check_max_new_tokens(bad, prompt, ctx)
