"""The typed load options: checked in full before any file is opened, `resident` unambiguous,
the decisions taken once and carried whole to the AFD ranks, the CLI flags made from the
fields, and the generation arguments checked before any work."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
from runtime_helpers import FIXED_BW

from step3_edge.errors import ConfigError, PromptError
from step3_edge.runtime import Step3Runtime
from step3_edge.runtime.decisions import Host, LoadDecisions, decide
from step3_edge.runtime.options import LOAD_KEYWORDS, OptionError, RuntimeOptions, option_fields

BAD = [({"afd": "yes"}, "afd='yes'"), ({"afd": True, "micro_batches": 15}, "micro_batches=15"),
       ({"afd": True, "attention_ranks": 5, "micro_batches": 14}, "attention ranks x"),
       ({"afd": True, "ffn_ranks": 2, "ffn_devices": ["cpu"]}, "ffn_devices"),
       ({"afd": True, "attention_ranks": 2, "attention_devices": ["cpu", "cpu"]},
        "attention_devices"),
       ({"afd": True, "afd_threads": 0}, "afd_threads=0"),
       ({"afd": True, "afd_timeout": float("nan")}, "afd_timeout=nan"),
       ({"attention_ranks": 2}, "without afd"), ({"ffn_devices": "cuda:1"}, "ffn_devices"),
       ({"resident": 1.5}, "resident_fraction=1.5"), ({"resident_experts": -1}, "-1"),
       ({"resident_experts": 2, "resident_fraction": 0.5}, "give one"),
       ({"resident": 2, "resident_experts": 3}, "give one"),
       ({"kv_dtype": "int8"}, "kv_dtype='int8'"), ({"dtype": "int8"}, "dtype='int8'"),
       ({"cache": "fifo"}, "cache='fifo'"), ({"vision": None}, "vision=None"),
       ({"expert_counts": 3}, "expert_counts=3"), ({"max_prefill_tokens": 1.5}, "1.5")]


@pytest.mark.parametrize("kw,match", BAD)
def test_bad_options_fail_before_any_file_is_opened(kw, match, monkeypatch) -> None:
    import step3_edge.runtime.api as api

    monkeypatch.setattr(api, "open_bundle", lambda *a, **k: pytest.fail("a file was opened"))
    with pytest.raises(OptionError, match=match) as e:
        Step3Runtime.load("/no/such/bundle", **kw)
    assert isinstance(e.value, ConfigError) and e.value.remedy


def test_resident_is_a_count_or_a_fraction_by_type() -> None:
    one = RuntimeOptions.from_kwargs(resident=1).experts
    all_ = RuntimeOptions.from_kwargs(resident=1.0).experts
    assert (one.resident_experts, one.resident_fraction) == (1, None)
    assert (all_.resident_experts, all_.resident_fraction) == (None, 1.0)
    assert RuntimeOptions.from_kwargs(resident_fraction=1).experts.resident_fraction == 1.0
    for bad in (True, "half", [1]):
        with pytest.raises(OptionError, match="resident"):
            RuntimeOptions.from_kwargs(resident=bad)


def test_options_are_frozen_and_round_trip_as_keywords() -> None:
    o = RuntimeOptions.from_kwargs(device="cpu", dtype="float32", resident=0.25, cache="lru",
                                   kv_tokens=64, afd=True, ffn_ranks=2, ffn_devices=["cpu"] * 2,
                                   bandwidths=FIXED_BW, expert_counts={1: [3, 2]})
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.threads = 2  # type: ignore[misc]
    assert o.afd.mode == "spawn" and o.afd.ffn_devices == ("cpu", "cpu") and o.kv.tokens == 64
    assert RuntimeOptions.from_kwargs(**o.to_kwargs()) == dataclasses.replace(
        o, experts=dataclasses.replace(o.experts, expert_counts={"1": [3, 2]}))
    assert RuntimeOptions().to_kwargs() == {}
    assert set(LOAD_KEYWORDS) == {f.metadata["key"] for _, f in option_fields()} | {"resident"}


def test_decisions_are_taken_once_and_travel_whole(bundle: Path) -> None:
    from step3_edge.runtime.loading import open_bundle

    manifest, plan, cfg, _ = open_bundle(bundle)
    host = Host(cpu_count=8, cuda_devices=0)
    o = RuntimeOptions.from_kwargs(device="cpu", dtype="float32", afd=True, ffn_ranks=3)
    d = decide(o, manifest, plan, cfg, host)
    assert (d.backend, d.dtype, d.kv_dtype) == ("torch", "float32", "float32")
    assert d.afd is not None and d.afd.devices == ("cpu",) * 3
    assert d.afd.threads == 2 and d.threads == 2          # 8 cores over 4 processes
    assert d.afd.dist_backend == "gloo" and d.max_prefill_tokens == 2048
    assert LoadDecisions.from_dict(d.to_dict()) == d
    one = decide(dataclasses.replace(o, afd=RuntimeOptions().afd), manifest, plan, cfg, host)
    assert one.afd is None and one.threads is None
    assert one.kv_tokens >= d.kv_tokens                   # AFD splits the plan's KV
    with pytest.raises(OptionError, match="resident_experts=1000000"):
        decide(RuntimeOptions.from_kwargs(resident=10**6), manifest, plan, cfg, host)
    with pytest.raises(ConfigError, match="process group already exists"):
        decide(o, manifest, plan, cfg, dataclasses.replace(host, dist_initialized=True))
    b = d.within({"max_batch": 2, "max_prefill": 16, "max_context": 64})
    assert (b.max_batch, b.max_prefill_tokens, b.max_context) == (2, 16, 64)


def test_cli_flags_are_the_fields() -> None:
    from step3_edge.cli import RUNTIME_OPTIONS, add_runtime_arguments, runtime_overrides

    keys = {o.key for o in RUNTIME_OPTIONS}
    assert keys == {f.metadata["key"] for _, f in option_fields() if f.metadata["flag"]} | \
        {"resident"}
    helps = {o.key: o.help for o in RUNTIME_OPTIONS}
    assert all(helps[k] == LOAD_KEYWORDS[k] for k in keys)
    p = argparse.ArgumentParser()
    add_runtime_arguments(p)
    args = p.parse_args(["--no-vision", "--micro-batches", "2", "--ffn-devices", "cpu", "cpu",
                         "--resident-fraction", "0.5", "--afd-timeout", "9", "--afd", "env"])
    kw = runtime_overrides(args)
    assert kw == {"vision": False, "micro_batches": 2, "ffn_devices": ["cpu", "cpu"],
                  "resident_fraction": 0.5, "afd_timeout": 9.0, "afd": "env"}
    o = RuntimeOptions.from_kwargs(**kw)
    assert o.vision is False and o.afd.mode == "env" and o.afd.ffn_devices == ("cpu", "cpu")


def test_generation_arguments_are_checked_before_any_work(rt, monkeypatch) -> None:
    from step3_edge.sampling import SamplingParams

    monkeypatch.setattr(rt.processor, "apply_chat", lambda *a: pytest.fail("rendered"))
    msgs = [{"role": "user", "content": "hi"}]
    for kw, match in (({"max_new_tokens": 0}, "max_new_tokens"),
                      ({"max_new_tokens": True}, "max_new_tokens"),
                      ({"seed": 2**64}, "seed"), ({"seed": -1}, "seed"),
                      ({"sampling": {"temperature": 1.0}}, "sampling")):
        with pytest.raises(PromptError, match=match):
            rt.chat(msgs, **kw)
        with pytest.raises(PromptError, match=match):
            rt.submit("hi", **kw)
        with pytest.raises(PromptError, match=match):
            rt.generate(["a", "b"], **kw)
    with pytest.raises(PromptError, match="temperature"):
        rt.generate("hi", sampling=SamplingParams(temperature=float("nan")))
    with pytest.raises(PromptError, match="seed"):                  # seed + i of a batch
        rt.generate(["a", "b"], seed=2**64 - 1, max_new_tokens=1)
