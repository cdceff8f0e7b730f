"""The shapes task: deterministic, seeded images of simple shapes with short-answer questions.

Example `i` of seed `s` depends only on (s, i), so training (seed 0) and the held-out
evaluation (another seed) are reproducible and never share a draw. Each image holds 1-4
non-overlapping shapes, all of different kinds and different colours (so every question has one
exact answer), on a plain or noisy background, at varied sizes and aspect ratios: most images
take the single 728 px global view, wide/tall and large ones also go through the multi-crop path.

Answers are short and exact: a colour ("red"), a shape ("star"), a digit ("3"), "yes"/"no",
or a left-to-right description ("a red circle and a blue square"). In the Step3 chat format the
prompt ends with `<think>\\n`; the model thinks, writes `</think>`, the answer and `<|EOT|>`
(`target_text`). The thought is a few words, one lookup each (`Example.thought`): the object
a colour / shape / existence question names and what is there ("triangle purple"), the
colours present for counting, nothing for position and describe. Exact match compares the
answer after `</think>` (`normalize_answer`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from step3_edge.chat import split_reasoning
from step3_edge.tokenizer import EOT_TOKEN, THINK_END

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 70, 220),
    "yellow": (235, 200, 20), "purple": (140, 60, 190), "orange": (245, 130, 30),
}
QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "count", "position", "existence",
                                   "describe")
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (245, 245, 240), (255, 255, 255), (225, 225, 225), (200, 205, 210), (60, 60, 60),
    (25, 25, 30))
TRAIN_SEED = 0
EVAL_SEED = 1

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the {shape}?", "What color is the {shape}?",
               "Which colour is the {shape}?"),
    "shape": ("What shape is the {colour} object?", "What is the {colour} shape?",
              "Which shape is {colour}?"),
    "count": ("How many shapes are there?", "How many objects are in the image?",
              "Count the shapes."),
    "left": ("Which shape is on the left?", "What is the leftmost shape?"),
    "right": ("Which shape is on the right?", "What is the rightmost shape?"),
    "existence": ("Is there a {colour} {shape}?", "Is there a {colour} {shape} in the image?"),
    "describe": ("Describe the image.", "What is in this picture?", "What do you see?"),
}


@dataclass(frozen=True)
class Shape:
    """One drawn shape: kind, colour name, centre and radius in image pixels."""

    kind: str
    colour: str
    cx: float
    cy: float
    r: float


@dataclass(frozen=True)
class Example:
    """One image with one question and its exact answer."""

    seed: int
    index: int
    image: Image.Image
    shapes: tuple[Shape, ...]
    qtype: str
    question: str
    answer: str

    @property
    def thought(self) -> str:
        """What the model writes inside `<think>` before the answer, one lookup per word:
        colour / shape / existence questions name the object looked up and what is there
        ("triangle purple" for "What colour is the triangle?"; "circle" alone when an asked-for
        circle is absent), counting lists the colours present in `COLOURS` order ("red blue");
        empty for the other types."""
        colour, kind = self.named
        if self.qtype in ("colour", "shape"):
            return f"{kind or colour} {self.answer}"
        if self.qtype == "existence":
            return " ".join([kind, *(s.colour for s in self.shapes if s.kind == kind)])
        if self.qtype == "count":
            return " ".join(c for c in COLOURS if any(s.colour == c for s in self.shapes))
        return ""

    @property
    def named(self) -> tuple[str | None, str | None]:
        """(colour, shape) the question names, None where it names none: the object a colour,
        shape or existence question's answer is looked up on."""
        if self.qtype == "colour":
            return None, next(s.kind for s in self.shapes if s.colour == self.answer)
        if self.qtype == "shape":
            return next(s.colour for s in self.shapes if s.kind == self.answer), None
        if self.qtype == "existence":
            words = self.question.rstrip("?").split()
            return (next(c for c in COLOURS if c in words), next(k for k in SHAPES if k in words))
        return None, None

    def messages(self) -> list[dict[str, Any]]:
        """The user turn in chat-message form (image first, then the question)."""
        return [{"role": "user", "content": [{"type": "image", "image": self.image},
                                             {"type": "text", "text": self.question}]}]


