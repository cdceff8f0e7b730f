"""TensorRT: the engine build runs only where `tensorrt` imports and a GPU is present (skipped
otherwise, never mocked); the pieces that need neither are tested everywhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from step3_edge.export.binding import WeightBinding, bind
from step3_edge.export.onnx_runner import BoundSession, BundleGraphs
from step3_edge.export.subgraphs import Instance
from step3_edge.export.trt import TrtShapes, build_bundle_engines, materialize, profiles
from step3_edge.manifest import load_manifest
from step3_edge.targets import get_target


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def test_profiles_cover_prefill_and_decode(l20_bundle: Path) -> None:
    m = load_manifest(l20_bundle)
    cfg = BundleGraphs(m).cfg
    s = TrtShapes(max_batch=8, prefill_tokens=256, max_prefill=1024, max_context=4096)
    for name, sg in m.subgraphs.items():
        pre, dec = profiles(sg.inputs, s, cfg)
        for prof in (pre, dec):
            for lo, opt, hi in prof.values():
                assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), name
        if name.startswith("attn"):
            assert dec["hidden"][2][1] == 1 and pre["hidden"][2][1] == 1024
            assert pre["past_k"][0][1] == 0                  # prefill from an empty cache
            assert dec["hidden"][2][0] == 8                  # decode: up to max_batch seqs


def test_materialized_graph_runs_without_binding(l20_bundle: Path) -> None:
    """The self-contained graph TensorRT parses computes what the bound session computes."""
    graphs = BundleGraphs(l20_bundle)
    sg = graphs.manifest.subgraphs["attn_moe"]
    bindings = [WeightBinding.from_dict(w) for w in sg.weights]
    inst = Instance(*sg.instances[-1])
    out = materialize(l20_bundle / sg.file, bindings, graphs.reader, graphs.cfg, inst,
                      Path(l20_bundle).parent / "attn_moe_materialized.onnx")
    import onnxruntime as ort

    plain = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    bound = BoundSession.create(l20_bundle / sg.file,
                                bind(bindings, graphs.reader, graphs.cfg, inst))
    rng = np.random.default_rng(0)
    feeds = {"hidden": rng.standard_normal((1, 3, 128)).astype(np.float32),
             "positions": np.arange(3)[None], "key_valid": np.ones((1, 3), dtype=bool),
             "past_k": np.zeros((1, 0, 32), np.float32), "past_v": np.zeros((1, 0, 32),
                                                                           np.float32)}
    for a, b in zip(plain.run(None, feeds), bound.session.run(None, feeds)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(_has_tensorrt(), reason="tensorrt is installed here")
def test_without_tensorrt_export_says_so_in_one_line(l20_bundle: Path) -> None:
    graphs = BundleGraphs(l20_bundle)
    lines: list[str] = []
    info, files = build_bundle_engines(l20_bundle, graphs.manifest.subgraphs, graphs.reader,
                                       graphs.cfg, get_target("l20"), log=lines.append)
    assert len(lines) == 1 and "shipping the ONNX subgraphs" in lines[0]
    assert info.built is False and files == []


def test_engine_builds_refits_and_runs(l20_bundle: Path, tmp_path: Path) -> None:
    trt = pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from step3_edge.export.trt import build_engine, refit_engine

    graphs = BundleGraphs(l20_bundle)
    sg = graphs.manifest.subgraphs["expert"]
    bindings = [WeightBinding.from_dict(w) for w in sg.weights]
    first, last = Instance(*sg.instances[0]), Instance(*sg.instances[-1])
    src = materialize(l20_bundle / sg.file, bindings, graphs.reader, graphs.cfg, first,
                      tmp_path / "expert.onnx")
    target = get_target("l20")
    plan = build_engine(src, sg.inputs, graphs.cfg, target, TrtShapes(max_batch=4))
    values = bind(bindings, graphs.reader, graphs.cfg, last)
    engine = refit_engine(plan, values)
    assert isinstance(engine, trt.ICudaEngine)
    ctx = engine.create_execution_context()
    x = torch.randn(4, graphs.cfg.text_config.hidden_size, device="cuda")
    y = torch.empty_like(x)
    ctx.set_input_shape("x", tuple(x.shape))
    ctx.set_tensor_address("x", x.data_ptr())
    ctx.set_tensor_address("y", y.data_ptr())
    assert ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    want = graphs.run("expert", {"x": x.cpu().numpy()}, last.layer, last.expert)["y"]
    np.testing.assert_allclose(y.cpu().numpy(), want, rtol=0.05, atol=0.05)
