"""The shipped default model: its format, and the CI accuracy gate (a small version of
`step3-edge eval --n 500`, whose targets are >= 95% colour/shape and >= 85% counting)."""

from __future__ import annotations

import json

import pytest

from step3_edge.defaults import SHIPPED

pytestmark = pytest.mark.skipif(
    not (SHIPPED / "config.json").is_file(),
    reason=f"no shipped default model at {SHIPPED} (run train/train_default.py to create it)")

N = 60   # the first 60 held-out examples: 10 of each question type


@pytest.fixture(scope="module")
def report():
    from step3_edge.evaluate import ReferenceAnswerer, evaluate
    from step3_edge.tasks import EVAL_SEED, make_examples

    return evaluate(ReferenceAnswerer(SHIPPED), make_examples(EVAL_SEED, N), progress=False)


def test_shipped_checkpoint_is_small_block_fp8_with_compact_tokenizer():
    from step3_edge.config import Step3Config
    from step3_edge.processor import Step3Processor

    cfg = Step3Config.from_pretrained(SHIPPED)
    q = json.loads((SHIPPED / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "fp8" and q["weight_block_size"] == [128, 128]
    size = sum(f.stat().st_size for f in SHIPPED.glob("*.safetensors"))
    assert size < 8 * 2**20
    t = cfg.text_config
    assert t.moe_num_experts >= 8 and t.moe_top_k == 3 and t.num_attention_groups == 1
    assert not t.is_moe(0) and not t.is_moe(t.num_hidden_layers - 1)
    assert cfg.vision_config.image_size == 728 and cfg.vision_config.patch_size == 14
    proc = Step3Processor.from_pretrained(SHIPPED, cfg)       # checks <im_patch> == config id
    assert max(proc.tokenizer.get_vocab().values()) < t.vocab_size
    for name in ("loss.png", "training.json", "tokenizer.json"):
        assert (SHIPPED / name).is_file()


def test_accuracy_gate(report):
    acc = report.per_type()
    # n = 10 per type: allow one miss on colour or shape (95% target), two on counting (85%).
    assert acc["colour"]["correct"] + acc["shape"]["correct"] >= 19, report.table()
    assert acc["count"]["correct"] >= 8, report.table()
    assert acc["all"]["accuracy"] >= 0.6, report.table()     # 70.8 % on 500 (README)


def test_answers_are_a_thought_then_clean_text(report):
    from step3_edge.chat import split_reasoning

    for r in report.records:
        assert r["got"].count("</think>") == 1, r            # it thinks, then answers
        thought, answer = split_reasoning(r["got"])
        assert "<|" not in r["got"] and answer and answer == answer.strip(), r
        assert bool(thought) == (r["qtype"] in ("colour", "shape", "existence", "count")), r