def target_text(answer: str, thought: str = "") -> str:
    """What the model is trained to write after the prompt (which ends with `<think>\\n`):
    `thought</think>answer<|EOT|>`."""
    return f"{thought}{THINK_END}{answer}{EOT_TOKEN}"


def normalize_answer(text: str) -> str:
    """Canonical form for exact match: the answer after `</think>` (`split_reasoning`), without
    case, outer space and dots."""
    return " ".join(split_reasoning(text)[1].strip().strip(".").lower().split())


def describe(shapes: tuple[Shape, ...] | list[Shape]) -> str:
    """Left-to-right description: 'a red circle', 'a red circle and an orange star', ..."""
    parts = [f"{'an' if s.colour[0] in 'aeiou' else 'a'} {s.colour} {s.kind}"
             for s in sorted(shapes, key=lambda s: s.cx)]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def task_texts() -> list[str]:
    """Every question wording (each template with every colour and shape) and every answer
    form of the task, with the task's word frequencies: a corpus for a tokenizer's merges."""
    pairs = [(c, k) for c in COLOURS for k in SHAPES]
    out = [t.format(colour=c, shape=k) for ts in _TEMPLATES.values() for t in ts for c, k in pairs]
    out += [*COLOURS, *SHAPES, "yes", "no", *(str(n) for n in range(1, 5))] * len(pairs)
    for n in range(1, 5):      # descriptions of n shapes
        out += [describe([Shape(k, c, x, 0.0, 1.0) for x, (c, k) in
                          enumerate(pairs[i:i + n * 7:7])]) for i in range(len(pairs))]
    return out


# ---------------------------------------------------------------------------- drawing
def _image_size(rng: random.Random) -> tuple[int, int]:
    u = rng.random()
    if u < 0.70:            # global view only: long side < 728, aspect <= 1.5
        long, aspect = rng.randint(280, 727), rng.uniform(1.0, 1.5)
    elif u < 0.90:          # aspect > 1.5: crops with a window of the short side
        long, aspect = rng.randint(420, 727), rng.uniform(1.6, 2.2)
    else:                   # long side >= 728: 504 px crops (2-4)
        long, aspect = rng.randint(728, 1100), rng.uniform(1.0, 1.5)
    short = max(160, round(long / aspect))
    return (long, short) if rng.random() < 0.6 else (short, long)


def _polygon(kind: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def pts(radii: list[float], n: int, start: float) -> list[tuple[float, float]]:
        return [(cx + radii[i % len(radii)] * math.cos(start + 2 * math.pi * i / n),
                 cy + radii[i % len(radii)] * math.sin(start + 2 * math.pi * i / n))
                for i in range(n)]
    if kind == "square":
        return pts([r * 0.9 * math.sqrt(2)], 4, math.pi / 4 + rot)
    if kind == "triangle":
        return pts([r * 1.1], 3, -math.pi / 2 + rot)
    if kind == "star":
        return pts([r * 1.1, r * 0.45], 10, -math.pi / 2 + rot)
    if kind == "cross":
        a, b = r * 0.95, r * 0.33
        base = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a),
                (-b, b), (-a, b), (-a, -b), (-b, -b)]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in base]
    raise ValueError(kind)


def _draw(size: tuple[int, int], shapes: tuple[Shape, ...], rng: random.Random,
          noise_seed: list[int]) -> Image.Image:
    w, h = size
    bg = rng.choice(BACKGROUNDS)
    noisy = rng.random() < 0.4
    if noisy:
        amp = rng.choice((12, 25, 40))
        arr = np.random.default_rng(noise_seed).normal(0.0, amp, (h, w, 3)) + np.array(bg)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    else:
        img = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(img)
    for s in shapes:
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            d.ellipse((s.cx - s.r, s.cy - s.r, s.cx + s.r, s.cy + s.r), fill=fill)
        else:
            rot = rng.uniform(-0.25, 0.25) if s.kind != "cross" else rng.uniform(-0.3, 0.3)
            d.polygon(_polygon(s.kind, s.cx, s.cy, s.r, rot), fill=fill)
    return img


