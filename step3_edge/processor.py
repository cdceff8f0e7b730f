"""Step3 image preprocessing and prompt expansion (vLLM's step3_vl processor), without torchvision.

Per image: a global view resized to 728x728 and 0..36 crops of 504x504 cut by ImagePatcher.
The model consumes, per image, its crops (raster order, 81 features each) then its global view
(169 features), which is the order of the `<im_patch>` runs in `image_token_layout`.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import struct
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer

from step3_edge.chat import DEFAULT_CHAT_TEMPLATE, load_chat_template, render_chat
from step3_edge.config import Step3Config
from step3_edge.errors import ConfigError, ImageError, PromptError
from step3_edge.tokenizer import (EOS_TOKEN, EOT_TOKEN, IM_END, IM_START, IMAGE_TOKEN,
                                  PATCH_END, PATCH_NEWLINE, PATCH_START, THINK_END,
                                  load_tokenizer, tokenizer_from_file)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROP_SIZE = 504             # ImagePatcher: crops are cut with 504 px windows and resized to 504x504
GLOBAL_SIZE = 728           # ImagePatcher: the global view (= vision_config.image_size)
MAX_IMAGE_SIZE = 3024       # ImagePatcher: longer sides are scaled down to this
CROP_TOKENS = 81            # tokens of a 504 crop; Step3Processor reads them from the config
GLOBAL_TOKENS = 169         # tokens of the 728 global view
DEFAULT_MAX_PIXELS = 64_000_000  # decompression-bomb cap of load_image
MAX_PADDED_PIXELS = 16_000_000   # above, a thin image's square pad is never allocated
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error,
                  Image.DecompressionBombError)
_ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")


# ---------------------------------------------------------------------------- loading
def _describe(src: Any) -> str:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    if isinstance(src, str) and src.startswith("data:"):
        return f"data URI ({len(src)} chars, {src[:30]}...)"
    if isinstance(src, Image.Image):
        return f"<PIL {src.mode} image>"
    return repr(str(src)) if isinstance(src, (str, Path)) else f"<{type(src).__name__}>"


def _open_source(src: Any, name: str) -> Any:
    """A path or a binary file object for PIL."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(src))
    if isinstance(src, str) and src.startswith("data:"):
        header, sep, payload = src.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ImageError(f"{name} is not a base64 data URI",
                             "use data:image/<type>;base64,<data>")
        try:
            return io.BytesIO(base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError) as e:
            raise ImageError(f"{name} holds invalid base64: {e}",
                             "re-encode the image with base64.b64encode") from e
    if isinstance(src, str) and src.startswith(("http://", "https://")):
        raise ImageError(f"{name} is a remote URL; step3-edge does not fetch URLs",
                         "download the image and pass its path or bytes")
    if isinstance(src, (str, Path)):
        path = Path(str(src).removeprefix("file://")).expanduser()
        if not path.is_file():
            raise ImageError(f"image file {name} does not exist or is not a file",
                             "check the path")
        return path
    raise ImageError(f"cannot read an image from a {type(src).__name__}",
                     "pass a path, bytes, a data:image/...;base64 URI or a PIL image")


def _check_pixels(size: tuple[int, int], max_pixels: int, name: str) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageError(f"image {name} is empty ({w}x{h})", "pass a non-empty image")
    if w * h > max_pixels:
        raise ImageError(f"image {name} is {w}x{h} = {w * h} pixels, above the limit of "
                         f"{max_pixels} (decompression-bomb guard)",
                         "downscale the image, or raise max_pixels if you trust the source")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> a new RGB image. Transparency is composited on white (as vLLM does);
    16/32-bit grey is scaled from the 16-bit range to 8 bits (PIL would clip it)."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)                          # [H, W]
        if mode.startswith("I;16") or arr.max(initial=0.0) > 255:
            arr = arr / 257.0
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB") if mode != "RGB" else img.copy()


