"""`ChatEngine` over the real runtime, and the default bundle's cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def engine(bundle: Path):
    from step3_edge.app.engine import ChatEngine

    eng = ChatEngine.load(bundle, dtype="float32")
    yield eng
    eng.close()


def test_streamed_answer_matches_the_runtime_and_has_stats(engine) -> None:
    msgs = [{"role": "user", "content": "Name a colour."}]
    answer = engine.answer(msgs, max_tokens=10)
    text = "".join(answer)
    assert text == engine.runtime.chat(msgs, max_new_tokens=10)
    s = answer.stats
    assert s is not None and 1 <= s.completion_tokens <= 10 and s.prompt_tokens > 0
    assert s.finish_reason in ("stop", "length") and s.tokens_per_s > 0
    assert s.expert_hit_rate is None or 0 <= s.expert_hit_rate <= 1
    assert engine.last_answer is answer


def test_close_stops_the_stream(engine) -> None:
    answer = engine.answer([{"role": "user", "content": "Tell a story."}], max_tokens=200)
    it = iter(answer)
    next(it)
    answer.close()
    assert list(it) == [] and answer.stats.finish_reason in ("cancelled", "stop", "length")


def test_plan_and_memory(engine) -> None:
    assert "KV capacity" in engine.plan_table()
    mem = engine.memory()
    assert 0 < mem["rss"] and 0 < mem["available"] <= mem["total"]
    assert engine.max_tokens_limit >= 1024


def test_default_bundle_is_exported_once(app_env: dict[str, str], monkeypatch) -> None:
    from step3_edge.app.default_bundle import default_bundle, default_bundle_path

    monkeypatch.setenv("STEP3_EDGE_CACHE", app_env["STEP3_EDGE_CACHE"])
    first = default_bundle(progress=False)          # the fresh cache is filled here or earlier
    assert first == default_bundle_path() and (first / "manifest.json").is_file()
    stamp = os.stat(first / "manifest.json").st_mtime_ns
    assert default_bundle(progress=False) == first   # warm: found, not exported again
    assert os.stat(first / "manifest.json").st_mtime_ns == stamp
    assert not any(p.name.endswith(".partial") for p in first.parent.iterdir())
