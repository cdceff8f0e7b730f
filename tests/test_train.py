"""The training script's machinery (train/train_default.py): packed rows compute what the
reference model computes per question, and the two-stage schedule freezes the vision side."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
import train_default as T  # noqa: E402

from step3_edge.tasks import make_training_item  # noqa: E402
from step3_edge.tokenizer import THINK_END  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    merges = T.task_merges()
    cfg = T.model_config(vit_layers=1)
    model = T.Step3ForConditionalGeneration(cfg)
    T.init_weights(model, seed=3, vit_attn_gain=1.0)
    proc = T.compact_processor(cfg, merges)
    return model.eval(), proc, T.prompt_parts(proc), merges


def test_packed_rows_equal_separate_reference_forwards(setup):
    """Every question of a packed scene sees the image prefix and itself only, at the
    positions of its own prompt: its answer logits must equal a separate forward of the
    reference model over that prompt + answer (fp32; only summation order differs)."""
    model, proc, parts, _ = setup
    items = [make_training_item(5, i, 3) for i in range(2)]
    batch = T.pack(items, proc, parts)
    with torch.no_grad():
        packed, _ = T.forward_packed(model, batch)
    assert batch.n_questions == sum(len(it) for it in items) >= 4
    assert any(ex.thought for it in items for ex in it)        # thoughts are in the targets
    for q, ex in enumerate(e for it in items for e in it):
        ids, views = proc(parts[0] + ex.question + parts[1], [ex.image])
        target = proc.encode(T.target_text(ex.answer, ex.thought))
        with torch.no_grad():
            ref = model(torch.tensor([ids + target]), views)[0]                # [T, V]
        want = ref[len(ids) - 1:len(ids) - 1 + len(target)]
        got = packed[batch.question_of == q]
        assert torch.equal(batch.labels[batch.question_of == q], torch.tensor(target))
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    # and the rows really differ per question (a mask letting questions see each other fails)
    assert not torch.allclose(packed[batch.question_of == 0][0], packed[batch.question_of == 1][0])


def small_args(**kw: object) -> argparse.Namespace:
    """train_default's arguments for a 4-step run (2 per stage) of a 1-layer-ViT model."""
    args = dict(seed=0, steps=4, batch=1, questions=6, lr=2e-3, vision_lr=1e-3, warmup=1,
                weight_decay=0.01, bf16=False, threads=2, device="cpu", vit_layers=1, layers=4,
                vit_attn_gain=1.0, aux_weight=3.0, aux_layer=0, freeze_vision_at=2,
                eval_every=0, eval_n=0, log_every=0, token_shape_layer=0, probe_questions=True)
    return argparse.Namespace(**{**args, **kw})


def test_same_seed_same_weights(setup):
    """Training is reproducible from its seed: two runs through both stages give identical
    weights, and another seed gives others."""
    _, _, _, merges = setup

    def train(seed: int) -> dict[str, torch.Tensor]:
        tr = T.Trainer(small_args(seed=seed, steps=3), merges)
        tr.run()
        return {n: p.detach().clone() for n, p in tr.model.named_parameters()}

    a, b, c = train(0), train(0), train(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_two_stage_schedule_freezes_vision_and_asks_about_every_shape(setup):
    """Stage 1 trains the vision side; stage 2 leaves it bit-identical, trains the language
    model and the per-token probe, and asks the colour and shape of every shape."""
    _, _, _, merges = setup
    tr = T.Trainer(small_args(), merges)

    def snapshot(prefix: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in tr.model.named_parameters()
                if n.startswith(prefix)}

    vision = ("vision_model", "vit_")
    v0 = snapshot(vision)
    losses, _ = tr.run(0, 2)
    v1, lm1 = snapshot(vision), snapshot(("model.",))
    assert any(not torch.equal(v0[n], v1[n]) for n in v0)        # stage 1 trains vision
    assert tr.stage(1) == (0, 2, False) and tr.stage(2) == (2, 2, True)
    items, packed2 = tr.scenes(2)
    think_end = tr.proc.tokenizer.token_to_id(THINK_END)

    def first_labels(b: T.Packed) -> set[int]:
        return {int(b.labels[b.question_of == q][0]) for q in range(b.n_questions)}

    assert first_labels(tr.scenes(1)[1]) == {think_end}        # stage 1 answers directly
    assert first_labels(packed2) != {think_end}                # stage 2 thinks first
    n_shapes = len(items[0][0].shapes)
    kinds = [e.qtype for e in items[0]]
    assert kinds.count("colour") == kinds.count("shape") == n_shapes
    losses += tr.run(2, 4)[0]
    assert all(torch.isfinite(torch.tensor(losses)))
    v2, lm2 = snapshot(vision), snapshot(("model.",))
    assert all(torch.equal(v1[n], v2[n]) for n in v1)            # stage 2 leaves it alone
    assert any(not torch.equal(lm1[n], lm2[n]) for n in lm1)
    assert tr.frozen and all(not p.requires_grad for n, p in tr.model.named_parameters()
                             if n.startswith(vision))
    assert tr.token_head is not None and tr.token_head[0] == 0    # stage 2's per-token probe
    assert all(p.grad is not None for p in tr.token_head[1].parameters())


def test_questions_name_the_object_to_look_up(setup):
    """The probe's query labels: what a colour / shape / existence question names."""
    from step3_edge.tasks import COLOURS, SHAPES, make_example

    for i in range(30):
        ex = make_example(9, i)
        colour, shape = T.named_in_question(ex)
        if ex.qtype == "colour":
            assert colour == -1 and SHAPES[shape] in ex.question
            assert any(s.kind == SHAPES[shape] and s.colour == ex.answer for s in ex.shapes)
        elif ex.qtype == "shape":
            assert shape == -1 and list(COLOURS)[colour] in ex.question
        elif ex.qtype == "existence":
            assert f"{list(COLOURS)[colour]} {SHAPES[shape]}" in ex.question
        else:
            assert (colour, shape) == (-1, -1)
