"""`step3-edge generate --model BUNDLE`, `step3-edge profile` and `step3-edge chat`."""

from __future__ import annotations

import argparse
import io
import json
import re
from pathlib import Path

import pytest

from step3_edge.cli import main
from step3_edge.config import Step3Config
from step3_edge.runtime.chat_cli import chat_loop
from step3_edge.runtime.plan_cli import read_counts
from step3_edge.runtime.planner import plan_placement
from step3_edge.sampling import SamplingParams
from step3_edge.targets import get_target


def _json_of(capsys: pytest.CaptureFixture, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_generate_with_a_bundle_equals_the_checkpoint(bundle: Path, text_ckpt: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    args = ["generate", "--json", "--max-new-tokens", "6", "Name a colour"]
    got = _json_of(capsys, args[:1] + ["--model", str(bundle)] + args[1:])
    want = _json_of(capsys, args[:1] + ["--model", str(text_ckpt)] + args[1:])
    for key in ("prompt_token_ids", "generated_token_ids", "text"):
        assert got[key] == want[key]


def test_profile_writes_counts_the_planner_reads(bundle: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('hello there\n{"prompt": "a json prompt"}\n'
                       '{"messages": [{"role": "user", "content": "hi"}]}\n\n')
    out, trace = tmp_path / "counts.json", tmp_path / "trace.json"
    assert main(["profile", "--bundle", str(bundle), "--prompts", str(prompts), "--out",
                 str(out), "--trace", str(trace), "--max-new-tokens", "4",
                 "--device", "cpu", "--dtype", "float32"]) == 0
    assert "profiled 3 prompts" in capsys.readouterr().out
    cfg = Step3Config.from_pretrained(bundle)
    t = cfg.text_config
    counts = read_counts(str(out))
    assert sorted(counts) == list(t.moe_layers)
    data = json.loads(out.read_text())
    assert all(sum(c) == data["tokens"] * t.moe_top_k for c in counts.values())
    steps = json.loads(trace.read_text())["trace"]
    assert steps and any("next" in rec for step in steps for rec in step)
    plan = plan_placement(cfg, get_target("cpu"), 1, cpu_mem_bytes=2**33, scheme="bf16",
                          kv_tokens=4096, expert_counts=counts)
    assert plan.kv_tokens == 4096
    assert main(["profile", "--bundle", str(bundle), "--prompts",
                 str(tmp_path / "missing.txt")]) == 2


def test_chat_loop_streams_and_keeps_history(rt) -> None:
    args = argparse.Namespace(system="be brief", image=[], max_new_tokens=6, seed=None,
                              timings=True)
    out, err = io.StringIO(), io.StringIO()
    chat_loop(rt, SamplingParams(), args, io.StringIO("hi\n/stats\n\nagain\n/reset\n/quit\n"),
              out, err)
    text = out.getvalue()
    assert '"experts"' in text and "(conversation reset)" in text
    first = rt.chat([{"role": "system", "content": "be brief"},
                     {"role": "user", "content": "hi"}], max_new_tokens=6)
    assert text.startswith(first + "\n")
    lines = err.getvalue().splitlines()                   # one timings line per answer
    assert len(lines) == 2
    n, ttft, rate = map(float, re.fullmatch(
        r"\[(\d+) tokens, first token after ([\d.]+) s, ([\d.]+) tok/s\]", lines[0]).groups())
    assert 1 <= n <= 6 and ttft > 0 and (rate > 0 or n <= 1)
