"""Runtime fixtures: a `tiny` bf16 checkpoint whose lm_head favours printable byte tokens (so
that stop strings and streaming have text to work on), its bundle, the fp32 reference model and
its greedy answers. Session-scoped: built once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from runtime_helpers import FIXED_BW, reference_tokens

from step3_edge.config import Step3Config
from step3_edge.layout import expected_weights
from step3_edge.synth import random_weight, write_checkpoint

PRINTABLE = range(3 + 32, 3 + 127)   # byte tokens of ' '..'~' in the synthetic tokenizer
QUESTIONS = ["What is in this picture?", "Count to three.", "Name a colour", "hi"]


@pytest.fixture(scope="session")
def text_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = Step3Config.preset("tiny")
    weights = {s.name: random_weight(s, 77) for s in expected_weights(cfg).values()}
    head = weights["lm_head.weight"].float()
    keep = torch.zeros(head.shape[0], 1)
    keep[list(PRINTABLE)] = 4.0
    keep[1] = 2.0                                  # end of sentence, now and then
    weights["lm_head.weight"] = (head * keep).to(torch.bfloat16)
    out = tmp_path_factory.mktemp("rt") / "tiny-text"
    return write_checkpoint(cfg, out, "bf16", weights=weights, progress=False)


@pytest.fixture(scope="session")
def bundle(text_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bf16 bundle for one CPU device (no ONNX), 64K tokens of 1-byte KV in the plan."""
    from step3_edge.export.bundle import export_bundle

    return export_bundle(text_ckpt, "cpu", 1, tmp_path_factory.mktemp("rt") / "bundle",
                         scheme="bf16", kv_tokens=65536, cpu_mem_bytes=8 << 30, onnx=False,
                         progress=False)


@pytest.fixture(scope="session")
def ref_model(text_ckpt: Path):
    from step3_edge.model import Step3ForConditionalGeneration

    return Step3ForConditionalGeneration.from_pretrained(text_ckpt, dtype=torch.float32)


@pytest.fixture(scope="session")
def rt(bundle: Path):
    from step3_edge.runtime import Step3Runtime

    runtime = Step3Runtime.load(bundle, dtype="float32", device="cpu", bandwidths=FIXED_BW)
    yield runtime
    runtime.close()


@pytest.fixture(scope="session")
def prompts(rt) -> list[list[int]]:
    """Chat-template token ids of a few questions (different lengths)."""
    return [rt.processor.apply_chat([{"role": "user", "content": q}])[0] for q in QUESTIONS]


@pytest.fixture(scope="session")
def reference(ref_model, prompts, rt) -> list[list[int]]:
    return [reference_tokens(ref_model, p, rt.processor.stop_token_ids) for p in prompts]


@pytest.fixture(scope="session")
def onnx_bundle(text_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same checkpoint exported with its ONNX subgraphs (fp32 graphs; the export tests
    validate them, so validation is skipped here to keep the fixture quick)."""
    pytest.importorskip("onnxruntime")
    from step3_edge.export.bundle import export_bundle

    return export_bundle(text_ckpt, "cpu", 1, tmp_path_factory.mktemp("rt") / "onnx-bundle",
                         scheme="bf16", kv_tokens=65536, cpu_mem_bytes=8 << 30, onnx=True,
                         validate=False, trt=False, progress=False)
