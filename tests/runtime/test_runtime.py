"""The runtime against the reference model: greedy tokens equal in every expert mode, batched
and from concurrent threads; prompt errors; stop strings; streaming; images; statistics."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from runtime_helpers import FIXED_BW, MAX_NEW, reference_tokens, routed_tokens
from PIL import Image

from step3_edge.config import Step3Config
from step3_edge.errors import ConfigError, PromptError, RuntimeClosedError
from step3_edge.runtime import Step3Runtime

MODES = {
    "all-resident": {},
    "25%-cpu-compute": {"resident": 0.25, "miss": "cpu"},
    "25%-copy-lru-prefetch": {"resident": 0.25, "miss": "copy", "cache": "lru",
                              "prefetch": True},
    "50%-copy-lfu-chunked-prefill": {"resident": 0.5, "miss": "copy", "cache": "lfu",
                                     "max_prefill_tokens": 8},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_tokens_equal_reference(mode: str, bundle: Path, prompts, reference) -> None:
    kw = MODES[mode]
    with Step3Runtime.load(bundle, dtype="float32", device="cpu", bandwidths=FIXED_BW,
                           **kw) as rt:
        outs = rt.generate(prompts, max_new_tokens=MAX_NEW)          # one continuous batch
        assert [o.token_ids for o in outs] == reference
        s = rt.stats()["experts"]
    total = 2 * 8                                                   # tiny: 2 MoE layers x 8
    assert s["resident"] == round(kw.get("resident", 1.0) * total)
    if kw.get("miss") == "cpu":
        assert s["cpu_computed"] > 0 and s["copied"] == 0 and s["hit_rate"] < 1
    elif kw.get("miss") == "copy":
        assert s["copied"] > 0 and s["bytes_copied"] == s["copied"] * s["expert_bytes"]
        assert s["cpu_computed"] == 0 and s["evictions"] > 0
    else:
        assert s["hit_rate"] == 1.0 and s["copied"] == s["cpu_computed"] == 0
    if kw.get("prefetch"):
        assert s["prefetched"] > 0


def test_concurrent_generate_from_threads(rt, prompts, reference) -> None:
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            results[i] = rt.generate(prompts[i % len(prompts)],
                                     max_new_tokens=MAX_NEW).token_ids
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert all(results[i] == reference[i % len(prompts)] for i in range(6))


def test_prompt_over_context_or_kv_capacity_is_a_prompt_error(rt, bundle: Path,
                                                               prompts) -> None:
    ctx = rt.config.text_config.max_context
    with pytest.raises(PromptError, match="context") as e:
        rt.generate([5] * ctx, max_new_tokens=1)
    assert e.value.remedy
    with Step3Runtime.load(bundle, dtype="float32", device="cpu", bandwidths=FIXED_BW,
                           kv_tokens=48, vision=False) as small:
        assert small.kv_capacity == 48
        with pytest.raises(PromptError, match="KV capacity"):
            small.generate([5] * 40, max_new_tokens=20)
        ok = small.generate(prompts[3], max_new_tokens=4)            # still serving
        assert len(ok.token_ids) <= 4
    with pytest.raises(RuntimeClosedError, match="closed"):         # `with` closed it
        small.generate(prompts[3], max_new_tokens=2)
    for bad in ([], [-1], [10**9], {"a": 1}, [[1.5, 2]], 7):
        with pytest.raises(PromptError):
            rt.generate(bad, max_new_tokens=2)
    with pytest.raises(PromptError):
        rt.generate(prompts[0], max_new_tokens=0)
    with pytest.raises(PromptError, match="seed"):
        rt.generate(prompts[0], max_new_tokens=2, seed="x")
    for stop in (5, [""], ["ok", 3]):
        with pytest.raises(PromptError, match="stop"):
            rt.generate(prompts[0], max_new_tokens=2, stop=stop)


def test_stop_strings_and_streaming(rt, prompts) -> None:
    full = rt.generate(prompts[2], max_new_tokens=24)
    assert len(full.text) >= 8 and full.finish_reason in ("length", "stop")
    stop = full.text[5:7]
    cut = rt.generate(prompts[2], max_new_tokens=24, stop=[stop, "never-there"])
    assert cut.text == full.text[:full.text.find(stop)] and cut.finish_reason == "stop"
    for kw in ({}, {"stop": stop}):
        req = rt.submit(prompts[2], max_new_tokens=24, **kw)
        pieces = list(req.stream())
        assert "".join(pieces) == req.result().text
        assert len(pieces) > 1 or len(req.result().text) <= 1
    msgs = [{"role": "user", "content": "Count to three."}]
    assert "".join(rt.chat(msgs, stream=True, max_new_tokens=16)) == \
        rt.chat(msgs, max_new_tokens=16)


def test_chat_with_an_image_matches_reference(rt, ref_model) -> None:
    img = Image.new("RGB", (96, 64), (200, 40, 40))
    msgs = [{"role": "user", "content": [{"type": "image", "image": img},
                                         {"type": "text", "text": "What colour?"}]}]
    ids, views = rt.processor.apply_chat(msgs)
    want = reference_tokens(ref_model, ids, rt.processor.stop_token_ids, images=views,
                            max_new=8)
    got = rt.generate(ids, views, max_new_tokens=8)
    assert got.token_ids == want
    assert rt.chat(msgs, max_new_tokens=8) == rt.processor.decode(want)


def test_statistics_and_expert_counts(rt, prompts) -> None:
    rt.reset_stats()
    g = rt.generate(prompts[1], max_new_tokens=6)
    t = rt.config.text_config
    pc = rt.stats()["scheduler"]["prefix_cache"]      # earlier tests cached this prompt
    assert pc["prompt_tokens"] == len(prompts[1]) and pc["hit_tokens"] % 16 == 0
    tokens = routed_tokens(rt, [prompts[1]], [g])
    counts = rt.expert_counts()
    assert sorted(counts) == list(t.moe_layers)
    assert all(sum(c) == tokens * t.moe_top_k for c in counts.values())
    s = rt.stats()
    assert len(s["time"]["attention_s"]) == t.num_hidden_layers
    assert s["time"]["steps"] > 0 and sum(s["time"]["ffn_s"]) > 0
    assert s["experts"]["accesses"] > 0 and s["scheduler"]["kv_used_tokens"] == 0
    assert "bf16: F.linear" in s["backend"]["kernels"]
    rt.record_trace(True)
    rt.generate(prompts[3], max_new_tokens=3)
    trace = rt.record_trace(False)
    assert trace and all(rec["layer"] in t.moe_layers for step in trace for rec in step)


def test_load_errors(bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown runtime option"):
        Step3Runtime.load(bundle, devcie="cpu")
    with pytest.raises(ConfigError, match="TensorRT engines"):      # no ONNX in this bundle
        Step3Runtime.load(bundle, backend="tensorrt", device="cpu")
    with pytest.raises(ConfigError, match="resident"):
        Step3Runtime.load(bundle, device="cpu", resident=10**6, bandwidths=FIXED_BW)
    for bad in ({"threads": 0}, {"max_batch": 0}, {"prefetch": "maybe"}, {"afd_timeout": -1},
                {"afd_backend": "mpi"}, {"device": "gpu0"}, {"kv_tokens": 0},
                {"kv_tokens": 8}, {"kv_tokens": "4096"}, {"kv_tokens": True},
                {"resident": "half"}, {"resident": True}):
        with pytest.raises(ConfigError, match=f"{next(iter(bad.values()))!r}"):
            Step3Runtime.load(bundle, **{"device": "cpu", **bad})
    with pytest.raises(ConfigError, match="host_to_device, host_memory"):
        Step3Runtime.load(bundle, device="cpu", bandwidths={"h2d": 1e10})
    from step3_edge.errors import BundleError

    with pytest.raises(BundleError, match="not a bundle"):
        Step3Runtime.load(tmp_path)


def test_kv_pool_over_the_available_memory_is_refused(bundle: Path, monkeypatch) -> None:
    """A KV pool that does not fit beside the weights in the CPU memory available is a
    PlanError naming the numbers and a kv_tokens that fits, before any weight is read; that
    kv_tokens loads."""
    from types import SimpleNamespace

    import step3_edge.runtime.builders as builders
    from step3_edge.errors import PlanError
    from step3_edge.manifest import load_manifest

    t = Step3Config.from_pretrained(bundle).text_config
    per_token = 2 * t.num_hidden_layers * t.head_dim * 4                  # float32 pool
    weights = sum(a.bytes for a in load_manifest(bundle).artifacts if a.kind == "weights")
    free = weights + 1000 * per_token + per_token // 2
    monkeypatch.setattr(builders.psutil, "virtual_memory",
                        lambda: SimpleNamespace(available=free))
    build = builders.TorchBuilder.build_attention
    monkeypatch.setattr(builders.TorchBuilder, "build_attention",
                        lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(PlanError, match=r"KV pool of 2,000 tokens") as e:
        Step3Runtime.load(bundle, device="cpu", dtype="float32", kv_tokens=2000,
                          bandwidths=FIXED_BW, vision=False)
    assert "kv_tokens <= 1,000" in e.value.remedy
    monkeypatch.setattr(builders.TorchBuilder, "build_attention", build)
    with Step3Runtime.load(bundle, device="cpu", dtype="float32", kv_tokens=1000,
                           bandwidths=FIXED_BW, vision=False) as rt:
        assert rt.kv_capacity == 1000 // 16 * 16                       # whole blocks


def test_bf16_compute_runs(bundle: Path, prompts) -> None:
    with Step3Runtime.load(bundle, dtype="bfloat16", device="cpu", bandwidths=FIXED_BW,
                           kv_dtype="float8_e4m3fn", vision=False) as rt:
        g = rt.generate(prompts[0], max_new_tokens=4)
        assert rt.engine.attn.kv.k.dtype == torch.float8_e4m3fn
    assert 1 <= len(g.token_ids) <= 4 or g.finish_reason == "stop"


def test_cancel_ends_a_request_early(rt, prompts) -> None:
    req = rt.submit(prompts[0], max_new_tokens=400)
    stream = req.stream()
    first = next(stream)
    req.cancel()
    rest = "".join(stream)
    g = req.result(timeout=60)
    assert g.finish_reason == "cancelled" and len(g.token_ids) < 400
    assert first + rest == g.text
    assert rt.generate(prompts[3], max_new_tokens=2).finish_reason in ("length", "stop")


def test_generation_times_its_first_token_and_decode(rt, prompts) -> None:
    t0 = time.perf_counter()
    g = rt.generate(prompts[1], max_new_tokens=12)
    wall = time.perf_counter() - t0
    n = len(g.token_ids) + (g.finish_reason == "stop")            # tokens sampled
    assert n >= 2 and 0 < g.time_to_first_token_s < wall and g.decode_tokens_per_s > 0
    # first token, then n - 1 more at the reported rate: together within the call's wall time
    assert g.time_to_first_token_s + (n - 1) / g.decode_tokens_per_s <= wall
    one = rt.generate(prompts[1], max_new_tokens=1)
    assert one.time_to_first_token_s > 0 and one.decode_tokens_per_s == 0.0


def test_bf16_logits_bit_identical_to_reference(bundle: Path, text_ckpt: Path) -> None:
    """bf16 compute with bf16 KV: the fast paths (oneDNN prepacked linears, gate+up as one
    GEMM, experts sorted into one gather and one accumulating index_put_) give the
    reference's exact bits (without the native GEMV, which sums in another order:
    tests/runtime/test_native.py)."""
    from step3_edge.model import KVCache, Step3ForConditionalGeneration

    ref = Step3ForConditionalGeneration.from_pretrained(text_ckpt, dtype=torch.bfloat16)
    ids = torch.randint(3, 250, (1, 19), generator=torch.Generator().manual_seed(5))
    with Step3Runtime.load(bundle, dtype="bfloat16", device="cpu", bandwidths=FIXED_BW,
                           kv_dtype="bfloat16", vision=False, native_kernels=False) as rt, \
            torch.inference_mode(), \
            rt.scheduler.engine_lock:
        eng = rt.engine
        seq = eng.attn.kv.allocate(32)
        cache = KVCache(ref.config.text_config, 1, 32, dtype=torch.bfloat16)
        got = eng.run([(seq, 19)], eng.attn.embed_tokens(ids[0].tolist()))     # [1, vocab]
        assert torch.equal(got, ref(ids, cache=cache)[:, -1].float())
        nxt = got.argmax(-1)
        got = eng.run([(seq, 1)], eng.attn.embed_tokens(nxt.tolist()))
        assert torch.equal(got, ref(nxt[None], cache=cache)[:, -1].float())
        eng.attn.kv.release(seq)


def test_engine_threads_keep_the_counts_asked_for(bundle: Path, prompts) -> None:
    """torch sets a thread's intra-op count at its first parallel op, from the process-wide
    count that the last `set_num_threads` anywhere left: each runtime's engine thread must
    still run with its own."""
    seen: dict[int, set[int]] = {2: set(), 1: set()}
    rts = {n: Step3Runtime.load(bundle, device="cpu", bandwidths=FIXED_BW, vision=False,
                                threads=n) for n in seen}      # the second sets the count to 1
    try:
        for n, rt in rts.items():
            def spy(*args, run=rt.engine.run, n=n, **kwargs):
                seen[n].add(torch.get_num_threads())
                return run(*args, **kwargs)

            rt.engine.run = spy
        for rt in rts.values():
            rt.generate(prompts[0], max_new_tokens=2)
        assert {n: rt.stats()["scheduler"]["threads"] for n, rt in rts.items()} == {2: 2, 1: 1}
    finally:
        for rt in rts.values():
            rt.close()
    assert seen == {2: {2}, 1: {1}}


def test_incremental_text_equals_decoding_everything(rt) -> None:
    """The scheduler decodes only the last ids per step; at every step its text is the full
    decode's (less a trailing incomplete character), and at the end exactly the full decode,
    over random ids that include multi-byte pieces, special tokens and `</think>`."""
    from step3_edge.processor import THINK_END
    from step3_edge.runtime.scheduler import IncrementalText

    decode = rt.processor.decode
    vocab = rt.processor.tokenizer.get_vocab_size()
    think = rt.processor.tokenizer.token_to_id(THINK_END)
    g = torch.Generator().manual_seed(1)
    waited = 0
    for trial in range(20):
        ids = torch.randint(0, vocab, (60,), generator=g).tolist()
        ids[int(torch.randint(0, 60, (1,), generator=g))] = think
        inc, seen = IncrementalText(decode), []
        for n in range(1, len(ids) + 1):
            seen.append(ids[n - 1])
            text = inc.update(seen, final=n == len(ids))
            full = decode(seen)
            pending = full.endswith("\ufffd")
            waited += pending
            assert full.startswith(text) if pending else text == full, (trial, n)
        assert text == decode(ids)
    assert waited > 0                        # the ids did end mid-character at times