def _layout(rng: random.Random, size: tuple[int, int], n: int) -> tuple[Shape, ...] | None:
    w, h = size
    short = min(w, h)
    kinds = rng.sample(SHAPES, n)
    colours = rng.sample(list(COLOURS), n)
    scale = (0.10, 0.17) if n <= 2 else (0.08, 0.14)
    placed: list[Shape] = []
    for kind, colour in zip(kinds, colours):
        for _ in range(60):
            r = rng.uniform(*scale) * short
            cx, cy = rng.uniform(r + 4, w - r - 4), rng.uniform(r + 4, h - r - 4)
            if all(math.hypot(cx - p.cx, cy - p.cy) > 1.25 * (r + p.r) + 6 for p in placed):
                placed.append(Shape(kind, colour, cx, cy, r))
                break
        else:
            return None
    return tuple(placed)


def _unambiguous_x(shapes: tuple[Shape, ...], size: tuple[int, int]) -> bool:
    xs = sorted(s.cx for s in shapes)
    return all(b - a > 0.08 * size[0] for a, b in zip(xs, xs[1:]))


def cell_labels(image: Image.Image, shapes: tuple[Shape, ...], grid: int = 13,
                view: int = 728, cover: float = 0.2) -> np.ndarray:
    """Which shape each vision token of the global view mostly shows -> [grid, grid] ints
    (index into `shapes`, -1 for background), from the drawn pixels.

    The image is resized to the `view` x `view` global view; token (i, j) of the 13 x 13 grid
    (two stride-2 convs over 28 px cells) is centred at pixel 56 i + 14 and here sees the 56 px
    window around that centre; a shape covering >= `cover` of the window labels the token.
    """
    cell = view // grid
    arr = np.asarray(image.resize((view, view), Image.Resampling.NEAREST)).astype(np.int32)
    rgb = (arr[..., 0] << 16) | (arr[..., 1] << 8) | arr[..., 2]                # [V, V]
    shift = cell // 4                        # windows [56 i - 14, 56 i + 42), clipped at 0
    rgb = np.pad(rgb, ((shift, 0), (shift, 0)), constant_values=-1)[:view, :view]
    counts = np.stack([(rgb == (r << 16 | g << 8 | b)).reshape(grid, cell, grid, cell)
                       .sum(axis=(1, 3)) for r, g, b in (COLOURS[s.colour] for s in shapes)]
                      ) if shapes else np.zeros((1, grid, grid), dtype=np.int64)  # [K, g, g]
    best = counts.argmax(0)                                                   # [g, g]
    area = np.full((grid, grid), cell * cell)
    area[0, :] -= shift * cell
    area[:, 0] -= shift * cell
    area[0, 0] += shift * shift
    ok = np.take_along_axis(counts, best[None], 0)[0] >= cover * area
    return np.where(ok & (len(shapes) > 0), best, -1)


