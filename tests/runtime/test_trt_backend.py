"""The TensorRT backend. Engines need `tensorrt` and a CUDA GPU: the end-to-end test runs only
there (skipped otherwise, never mocked). Everywhere: its refusals, and that the profile it picks
for a call is the one export/trt.py built for such shapes."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from runtime_helpers import FIXED_BW

from step3_edge.errors import ConfigError
from step3_edge.export.onnx_runner import BundleGraphs
from step3_edge.export.trt import TrtShapes, profiles
from step3_edge.manifest import load_manifest
from step3_edge.runtime import Step3Runtime
from step3_edge.runtime.trt_backend import DECODE, PREFILL, TrtBackend, pick_profile


def _bounds(prof: dict) -> dict:
    return {n: (lo, hi) for n, (lo, _, hi) in prof.items()}


def test_profile_choice_matches_the_built_profiles(onnx_bundle: Path) -> None:
    m = load_manifest(onnx_bundle)
    cfg = BundleGraphs(m).cfg
    t = cfg.text_config
    s = TrtShapes(max_batch=8, prefill_tokens=64, max_prefill=256, max_context=512)
    sg = m.subgraphs["attn_moe"]
    bounds = [_bounds(p) for p in profiles(sg.inputs, s, cfg)]
    rng = random.Random()
    for _ in range(20):
        b, past = rng.randint(1, 8), rng.randint(0, 300)
        seq = 1 if rng.random() < 0.5 else rng.randint(2, 200)
        shapes = {"hidden": (b, seq, t.hidden_size), "positions": (b, seq),
                  "key_valid": (b, past + seq), "past_k": (b, past, t.head_dim),
                  "past_v": (b, past, t.head_dim)}
        want = DECODE if seq == 1 else PREFILL
        assert pick_profile(shapes, bounds) == want, shapes
    too_long = {"hidden": (1, 300, t.hidden_size), "positions": (1, 300),
                "key_valid": (1, 300), "past_k": (1, 0, t.head_dim), "past_v": (1, 0, t.head_dim)}
    assert pick_profile(too_long, bounds) is None                  # > max_prefill
    wrong_rank = {"hidden": (1, t.hidden_size)}
    assert pick_profile(wrong_rank, [_bounds(p) for p in profiles(
        m.subgraphs["attn_moe"].inputs[:1], s, cfg)]) is None


def test_refusals_name_the_remedy(onnx_bundle: Path) -> None:
    m = load_manifest(onnx_bundle)
    with pytest.raises(ConfigError, match="float32"):
        TrtBackend(m, "cuda", torch.bfloat16)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA GPU"):
            Step3Runtime.load(onnx_bundle, backend="tensorrt", device="cpu")
    elif m.engines.trt.built is False:                                 # a CPU-target bundle
        with pytest.raises(ConfigError, match="no TensorRT engines"):
            TrtBackend(m, "cuda")


def test_tensorrt_runtime_matches_onnx_runtime(text_ckpt: Path, tmp_path: Path) -> None:
    """On a GPU with tensorrt: a bundle exported with engines, loaded with
    backend='tensorrt', gives the ONNX Runtime backend's first-step logits on the same
    graphs (FP16 / INT8 engines against float32 graphs: 5% of the logits' range) and
    answers several prompts."""
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from step3_edge.export.bundle import export_bundle

    bundle = export_bundle(text_ckpt, "l20", 1, tmp_path / "trt-bundle", kv_tokens=8192,
                           cpu_mem_bytes=8 << 30, onnx=True, validate=False, trt=True,
                           progress=False)
    assert load_manifest(bundle).engines.trt.built
    trt_rt = Step3Runtime.load(bundle, backend="tensorrt", device="cuda", bandwidths=FIXED_BW)
    ort_rt = Step3Runtime.load(bundle, backend="onnxruntime", device="cpu", dtype="float32",
                               bandwidths=FIXED_BW)
    try:
        rng = np.random.default_rng()
        ids = rng.integers(3, trt_rt.config.text_config.vocab_size, 40).tolist()
        got, want = [rt.engine.attn.logits_buffer(1) for rt in (trt_rt, ort_rt)]
        for rt, out in ((trt_rt, got), (ort_rt, want)):
            seq = rt.engine.attn.kv.allocate(64)
            out.copy_(rt.engine.run([(seq, len(ids))], rt.engine.attn.embed(ids)))
            rt.engine.attn.kv.release(seq)
        span = float(want.max() - want.min())
        assert float((got - want).abs().max()) <= 0.05 * span
        outs = trt_rt.generate([ids, ids[:7]], max_new_tokens=4)
        assert all(g.finish_reason in ("stop", "length") for g in outs)
        assert trt_rt.stats()["backend"]["backend"] == "tensorrt"
    finally:
        trt_rt.close()
        ort_rt.close()


def test_engine_bounds_cap_the_scheduler_and_the_context(onnx_bundle: Path, monkeypatch
                                                         ) -> None:
    """A graph backend with profile bounds (TensorRT's `limits`): the runtime keeps its batches,
    prefill chunks and sequences inside them, and a prompt past the bounded context is a
    PromptError before anything runs (tested through the ORT backend given the same bounds)."""
    from step3_edge.errors import PromptError
    from step3_edge.runtime.ort_backend import OrtBackend

    monkeypatch.setattr(OrtBackend, "limits", {"max_batch": 2, "max_prefill": 16,
                                               "max_context": 64}, raising=False)
    with Step3Runtime.load(onnx_bundle, backend="onnxruntime", device="cpu", dtype="float32",
                           bandwidths=FIXED_BW, max_batch=8) as rt:
        assert (rt.scheduler.max_batch, rt.scheduler.max_prefill, rt.max_context) == (2, 16, 64)
        v = rt.config.text_config.vocab_size
        ids = [random.randrange(3, v) for _ in range(40)]
        outs = rt.generate([ids, ids[:30], ids[:20]], max_new_tokens=3)   # 3 > max_batch
        assert [len(g.prompt_token_ids) for g in outs] == [40, 30, 20]
        assert all(g.finish_reason in ("stop", "length") for g in outs)
        with pytest.raises(PromptError, match="the context 64"):
            rt.generate(ids + ids[:20], max_new_tokens=8)
