"""The shapes task generator: determinism, and answers that match the drawn pixels."""

from __future__ import annotations

import numpy as np
import pytest

from step3_edge.chat import split_reasoning
from step3_edge.processor import ImagePatcher
from step3_edge.tasks import (COLOURS, QUESTION_TYPES, SHAPES, describe, make_example,
                              make_examples, make_training_item, normalize_answer, target_text)

N = 60


@pytest.fixture(scope="module")
def examples():
    return make_examples(7, N)


def colour_pixels(ex) -> dict[str, np.ndarray]:
    """Pixel coordinates [k, 2] (x, y) of every task colour present in the image."""
    arr = np.asarray(ex.image)                                            # [H, W, 3]
    out = {}
    for name, rgb in COLOURS.items():
        ys, xs = np.nonzero((arr == np.array(rgb, dtype=np.uint8)).all(-1))
        if len(xs) > 30:
            out[name] = np.stack([xs, ys], axis=1)
    return out


def test_deterministic_from_seed_and_index():
    a, b = make_example(3, 11), make_example(3, 11)
    assert (a.question, a.answer, a.qtype, a.shapes) == (b.question, b.answer, b.qtype, b.shapes)
    assert a.image.tobytes() == b.image.tobytes()
    c = make_example(4, 11)
    assert a.image.tobytes() != c.image.tobytes()
    first = [(e.question, e.answer) for e in make_training_item(0, 5)]
    assert first == [(e.question, e.answer) for e in make_training_item(0, 5)]


def test_training_items_never_repeat_eval_examples():
    train = make_training_item(1, 0)[0].image.tobytes()
    assert train != make_example(1, 0).image.tobytes()


def test_every_question_type_and_balanced_rotation(examples):
    assert [e.qtype for e in examples[:6]] == list(QUESTION_TYPES)
    assert {e.qtype for e in examples} == set(QUESTION_TYPES)
    with pytest.raises(ValueError):
        make_example(0, 0, "weather")


def test_answers_match_the_drawn_pixels(examples):
    for ex in examples:
        present = colour_pixels(ex)
        assert set(present) == {s.colour for s in ex.shapes}, ex.index   # distinct colours
        assert len({s.kind for s in ex.shapes}) == len(ex.shapes)
        assert 1 <= len(ex.shapes) <= 4
        for s in ex.shapes:                    # each shape's centre is painted in its colour
            assert ex.image.getpixel((round(s.cx), round(s.cy))) == COLOURS[s.colour]
        centre_x = {c: float(px[:, 0].mean()) for c, px in present.items()}
        if ex.qtype == "count":
            assert ex.answer == str(len(present))
        elif ex.qtype == "colour":
            kind = next(k for k in SHAPES if k in ex.question)
            assert ex.answer == next(s.colour for s in ex.shapes if s.kind == kind)
            assert ex.answer in present
        elif ex.qtype == "shape":
            colour = next(c for c in COLOURS if c in ex.question)
            assert colour in present
            assert ex.answer == next(s.kind for s in ex.shapes if s.colour == colour)
        elif ex.qtype == "position":
            assert len(ex.shapes) >= 2
            left = "left" in ex.question
            pick = (min if left else max)(centre_x, key=centre_x.get)
            assert ex.answer == next(s.kind for s in ex.shapes if s.colour == pick)
        elif ex.qtype == "existence":
            colour = next(c for c in COLOURS if f" {c} " in ex.question)
            kind = next(k for k in SHAPES if k in ex.question)
            want = any(s.colour == colour and s.kind == kind for s in ex.shapes)
            assert ex.answer == ("yes" if want else "no")
        elif ex.qtype == "describe":
            order = sorted(centre_x, key=centre_x.get)
            named = [next(c for c in COLOURS if f" {c} " in f" {part} ")
                     for part in ex.answer.replace(" and ", ", ").split(", ")]
            assert named == order


def test_existence_answers_both_ways():
    answers = {make_example(2, i, "existence").answer for i in range(40)}
    assert answers == {"yes", "no"}


def test_sizes_exercise_the_multi_crop_path():
    patcher = ImagePatcher()
    crops = [patcher.plan(*make_example(0, i, "count").image.size).num_crops for i in range(80)]
    assert sum(c == 0 for c in crops) > 30          # most: global view only
    assert sum(c > 0 for c in crops) >= 8           # some: 2..4 crops of 504 px
    sizes = {make_example(0, i).image.size for i in range(20)}
    assert len(sizes) == 20


def test_answer_format_and_normalization():
    assert target_text("red") == "</think>red<|EOT|>"
    assert target_text("red", "circle red") == "circle red</think>red<|EOT|>"
    assert normalize_answer("</think> Red.") == "red"
    assert normalize_answer("circle red</think> Red.") == "red"      # the answer, not the thought
    assert normalize_answer("circle red") == "circle red"             # no </think>: all answer
    assert normalize_answer("a  red circle") == "a red circle"
    assert split_reasoning("star blue </think>blue") == ("star blue", "blue")
    ex = make_example(0, 5, "describe")
    assert describe(ex.shapes) == ex.answer
    assert all(part.startswith(("a ", "an ")) for part in ex.answer.replace(" and ", ", ")
               .split(", "))


def test_thoughts_name_the_object_looked_up_and_what_is_there():
    for i in range(30):
        for qtype in ("colour", "shape"):
            ex = make_example(3, i, qtype)
            looked_up, found = ex.thought.split()
            assert found == ex.answer
            assert looked_up in ex.question                 # the word the question names
            assert any({s.kind, s.colour} == {looked_up, found} for s in ex.shapes)
        count = make_example(3, i, "count")
        listed = count.thought.split()
        assert len(listed) == int(count.answer)                # counting lists the colours
        assert listed == [c for c in COLOURS if c in {s.colour for s in count.shapes}]
        ex = make_example(3, i, "existence")
        kind, *found = ex.thought.split()
        assert kind in ex.question and found == [s.colour for s in ex.shapes if s.kind == kind]
        assert (ex.answer == "yes") == (bool(found) and found[0] in ex.question)
        for qtype in ("position", "describe"):
            assert make_example(3, i, qtype).thought == ""


def test_training_items_can_ask_about_every_shape():
    for i in range(6):
        one = make_training_item(2, i)
        every = make_training_item(2, i, every_shape=True)
        assert one[0].image.tobytes() == every[0].image.tobytes()
        shapes = every[0].shapes
        colour = {e.question: e.answer for e in every if e.qtype == "colour"}
        shape = {e.question: e.answer for e in every if e.qtype == "shape"}
        assert sorted(colour.values()) == sorted(s.colour for s in shapes)
        assert sorted(shape.values()) == sorted(s.kind for s in shapes)
        assert all(s.kind in q for q, s in zip(colour, shapes))
        assert all(s.colour in q for q, s in zip(shape, shapes))
        assert len(every) == len(one) + 2 * (len(shapes) - 1)