# ---------------------------------------------------------------------------- questions
def _question(rng: random.Random, qtype: str, shapes: tuple[Shape, ...],
              pick: Shape | None = None) -> tuple[str, str]:
    """A question of `qtype` about the scene and its exact answer; colour, shape and existence
    questions are about `pick` (drawn from the scene when None)."""
    pick = rng.choice(shapes) if pick is None else pick
    if qtype == "colour":
        return rng.choice(_TEMPLATES["colour"]).format(shape=pick.kind), pick.colour
    if qtype == "shape":
        return rng.choice(_TEMPLATES["shape"]).format(colour=pick.colour), pick.kind
    if qtype == "count":
        return rng.choice(_TEMPLATES["count"]), str(len(shapes))
    if qtype == "position":
        side = rng.choice(("left", "right"))
        ordered = sorted(shapes, key=lambda s: s.cx)
        target = ordered[0] if side == "left" else ordered[-1]
        return rng.choice(_TEMPLATES[side]), target.kind
    if qtype == "existence":
        present = {(s.colour, s.kind) for s in shapes}
        if rng.random() < 0.5:
            colour, kind = pick.colour, pick.kind
        else:   # a hard negative: a colour and a shape that are both in the image when possible
            options = [(c, k) for c in {s.colour for s in shapes} for k in {s.kind for s in shapes}
                       if (c, k) not in present]
            if not options:
                options = [(c, k) for c in COLOURS for k in SHAPES if (c, k) not in present]
            colour, kind = rng.choice(sorted(options))
        answer = "yes" if (colour, kind) in present else "no"
        return rng.choice(_TEMPLATES["existence"]).format(colour=colour, shape=kind), answer
    if qtype == "describe":
        return rng.choice(_TEMPLATES["describe"]), describe(shapes)
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


@dataclass(frozen=True)
class Scene:
    """One drawn image and the shapes in it."""

    seed: int
    index: int
    image: Image.Image
    shapes: tuple[Shape, ...]

    def valid_types(self) -> tuple[str, ...]:
        """Question types with one exact answer here (position needs >= 2 shapes, apart in x)."""
        ok = len(self.shapes) >= 2 and _unambiguous_x(self.shapes, self.image.size)
        return tuple(t for t in QUESTION_TYPES if t != "position" or ok)


def _scene(rng: random.Random, seed: int, index: int, need_position: bool,
           stream: int = 0) -> Scene:
    while True:
        size = _image_size(rng)
        n = rng.randint(2, 4) if need_position else rng.randint(1, 4)
        shapes = _layout(rng, size, n)
        if shapes is not None and (not need_position or _unambiguous_x(shapes, size)):
            break
    return Scene(seed, index, _draw(size, shapes, rng, [seed, index, stream]), shapes)


def make_example(seed: int, index: int, qtype: str | None = None) -> Example:
    """Example `index` of the task with `seed`; `qtype` forces the question type (else the
    type is drawn uniformly). The same (seed, index, qtype) always gives the same example."""
    rng = random.Random(f"step3-shapes:{seed}:{index}")
    qtype = qtype if qtype is not None else rng.choice(QUESTION_TYPES)
    if qtype not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")
    scene = _scene(rng, seed, index, qtype == "position")
    question, answer = _question(rng, qtype, scene.shapes)
    return Example(seed, index, scene.image, scene.shapes, qtype, question, answer)


def make_examples(seed: int, n: int, start: int = 0, balanced: bool = True,
                  types: tuple[str, ...] = QUESTION_TYPES) -> list[Example]:
    """`n` examples from index `start`; `balanced` cycles through `types` (default: every
    type) in order, else each example draws its type."""
    return [make_example(seed, i, types[i % len(types)] if balanced else None)
            for i in range(start, start + n)]


def make_training_item(seed: int, index: int, n_questions: int = len(QUESTION_TYPES),
                       every_shape: bool = False) -> list[Example]:
    """Several questions (distinct types, random order) about one scene, for training;
    `every_shape` asks the colour and shape questions once about every shape in the scene
    instead of once about a random one (more signal on the questions that need binding).

    Training draws these under a namespace of its own, so a training item never repeats an
    evaluation example even for the same seed and index."""
    rng = random.Random(f"step3-shapes-train:{seed}:{index}")
    scene = _scene(rng, seed, index, need_position=False, stream=1)
    types = rng.sample(scene.valid_types(), min(n_questions, len(scene.valid_types())))
    out = []
    for qtype in types:
        picks: tuple[Shape | None, ...] = (
            scene.shapes if every_shape and qtype in ("colour", "shape") else (None,))
        for pick in picks:
            question, answer = _question(rng, qtype, scene.shapes, pick)
            out.append(Example(seed, index, scene.image, scene.shapes, qtype, question, answer))
    return out
