"""The ONNX Runtime backend (the bundle's exported subgraphs behind the runtime's worker
interface): greedy tokens equal the reference's, alone, with an image, and split across AFD
processes; a bundle without ONNX subgraphs is refused clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
from runtime_helpers import MAX_NEW, reference_tokens, routed_tokens
from PIL import Image

from step3_edge.errors import ConfigError
from step3_edge.runtime import Step3Runtime
from step3_edge.runtime.api import GRAPH_PREFILL_TOKENS

pytest.importorskip("onnxruntime")


def test_ort_greedy_tokens_equal_reference(onnx_bundle: Path, prompts, reference,
                                           ref_model) -> None:
    with Step3Runtime.load(onnx_bundle, backend="onnxruntime", device="cpu",
                           max_prefill_tokens=16) as rt:
        outs = rt.generate(prompts, max_new_tokens=MAX_NEW)           # chunked prefill too
        assert [o.token_ids for o in outs] == reference
        s = rt.stats()
        assert s["backend"]["backend"] == "onnxruntime"
        assert s["backend"]["providers"] == ["CPUExecutionProvider"]
        assert s["experts"]["accesses"] > 0
        t = rt.config.text_config
        rt.reset_stats()
        g = rt.generate(prompts[3], max_new_tokens=3)
        tokens = routed_tokens(rt, [prompts[3]], [g])                 # prompts[3] hits
        assert all(sum(c) == tokens * t.moe_top_k for c in rt.expert_counts().values())
        img = Image.new("RGB", (96, 64), (200, 40, 40))
        msgs = [{"role": "user", "content": [{"type": "image", "image": img},
                                             {"type": "text", "text": "What colour?"}]}]
        ids, views = rt.processor.apply_chat(msgs)
        want = reference_tokens(ref_model, ids, rt.processor.stop_token_ids, images=views,
                                max_new=6)
        assert rt.generate(ids, views, max_new_tokens=6).token_ids == want


def test_ort_in_afd_processes(onnx_bundle: Path, prompts, reference) -> None:
    with Step3Runtime.load(onnx_bundle, backend="onnxruntime", device="cpu", vision=False,
                           afd=True, ffn_ranks=1, micro_batches=2, afd_threads=1,
                           afd_timeout=60) as rt:
        outs = rt.generate(prompts[:3], max_new_tokens=MAX_NEW)
        assert [o.token_ids for o in outs] == reference[:3]


def test_ort_needs_onnx_subgraphs(bundle: Path, onnx_bundle: Path) -> None:
    with pytest.raises(ConfigError, match="ONNX subgraphs"):
        Step3Runtime.load(bundle, backend="onnxruntime", device="cpu")
    with pytest.raises(ConfigError, match="float32"):
        Step3Runtime.load(onnx_bundle, backend="onnxruntime", device="cpu", dtype="bfloat16")


def test_auto_backend_choice(onnx_bundle: Path, bundle: Path) -> None:
    """The backend picked, and its default prompt tokens per step (the graphs' attention
    materializes [chunk, context] scores: shorter chunks)."""
    with Step3Runtime.load(onnx_bundle, device="cpu", dtype="float32", vision=False) as rt:
        assert rt.stats()["backend"]["backend"] == "onnxruntime"
        assert rt.scheduler.max_prefill == GRAPH_PREFILL_TOKENS
    with Step3Runtime.load(onnx_bundle, device="cpu", vision=False) as rt:   # bf16 compute
        assert rt.stats()["backend"]["backend"] == "torch"
        assert rt.scheduler.max_prefill == 2048
    with Step3Runtime.load(bundle, device="cpu", dtype="float32", vision=False) as rt:
        assert rt.stats()["backend"]["backend"] == "torch"                  # no subgraphs
