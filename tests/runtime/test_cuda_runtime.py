"""The runtime on a CUDA GPU (torch backend): greedy tokens equal the reference's in every expert
mode (resident, misses computed on the CPU, misses copied over PCIe from pinned memory, with
prefetch on the side stream), quantized bundles through `_int_mm` / `_scaled_mm`, seeded
sampling, the start-up bandwidth probe. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from runtime_helpers import FIXED_BW, MAX_NEW

from step3_edge.runtime import Step3Runtime
from step3_edge.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

MODES = {
    "all-resident": {},
    "25%-cpu-compute": {"resident": 0.25, "miss": "cpu", "cache": "static"},
    "25%-copy-static": {"resident": 0.25, "miss": "copy", "cache": "static"},
    "25%-copy-lru-prefetch": {"resident": 0.25, "miss": "copy", "cache": "lru",
                              "prefetch": True},
    "50%-copy-lfu-chunked-prefill": {"resident": 0.5, "miss": "copy", "cache": "lfu",
                                     "max_prefill_tokens": 8},
    "50%-auto": {"resident": 0.5, "miss": "auto", "bandwidths": None},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_greedy_tokens_equal_reference(mode: str, bundle: Path, prompts,
                                            reference) -> None:
    kw = {"bandwidths": FIXED_BW, **MODES[mode]}
    with Step3Runtime.load(bundle, dtype="float32", device="cuda", vision=False, **kw) as rt:
        outs = rt.generate(prompts, max_new_tokens=MAX_NEW)          # one continuous batch
        assert [o.token_ids for o in outs] == reference
        s = rt.stats()
        residency = rt.engine.ffn.store.residency
        assert s["backend"]["device"].startswith("cuda")
        assert all(t.is_pinned() for mlp in residency.on_host.values()
                   for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
                   for t in lin.parts.values())
        assert all(mlp.down_proj.parts[""].is_cuda for mlp in residency.on_device.values())
    e = s["experts"]
    miss = kw.get("miss")
    if miss == "cpu":
        assert e["cpu_computed"] > 0 and e["copied"] == 0 and e["bytes_activations"] > 0
    elif miss == "copy":
        assert e["copied"] > 0 and e["bytes_copied"] == e["copied"] * e["expert_bytes"]
        assert e["cpu_computed"] == 0
    elif miss is None:
        assert e["hit_rate"] == 1.0 and e["copied"] == e["cpu_computed"] == 0
    else:                                                  # measured bandwidths decide
        assert e["bandwidths"]["measured"] and sum(e["miss_choices"].values()) > 0
    if kw.get("prefetch"):
        assert e["prefetched"] > 0


def test_cuda_bf16_logits_close_to_reference(bundle: Path, text_ckpt: Path) -> None:
    """bf16 compute with bf16 KV on the GPU against the bf16 reference on the CPU."""
    from step3_edge.model import KVCache, Step3ForConditionalGeneration

    ref = Step3ForConditionalGeneration.from_pretrained(text_ckpt, dtype=torch.bfloat16)
    ids = torch.randint(3, 250, (1, 19), generator=torch.Generator().manual_seed(5))
    with Step3Runtime.load(bundle, dtype="bfloat16", device="cuda", bandwidths=FIXED_BW,
                           kv_dtype="bfloat16", vision=False, resident=0.5, miss="cpu") as rt, \
            torch.inference_mode(), rt.scheduler.engine_lock:
        eng = rt.engine
        seq = eng.attn.kv.allocate(32)
        cache = KVCache(ref.config.text_config, 1, 32, dtype=torch.bfloat16)
        got = eng.run([(seq, 19)], eng.attn.embed_tokens(ids[0].tolist())).cpu()
        want = ref(ids, cache=cache)[:, -1].float()
        assert (got - want).abs().max() <= 0.05 * want.abs().max()
        nxt = want.argmax(-1)
        got = eng.run([(seq, 1)], eng.attn.embed_tokens(nxt.tolist())).cpu()
        want = ref(nxt[None], cache=cache)[:, -1].float()
        assert (got - want).abs().max() <= 0.05 * want.abs().max()
        eng.attn.kv.release(seq)


@pytest.fixture(scope="module", params=["int8_per_channel", "fp8_per_channel"])
def quantized_bundle(request, text_ckpt: Path, tmp_path_factory) -> tuple[str, Path]:
    from step3_edge.export.bundle import export_bundle

    scheme = request.param
    return scheme, export_bundle(text_ckpt, "cpu", 1, tmp_path_factory.mktemp("q") / scheme,
                                 scheme=scheme, kv_tokens=4096, cpu_mem_bytes=8 << 30,
                                 onnx=False, progress=False)


def test_cuda_quantized_bundle_uses_fast_kernels(quantized_bundle) -> None:
    """int8 / fp8 weights stay as stored on the GPU (`_int_mm` / `_weight_int8pack_mm`,
    `_scaled_mm`) and give the logits of the same bundle dequantized in float32 on the CPU."""
    scheme, qb = quantized_bundle
    ids = torch.randint(3, 250, (1, 23), generator=torch.Generator().manual_seed(3))
    logits = {}
    for dev, dtype in (("cuda", "bfloat16"), ("cpu", "float32")):
        with Step3Runtime.load(qb, dtype=dtype, device=dev, bandwidths=FIXED_BW,
                               kv_dtype=dtype, vision=False, resident=0.5, miss="copy",
                               cache="lru") as rt:
            with torch.inference_mode(), rt.scheduler.engine_lock:
                eng = rt.engine
                seq = eng.attn.kv.allocate(32)
                logits[dev] = eng.run([(seq, 23)],
                                      eng.attn.embed_tokens(ids[0].tolist())).cpu()
            kernels = rt.stats()["backend"]["kernels"]
            if dev == "cuda":
                caps = rt.stats()["backend"]["capabilities"]
                fast = {"int8_per_channel": "_int_mm" if caps.get("int_mm") else None,
                        "fp8_per_channel": "_scaled_mm" if caps.get("scaled_mm") else None}[scheme]
                if fast:
                    assert any(fast in k for k in kernels), kernels
                assert rt.stats()["experts"]["copied"] > 0
    got, want = logits["cuda"], logits["cpu"]
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert cos.item() > 0.995, cos
    assert (got - want).abs().max() <= 0.1 * want.abs().max()


def test_cuda_seeded_sampling_is_reproducible(bundle: Path, prompts) -> None:
    sp = SamplingParams(temperature=0.9, top_p=0.95)
    with Step3Runtime.load(bundle, dtype="float32", device="cuda", bandwidths=FIXED_BW,
                           vision=False) as rt:
        a = rt.generate(prompts[:2], max_new_tokens=6, sampling=sp, seed=7)
        b = rt.generate(prompts[:2], max_new_tokens=6, sampling=sp, seed=7)
        assert [g.token_ids for g in a] == [g.token_ids for g in b]
        rt.generate(prompts[0], max_new_tokens=3, sampling=sp)           # unseeded


def test_cuda_startup_bandwidth_probe() -> None:
    from step3_edge.runtime.cost_model import measure_bandwidths

    bw = measure_bandwidths(torch.device("cuda"), torch.bfloat16)
    assert bw.measured
    assert 1e8 < bw.host_to_device < bw.device_memory
    assert bw.device_flops > bw.host_flops > 0