def load_image(src: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `src` (path, bytes, data:image/...;base64 URI, or PIL image) into an RGB image.

    The size is checked against `max_pixels` before any pixel data is decoded; PIL's own bomb
    guard (2x Image.MAX_IMAGE_PIXELS) still applies above that. Raises ImageError naming the
    source for unreadable, truncated, non-image or oversized input.
    """
    name = _describe(src)
    try:
        if isinstance(src, Image.Image):
            _check_pixels(src.size, max_pixels, name)
            return _to_rgb(src)
        fp = _open_source(src, name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp)
        with im:
            _check_pixels(im.size, max_pixels, name)
            im.load()
            return _to_rgb(im)
    except Image.DecompressionBombError as e:
        raise ImageError(f"image {name} is too large to decode safely: {e}",
                         "downscale the image before passing it") from e
    except _DECODE_ERRORS as e:
        raise ImageError(f"cannot decode image {name}: {type(e).__name__}: {e}",
                         "pass a complete PNG, JPEG, WebP, GIF, BMP or TIFF image in a mode "
                         "PIL can convert to RGB") from e


def check_text(text: Any) -> None:
    """PromptError unless `text` is a str that is valid Unicode (no lone surrogates: the
    undecodable bytes of a command-line argument)."""
    if not isinstance(text, str):
        raise PromptError(f"text must be a str, got {type(text).__name__}",
                          "pass the prompt as a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"the prompt holds a character that is not valid Unicode at "
                          f"position {e.start} ({text[e.start:e.end]!a}: an undecodable byte)",
                          "pass UTF-8 text (check the terminal's or file's encoding)") from None


# ---------------------------------------------------------------------------- cropping
@dataclass(frozen=True)
class CropPlan:
    """Size arithmetic of ImagePatcher for one image, before any pixel work."""

    padded: tuple[int, int]      # (w, h) after step 1 (square pad of tiny extreme images)
    resized: tuple[int, int]     # (w, h) after step 2 (long side <= 3024); the global image
    window: int                  # step 3; 0 = no crops
    canvas: tuple[int, int]      # (w, h) the image is resized to before tiling (step 4)
    boxes: tuple[tuple[int, int, int, int], ...]  # (left, top, right, bottom), raster order
    grid: tuple[int, int]        # (rows, cols); (0, 0) when no crops

    @property
    def num_crops(self) -> int:
        return len(self.boxes)

    @property
    def num_newlines(self) -> int:  # one after each row of crops but the last
        return self.grid[0] - 1 if self.boxes else 0


class ImagePatcher:
    """Step3's multi-crop rule (vLLM's step3_vl ImagePatcher).

    `crop_threshold_inclusive=False` (default) follows current vLLM: an image whose long side is
    `< global_size` is not cropped (unless its aspect ratio is > 1.5), so 728x728 gets 2x2
    crops. `True` follows SGLang (and older vLLM revisions): `long <= global_size`, so 728x728
    gets none; StepFun's deploy guide ("exceeds 728x728") reads like SGLang. Which one the HF
    reference uses is UNCONFIRMED.
    """

    def __init__(self, crop_threshold_inclusive: bool = False, global_size: int = GLOBAL_SIZE,
                 crop_size: int = CROP_SIZE, max_image_size: int = MAX_IMAGE_SIZE) -> None:
        self.crop_threshold_inclusive = crop_threshold_inclusive
        self.global_size = global_size
        self.crop_size = crop_size
        self.max_image_size = max_image_size

    def window_size(self, long: int, short: int) -> int:
        """Step 3: crop window side, 0 for no crops."""
        small = long <= self.global_size if self.crop_threshold_inclusive \
            else long < self.global_size
        if small:
            return short if long / short > 1.5 else 0
        return min(short, self.crop_size) if long / short > 4 else self.crop_size

    @staticmethod
    def _canvas_side(d: int, window: int) -> int:
        ratio = d / window
        if ratio < 1:
            return d
        n = int(ratio) + 1 if ratio - d // window > 0.2 else int(ratio)
        return window * n

    @staticmethod
    def _starts(d: int, window: int) -> list[int]:
        n = 1 if d <= window else math.ceil((d - window) / window + 1)
        starts = [window * i for i in range(n)]
        if len(starts) > 1 and starts[-1] + window > d:
            starts[-1] = d - window       # last tile shifted back to end at the border
        return starts

    def plan(self, width: int, height: int) -> CropPlan:
        """Crop plan for an image of `width` x `height` pixels."""
        for side in (width, height):
            if isinstance(side, bool) or not isinstance(side, int) or not 1 <= side <= 2**31:
                raise ImageError(f"image size {width!r}x{height!r} is not a pair of positive "
                                 "integers", "pass a non-empty image")
        w, h = width, height
        ratio = w / h
        if min(w, h) < 32 and (ratio > 4 or ratio < 1 / 4):
            w = h = max(w, h)
        padded = (w, h)
        if max(w, h) > self.max_image_size:
            scale = self.max_image_size / max(w, h)
            w, h = int(w * scale), int(h * scale)
            if min(w, h) < 1:
                raise ImageError(f"image {width}x{height} is too thin: capping its long side at "
                                 f"{self.max_image_size} px leaves its short side under 1 px",
                                 "crop it, or pad it towards a square")
        resized = (w, h)
        window = self.window_size(max(w, h), min(w, h))
        if window == 0:
            return CropPlan(padded, resized, 0, resized, (), (0, 0))
        cw, ch = self._canvas_side(w, window), self._canvas_side(h, window)
        xs, ys = self._starts(cw, window), self._starts(ch, window)
        boxes = tuple((x, y, x + window, y + window) for y in ys for x in xs)
        return CropPlan(padded, resized, window, (cw, ch), boxes, (len(ys), len(xs)))

    def __call__(self, img: Image.Image) -> tuple[Image.Image, list[Image.Image], CropPlan]:
        """(global image, crops in raster order, plan) for an RGB image."""
        plan = self.plan(*img.size)
        if plan.padded != img.size and \
                plan.padded[0] * plan.padded[1] > MAX_PADDED_PIXELS:
            # A thin image whose square pad would be huge (1x100000 -> 10^10 pixels): scale the
            # image itself by the pad's resize factor and paste it on the black square of the
            # resized size, so nothing larger than the resized view is allocated.
            s = plan.resized[0] / plan.padded[0]
            small = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))),
                               Image.Resampling.BILINEAR)
            img = Image.new(img.mode, plan.resized, 0)
            img.paste(small, (0, 0))
        elif plan.padded != img.size:  # black square, image top-left
            padded = Image.new(img.mode, plan.padded, 0)
            padded.paste(img, (0, 0))
            img = padded
        if plan.resized != img.size:
            img = img.resize(plan.resized, Image.Resampling.BILINEAR)
        if not plan.boxes:
            return img, [], plan
        # Both engines compare the canvas with the size *before* the <=3024 rescale (kept).
        src = img if plan.canvas == plan.padded else \
            img.resize(plan.canvas, Image.Resampling.BILINEAR)
        # A box may reach past a side shorter than the window; PIL fills that part with black.
        return img, [src.crop(box) for box in plan.boxes], plan


# ---------------------------------------------------------------------------- pixels
def to_pixel_values(img: Image.Image, size: int) -> torch.Tensor:
    """ToTensor -> Normalize(CLIP) -> Resize((size, size), bilinear, antialias) like the
    torchvision pipeline of vLLM, normalization before the resize. -> [3, size, size] float32."""
    arr = np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)  # [H, W, 3]
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div(255)  # [3, H, W]
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]           # [3, 1, 1]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]             # [3, 1, 1]
    x = x.sub(mean).div(std)                                                     # [3, H, W]
    if tuple(x.shape[1:]) != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)[0]                                     # [3, S, S]
    return x.contiguous()


@dataclass
class ImageViews:
    """One image ready for the vision tower; features run crops (raster) then global view."""

    global_view: torch.Tensor   # [3, 728, 728] float32, normalized
    crops: torch.Tensor         # [n_crops, 3, 504, 504] float32 (n_crops may be 0)
    grid: tuple[int, int]       # (rows, cols) of crops; (0, 0) when none
    crop_tokens: int = CROP_TOKENS      # features per crop (cfg.vision_tokens(504))
    global_tokens: int = GLOBAL_TOKENS  # features of the global view (cfg.vision_tokens(728))

    @property
    def num_crops(self) -> int:
        return int(self.crops.shape[0])

    @property
    def num_image_features(self) -> int:
        """`<im_patch>` positions this image fills."""
        return self.num_crops * self.crop_tokens + self.global_tokens

    @property
    def num_tokens(self) -> int:
        """Prompt tokens of this image: crops*(crop_tokens+2) + newlines + global_tokens+2."""
        newlines = self.grid[0] - 1 if self.num_crops else 0
        return self.num_crops * (self.crop_tokens + 2) + newlines + self.global_tokens + 2


def image_token_layout(grid: tuple[int, int], crop_tokens: int = CROP_TOKENS,
                       global_tokens: int = GLOBAL_TOKENS) -> list[str]:
    """Token strings that replace one `<im_patch>` placeholder (vLLM's step3_vl)."""
    rows, cols = grid
    n = rows * cols
    out: list[str] = []
    for i in range(n):
        out += [PATCH_START, *[IMAGE_TOKEN] * crop_tokens, PATCH_END]
        if (i + 1) % cols == 0 and i != n - 1:
            out.append(PATCH_NEWLINE)
    out += [IM_START, *[IMAGE_TOKEN] * global_tokens, IM_END]
    return out


def image_views(img: Image.Image, patcher: ImagePatcher, crop_tokens: int = CROP_TOKENS,
                global_tokens: int = GLOBAL_TOKENS) -> ImageViews:
    """Crop and normalize one RGB image into its ImageViews."""
    glob, crops, plan = patcher(img)
    g = to_pixel_values(glob, patcher.global_size)                               # [3, G, G]
    c = torch.stack([to_pixel_values(p, patcher.crop_size) for p in crops]) if crops else \
        torch.zeros(0, 3, patcher.crop_size, patcher.crop_size)                  # [n, 3, C, C]
    return ImageViews(g, c, plan.grid, crop_tokens, global_tokens)


# ---------------------------------------------------------------------------- processor
class Step3Processor:
    """Tokenizer + chat template + image preprocessing for one Step3 checkpoint."""

    def __init__(self, tokenizer: Tokenizer, cfg: Step3Config, chat_template: str | None = None,
                 crop_threshold_inclusive: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.chat_template = chat_template
        self.max_pixels = max_pixels
        size = cfg.vision_config.image_size                 # 728: global view, crop threshold
        self.global_tokens, self.crop_tokens = cfg.vision_tokens(size), cfg.vision_tokens(CROP_SIZE)
        self.patcher = ImagePatcher(crop_threshold_inclusive, global_size=size, crop_size=CROP_SIZE)
        self._ids: dict[str, int] = {}
        for token in (IMAGE_TOKEN, IM_START, IM_END, PATCH_START, PATCH_END, PATCH_NEWLINE):
            tid = tokenizer.token_to_id(token)
            if tid is None:
                raise ConfigError(f"the tokenizer has no {token} token",
                                  "use the Step3 tokenizer.json (it defines the image tokens)")
            self._ids[token] = tid
        if self._ids[IMAGE_TOKEN] != cfg.image_token_id:
            raise ConfigError(f"tokenizer maps {IMAGE_TOKEN} to id {self._ids[IMAGE_TOKEN]}, "
                              f"but config.json image_token_id is {cfg.image_token_id}",
                              "the tokenizer and config.json come from different checkpoints; "
                              "make them agree")

    @classmethod
    def from_pretrained(cls, folder: str | Path, cfg: Step3Config | None = None,
                        **kwargs: Any) -> Step3Processor:
        """Load tokenizer.json, the chat template and (unless given) config.json from `folder`.
        In a bundle (a folder with manifest.json) only the files its manifest names are read,
        and each must have the manifest's size."""
        cfg = cfg if cfg is not None else Step3Config.from_pretrained(folder)
        marker = Path(folder) / "manifest.json"
        if marker.exists() or marker.is_symlink():
            from step3_edge.manifest import load_manifest

            m = load_manifest(folder)
            named = {a.path for a in m.artifacts}
            conf = m.path("tokenizer_config.json") if "tokenizer_config.json" in named else None
            template = load_chat_template(folder, conf) if conf else DEFAULT_CHAT_TEMPLATE
            return cls(tokenizer_from_file(m.path("tokenizer.json")), cfg, template, **kwargs)
        return cls(load_tokenizer(folder), cfg, load_chat_template(folder), **kwargs)

    # ------------------------------------------------------------------ text
    @property
    def image_token_id(self) -> int:
        return self._ids[IMAGE_TOKEN]

    @property
    def stop_token_ids(self) -> list[int]:
        """End-of-sentence and end-of-turn (`<|EOT|>`) ids that end generation."""
        ids = [self.tokenizer.token_to_id(EOS_TOKEN), self.cfg.text_config.eos_token_id,
               self.tokenizer.token_to_id(EOT_TOKEN)]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in it map to their ids."""
        check_text(text)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (a list or 1-D tensor); ids outside the vocabulary are skipped.
        Skipping special tokens keeps `</think>`: it separates the model's reasoning from its
        answer (`step3_edge.chat.split_reasoning`)."""
        ids = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else ids
        ids = [int(i) for i in ids if 0 <= int(i) < 2**32]
        end = self.tokenizer.token_to_id(THINK_END)
        if skip_special_tokens and end in ids:
            k = len(ids) - 1 - ids[::-1].index(end)
            return self.decode(ids[:k]) + THINK_END + self.decode(ids[k + 1:])
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ images
    def num_image_tokens(self, width: int, height: int) -> int:
        """Prompt tokens one image of `width` x `height` expands to."""
        return self._plan_tokens(self.patcher.plan(width, height))

    def _plan_tokens(self, plan: CropPlan) -> int:
        return (plan.num_crops * (self.crop_tokens + 2) + plan.num_newlines
                + self.global_tokens + 2)

    def preprocess(self, image: Any) -> ImageViews:
        """Load (see `load_image`) and crop one image into its ImageViews. An image whose
        tokens alone exceed the context is refused before any crop is made (the crop rule has
        no upper bound: a 64x20000 image gives 336 crops, 28,059 tokens, 1 GB of pixels)."""
        img = load_image(image, self.max_pixels)
        plan = self.patcher.plan(*img.size)
        n, ctx = self._plan_tokens(plan), self.cfg.text_config.max_context
        if n > ctx:
            raise ImageError(f"image {img.size[0]}x{img.size[1]} expands to "
                             f"{plan.num_crops} crops = {n:,} tokens, "
                             f"over the context of {ctx:,}",
                             "crop the image, or scale or pad it towards a square")
        return image_views(img, self.patcher, self.crop_tokens, self.global_tokens)

    def image_token_ids(self, views: ImageViews) -> list[int]:
        """Ids that replace the image's `<im_patch>` placeholder."""
        layout = image_token_layout(views.grid, self.crop_tokens, self.global_tokens)
        return [self._ids[t] for t in layout]

    def __call__(self, text: str, images: Sequence[Any] = ()) -> tuple[list[int],
                                                                        list[ImageViews]]:
        """Token ids of `text` with each `<im_patch>` placeholder expanded for its image, and the
        ImageViews in placeholder order. Images are load_image sources or ready ImageViews."""
        if isinstance(images, (str, bytes, bytearray, Path, Image.Image, ImageViews)):
            images = [images]                       # one image given bare
        images = list(images)
        check_text(text)
        pieces = text.split(IMAGE_TOKEN)
        if len(pieces) - 1 != len(images):
            raise PromptError(f"the text holds {len(pieces) - 1} {IMAGE_TOKEN} placeholders "
                              f"but {len(images)} images were given",
                              f"put exactly one {IMAGE_TOKEN} in the text per image")
        views = [im if isinstance(im, ImageViews) else self.preprocess(im) for im in images]
        ids = self.encode(pieces[0])
        for v, piece in zip(views, pieces[1:]):
            ids += self.image_token_ids(v)
            ids += self.encode(piece)
        return ids, views

    def apply_chat(self, messages: list[dict[str, Any]],
                   add_generation_prompt: bool = True) -> tuple[list[int], list[ImageViews]]:
        """Render `messages` with the chat template, then tokenize and expand the images."""
        text, images = render_chat(messages, self.chat_template, add_generation_prompt)
        return self(text, images)
