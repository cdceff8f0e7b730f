"""The `step3-edge` command line: one `--model` convention, help and shown defaults on every
option, `--version`, a `--help` that does not import torch, runtime flags from one table."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from step3_edge.cli import COMMANDS, RUNTIME_OPTIONS, build_parser, main, version

# the commands whose options this test holds to the convention (help and a shown default)
OWN = ("chat", "plan", "profile", "app", "serve", "eval", "generate", "quantize", "export",
       "inspect", "synth")
RUNTIME_COMMANDS = ("chat", "profile", "app", "serve")
MODEL_DEFAULTS = ("chat", "profile", "app", "serve", "generate", "eval")
LIGHT = ("chat", "plan", "profile", "app", "serve", "export", "inspect", "generate", "eval",
         "quantize", "synth")


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser(name)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _imports_after(argv: list[str]) -> set[str]:
    code = ("import sys\nfrom step3_edge.cli import main\ntry:\n"
            f"    main({argv!r})\n"
            "except SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'gradio', 'fastapi', 'onnxruntime') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"')))


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version as dist_version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"step3-edge {dist_version('step3-edge')}"
    assert version() == dist_version("step3-edge")


def test_top_level_help_lists_every_command_and_imports_nothing_heavy() -> None:
    out = subprocess.run([sys.executable, "-m", "step3_edge.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert all(f"    {name} " in out for name in COMMANDS), out
    assert "--version" in out and "--model" in out
    assert "this file only" not in out and "add_arguments" not in out   # no developer notes
    assert _imports_after(["--help"]) == set()


@pytest.mark.parametrize("command", LIGHT)
def test_command_help_imports_nothing_heavy(command: str) -> None:
    assert _imports_after([command, "--help"]) == set()


@pytest.mark.parametrize("command", OWN)
def test_every_option_has_help_and_its_default_shown(command: str) -> None:
    p = _subparser(command)
    formatter = p._get_formatter()
    required_groups = {a for g in p._mutually_exclusive_groups if g.required
                       for a in g._group_actions}
    missing = []
    for action in p._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        flag = action.option_strings[-1]
        assert action.help, f"{command} {flag} has no help"
        if (action.dest == "help" or action.default is False or action.required
                or action in required_groups):
            continue
        shown = formatter._expand_help(action)       # the help text as --help prints it
        if "default" not in shown:
            missing.append(f"{flag}: {shown}")
    assert not missing, f"{command}: no default shown for\n" + "\n".join(missing)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_of_every_command_has_help(command: str) -> None:
    p = _subparser(command)
    bare = [a.option_strings[-1] if a.option_strings else a.dest for a in p._actions
            if not a.help and a.help != argparse.SUPPRESS]
    assert not bare, f"{command}: options without help: {bare}"


def test_quantize_choices_written_out_for_a_fast_help_are_the_real_ones() -> None:
    from step3_edge.quantize.cli import SCHEME_NAMES, SHARD_MB
    from step3_edge.quantize.convert import DEFAULT_SHARD_BYTES
    from step3_edge.quantize.schemes import SCHEMES

    assert SCHEME_NAMES == tuple(sorted(SCHEMES))
    assert SHARD_MB << 20 == DEFAULT_SHARD_BYTES


@pytest.mark.parametrize("command", MODEL_DEFAULTS)
def test_the_model_flag_is_optional_where_a_default_model_exists(command: str) -> None:
    p = _subparser(command)
    model = next(a for a in p._actions if "--model" in a.option_strings)
    assert not model.required and model.default is None
    assert "default" in (model.help or "") and "embedded" in model.help


@pytest.mark.parametrize("command", ["plan", "export", "quantize"])
def test_the_checkpoint_commands_take_model_too(command: str) -> None:
    assert any("--model" in a.option_strings for a in _subparser(command)._actions)


@pytest.mark.parametrize("command", RUNTIME_COMMANDS)
def test_bundle_is_a_hidden_alias_of_model(command: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    p = _subparser(command)
    extra = ["--prompts", "p.txt"] if command == "profile" else []
    args = p.parse_args(["--bundle", "/some/bundle", *extra])
    assert args.model == "/some/bundle"
    assert "deprecated" in capsys.readouterr().err
    assert p.parse_args(["--model", "/x", *extra]).model == "/x"
    assert "--bundle" not in p.format_help()


@pytest.mark.parametrize("command", RUNTIME_COMMANDS)
def test_runtime_flags_come_from_one_table(command: str) -> None:
    from step3_edge.cli import runtime_overrides
    from step3_edge.runtime.api import OVERRIDES

    p = _subparser(command)
    flags = {s for a in p._actions for s in a.option_strings}
    assert {o.flag for o in RUNTIME_OPTIONS} <= flags
    assert {o.key for o in RUNTIME_OPTIONS} <= set(OVERRIDES)
    extra = ["--prompts", "p.txt"] if command == "profile" else []
    args = p.parse_args(["--kv-tokens", "4096", "--resident", "0.25", "--miss", "copy",
                         "--backend", "torch", "--afd", "--threads", "2", "--dtype",
                         "float32", "--cache", "lru", *extra])
    assert runtime_overrides(args) == {"kv_tokens": 4096, "resident": 0.25, "miss": "copy",
                                       "backend": "torch", "afd": True, "threads": 2,
                                       "dtype": "float32", "cache": "lru"}
    with pytest.raises(SystemExit):
        p.parse_args(["--resident", "1.5", *extra])         # a fraction above 1


def test_plan_defaults_devices_as_export(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--preset", "tiny", "--target", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["devices"] == 1
    assert main(["plan", "--preset", "full", "--target", "l20", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["devices"] == 8
    assert main(["plan", "--preset", "tiny", "--target", "cpu", "--devices", "0"]) == 2


def test_a_checkpoint_is_exported_once_and_a_bundle_used_as_it_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from step3_edge.cli import resolve_bundle
    from step3_edge.defaults import default_model
    from step3_edge.errors import BundleError

    monkeypatch.setenv("STEP3_EDGE_CACHE", str(tmp_path / "cache"))
    bundle, name = resolve_bundle(default_model(), progress=False)
    assert (bundle / "manifest.json").is_file() and bundle.is_relative_to(tmp_path)
    assert name == default_model().name
    stamp = (bundle / "manifest.json").stat().st_mtime_ns
    assert resolve_bundle(str(default_model()), progress=False)[0] == bundle
    assert (bundle / "manifest.json").stat().st_mtime_ns == stamp      # not exported again
    assert resolve_bundle(bundle, progress=False) == (bundle, None)
    for bad in (tmp_path / "missing", tmp_path):
        with pytest.raises(BundleError) as e:
            resolve_bundle(bad, progress=False)
        assert "--model" in str(e.value) and "config.json" in str(e.value)


def test_chat_runs_on_the_default_model_without_a_flag(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("STEP3_EDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("What colour is the circle?\n/quit\n"))
    assert main(["chat", "--max-new-tokens", "4", "--dtype", "float32", "--threads", "1"]) == 0
    assert capsys.readouterr().out.strip()


def _hub_snapshot(src: Path, root: Path) -> Path:
    """`src` as `huggingface-cli download` leaves it in the hub cache:
    models--ORG--NAME/snapshots/<rev>/<file> -> ../../blobs/<sha256>."""
    import hashlib
    import shutil

    repo = root / "models--stepfun-ai--step3"
    rev = hashlib.sha1(src.name.encode()).hexdigest()
    snap, blobs = repo / "snapshots" / rev, repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    for f in sorted(src.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blobs / digest)
        (snap / f.name).symlink_to(f"../../blobs/{digest}")
    return snap


def test_a_hub_cache_snapshot_is_a_model_for_every_command(
        tiny_bf16: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """plan, generate, quantize and export read a hub snapshot whose files are links into
    the repo cache's blobs/; the runtime commands (chat, profile, app, serve) export it into
    the cache; a link out of the repo cache is still refused by each, with exit status 2."""
    from step3_edge.cli import resolve_bundle

    monkeypatch.setenv("STEP3_EDGE_CACHE", str(tmp_path / "cache"))
    snap = _hub_snapshot(tiny_bf16, tmp_path / "hub")
    assert all((snap / f.name).is_symlink() for f in tiny_bf16.iterdir())
    assert main(["plan", "--model", str(snap), "--target", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["devices"] == 1
    assert main(["generate", "--model", str(snap), "--raw", "--max-new-tokens", "2", "--json",
                 "Once upon a time"]) == 0
    assert len(json.loads(capsys.readouterr().out)["generated_token_ids"]) <= 2
    assert main(["quantize", "--model", str(snap), "--target", "cpu", "--out",
                 str(tmp_path / "q"), "--quiet"]) == 0
    assert main(["export", "--model", str(snap), "--target", "cpu", "--out",
                 str(tmp_path / "b"), "--no-onnx", "--quiet"]) == 0
    assert main(["inspect", str(tmp_path / "b")]) == 0
    bundle, _ = resolve_bundle(snap, progress=False)
    assert (bundle / "manifest.json").is_file() and bundle.is_relative_to(tmp_path / "cache")
    capsys.readouterr()

    shard = json.loads((snap / "model.safetensors.index.json").read_text())["weight_map"][
        "model.norm.weight"]
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((snap / shard).read_bytes())           # the same bytes, out of the repo
    (snap / shard).unlink()
    (snap / shard).symlink_to(outside)
    for argv in (["generate", "--model", str(snap), "--raw", "--max-new-tokens", "1", "x"],
                 ["quantize", "--model", str(snap), "--target", "cpu", "--out",
                  str(tmp_path / "q2"), "--quiet"],
                 ["export", "--model", str(snap), "--target", "cpu", "--out",
                  str(tmp_path / "b2"), "--no-onnx", "--quiet"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "outside" in err and "Traceback" not in err, (argv, err)


@pytest.mark.parametrize("argv, flag", [
    (["app", "--concurrency", "0"], "--concurrency"),
    (["app", "--queue-size", "0"], "--queue-size"),
    (["app", "--port", "70000"], "--port"),
    (["serve", "--port", "-1"], "--port"),
    (["serve", "--default-max-tokens", "0"], "--default-max-tokens"),
    (["serve", "--max-body-mb", "0"], "--max-body-mb"),
    (["chat", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["chat", "--top-k", "-1"], "--top-k"),
    (["profile", "--prompts", "p.txt", "--max-new-tokens", "-3"], "--max-new-tokens"),
    (["eval", "--n", "0"], "--n"),
    (["chat", "--kv-tokens", "0"], "--kv-tokens"),
    (["serve", "--threads", "many"], "--threads"),
])
def test_a_value_out_of_range_is_refused_before_any_model_loads(
        argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        _subparser(argv[0]).parse_args(argv[1:])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "Traceback" not in err, err


@pytest.mark.parametrize("target", ["cpu", "l20"])
def test_plan_and_export_take_the_same_device_count_by_default(
        target: str, tiny_bf16: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", str(tiny_bf16), "--target", target, "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)["devices"]
    assert main(["export", "--model", str(tiny_bf16), "--target", target, "--out",
                 str(tmp_path / "b"), "--no-onnx", "--no-trt", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert len(manifest["devices"]) == planned == (1 if target == "cpu" else 8)
