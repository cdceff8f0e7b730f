"""Every code block of README.md and docs/*.md that is meant to run does run.

Fence tags:
- ```python: run as a script in a fresh folder (in this process, where torch is loaded
  already; a block with an `if __name__ == "__main__":` guard runs as `python block.py` in a
  process of its own, since it may spawn processes that re-import it);
- ```python server / ```python app: the same, against a `step3-edge serve` / `step3-edge app`
  of the embedded default model that this module starts (the block's `127.0.0.1:8000` /
  `127.0.0.1:7860` is replaced by that server's address);
- ```bash: run with `bash -e`;
- ```console: each `$ ` line is a command (`step3-edge ...` runs `step3_edge.cli.main` in this
  process; anything else, or a line with a redirection or pipe, runs through bash); the lines
  after it, up to the next `$ ` line, are output that must appear in its stdout, in order (a
  `...` line skips any number of lines);
- anything else (```text, ```json, no tag): shown, not run.

Each block runs in its own folder holding `ckpt/` (a synthetic `tiny` checkpoint, as
`step3-edge synth --preset tiny --out ckpt` writes it) and `bundle/` (that checkpoint exported
for the `cpu` target without ONNX subgraphs), unless the block writes one of them itself, and
`step3_edge/assets/examples/` (the example images, for the CLI's checkout-relative paths).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUN_TAGS = {"python", "bash", "console"}
FENCE = re.compile(r"^(\s*)```(.*)$")
BLOCK_TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    path: Path
    line: int          # 1-based line of the opening fence
    tag: str
    info: str          # the words after the tag
    text: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def parse_blocks(path: Path) -> list[Block]:
    out: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, words = m.group(1), m.group(2).split()
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        tag = words[0] if words else ""
        out.append(Block(path, start + 1, tag, " ".join(words[1:]), "\n".join(body) + "\n"))
    return out


ALL_BLOCKS = [b for p in DOCS for b in parse_blocks(p)]
RUNNABLE = [b for b in ALL_BLOCKS if b.tag in RUN_TAGS]


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ckpt/ and bundle/ as the README's walkthrough makes them."""
    from step3_edge.config import Step3Config
    from step3_edge.export.bundle import export_bundle
    from step3_edge.synth import write_checkpoint

    root = tmp_path_factory.mktemp("doc-samples")
    ckpt = write_checkpoint(Step3Config.preset("tiny"), root / "ckpt", "bf16", seed=0,
                            progress=False)
    export_bundle(ckpt, "cpu", 1, root / "bundle", onnx=False, trt=False, progress=False)
    return root


@pytest.fixture(scope="module")
def doc_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = dict(os.environ)
    env.update(STEP3_EDGE_CACHE=str(tmp_path_factory.mktemp("doc-cache")),
               PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
               GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SERVERS = {"server": ("serve", "127.0.0.1:8000", "/livez"),
           "app": ("app", "127.0.0.1:7860", "/")}
# the extras a server block needs (the `app` and `dev` extras); without them its blocks skip
NEEDS = {"server": ("fastapi", "uvicorn", "openai"), "app": ("gradio", "gradio_client")}


def _missing(kind: str) -> list[str]:
    return [m for m in NEEDS[kind] if importlib.util.find_spec(m) is None]


@pytest.fixture(scope="module", autouse=True)
def servers(doc_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """`step3-edge serve` and `step3-edge app` of the embedded default model on free ports of
    127.0.0.1, started first (they load while the other blocks run). Yields a function that
    waits until the one a block names answers and returns its host:port."""
    procs: dict[str, tuple[subprocess.Popen, str, Path]] = {}
    for kind, (command, _, ready) in SERVERS.items():
        if not any(kind in b.info.split() for b in RUNNABLE) or _missing(kind):
            continue
        port = _free_port()
        log = tmp_path_factory.mktemp(f"doc-{command}") / f"{command}.log"
        with open(log, "wb") as out:
            procs[kind] = (subprocess.Popen(
                [sys.executable, "-m", "step3_edge.cli", command, "--host", "127.0.0.1",
                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=doc_env,
                cwd=REPO), f"127.0.0.1:{port}", log)

    def address(kind: str) -> str:
        proc, addr, log = procs[kind]
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{kind} exited with {proc.returncode}:\n"
                                   + log.read_text(errors="replace")[-4000:])
            try:
                with urllib.request.urlopen(f"http://{addr}{SERVERS[kind][2]}",
                                            timeout=5) as r:
                    if r.status == 200:
                        return addr
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() - t0 > 240:
                raise RuntimeError(f"{kind} not ready:\n" + log.read_text(errors="replace"))
            time.sleep(0.25)

    try:
        yield address
    finally:
        for proc, _, _ in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc, _, _ in procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


def _workdir(block: Block, samples: Path, tmp_path: Path) -> Path:
    """A fresh folder with ckpt/ and bundle/ (unless the block writes them) and the examples."""
    work = tmp_path / "work"
    work.mkdir()
    written = set(re.findall(r"--out\s+(\S+?)/?(?:\s|$)", block.text))
    for name in ("ckpt", "bundle"):
        if name not in written:
            (work / name).symlink_to(samples / name)
    if block.tag in ("bash", "console"):     # checkout-relative image paths of the CLI examples
        ex = work / "step3_edge" / "assets" / "examples"
        ex.parent.mkdir(parents=True)
        ex.symlink_to(REPO / "step3_edge" / "assets" / "examples")
    return work


def _run(cmd: list[str] | str, work: Path, env: dict[str, str], block: Block,
         shell: bool = False) -> str:
    r = subprocess.run(cmd, cwd=work, env=env, shell=shell, capture_output=True, text=True,
                       timeout=BLOCK_TIMEOUT_S, executable="/bin/bash" if shell else None)
    if r.returncode != 0:
        pytest.fail(f"{block.id}: exit status {r.returncode}\n--- block\n{block.text}"
                    f"--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-5000:]}")
    return r.stdout


def _console_steps(text: str) -> list[tuple[str, list[str]]]:
    steps: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps and line.strip():
            steps[-1][1].append(line.rstrip())
    return steps


def _check_output(block: Block, cmd: str, expected: list[str], got: str) -> None:
    lines = [ln.rstrip() for ln in got.splitlines()]
    pos, skipping = 0, False
    for want in expected:
        if want.strip() == "...":
            skipping = True
            continue
        if skipping:
            while pos < len(lines) and lines[pos] != want:
                pos += 1
        if pos >= len(lines) or lines[pos] != want:
            pytest.fail(f"{block.id}: `{cmd}` printed\n{got}\n--- expected a line\n{want}")
        pos, skipping = pos + 1, False


# ------------------------------------------------------------------------------------- tests
def test_docs_have_runnable_blocks() -> None:
    assert any(b.path.name == "README.md" for b in RUNNABLE)
    for b in RUNNABLE:
        assert b.tag != "console" or b.text.lstrip().startswith("$ "), \
            f"{b.id}: a console block starts with a `$ ` command"


def test_make_demo_is_the_documented_command() -> None:
    """README's quick start shows the command `make demo` runs."""
    make = (REPO / "Makefile").read_text()
    demo = re.search(r"^demo:.*\n\t(.+)$", make, re.M)
    assert demo is not None
    cmd = demo.group(1).replace("$(VENV)/bin/", "")
    readme = (REPO / "README.md").read_text()
    assert f"$ {cmd}" in readme, f"README does not show `make demo`'s command: {cmd}"
    assert re.search(r"^test:.*\n\t.*pytest", make, re.M)


@contextlib.contextmanager
def _in(work: Path, env: dict[str, str]):
    """cwd and environment of a block run in this process, restored afterwards."""
    old_cwd, old_env = os.getcwd(), {k: os.environ.get(k) for k in env}
    os.chdir(work)
    os.environ.update(env)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cli(block: Block, cmd: str, work: Path, env: dict[str, str]) -> str:
    """`step3-edge ARGS` through `step3_edge.cli.main`, in this process; its stdout."""
    from step3_edge.cli import main

    argv = shlex.split(cmd)
    if argv[0] != "step3-edge" or set(argv) & {"<", ">", ">>", "|", "&&", ";"}:   # bash
        return _run(cmd, work, {**os.environ, **env}, block, shell=True)
    out, err = io.StringIO(), io.StringIO()
    with _in(work, env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv[1:])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    if rc != 0:
        pytest.fail(f"{block.id}: `{cmd}` exit status {rc}\n--- stdout\n"
                    f"{out.getvalue()[-3000:]}\n--- stderr\n{err.getvalue()[-5000:]}")
    return out.getvalue()


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_doc_block_runs(block: Block, samples: Path, doc_env: dict[str, str], servers,
                        tmp_path: Path) -> None:
    work = _workdir(block, samples, tmp_path)
    env = {k: doc_env[k] for k in ("STEP3_EDGE_CACHE", "GRADIO_ANALYTICS_ENABLED")}
    if block.tag == "python":
        text = block.text
        for kind in set(block.info.split()) & set(SERVERS):
            if _missing(kind):
                pytest.skip(f"needs {', '.join(_missing(kind))} (pip install -e '.[app,dev]')")
            text = text.replace(SERVERS[kind][1], servers(kind))
        script = tmp_path / "block.py"      # outside the work folder: not on sys.path there
        script.write_text(text)
        if "__main__" in text:
            _run([sys.executable, str(script)], work, doc_env, block)
        else:
            with _in(work, env):
                exec(compile(text, f"{block.id}", "exec"),
                     {"__name__": "__main__", "__file__": str(script)})
    elif block.tag == "bash":
        _run(block.text, work, doc_env, block, shell=True)
    else:
        for cmd, expected in _console_steps(block.text):
            _check_output(block, cmd, expected, _cli(block, cmd, work, env))


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings."""
    out = set()
    for line in path.read_text().splitlines():
        m = re.match(r"^#+\s+(.*)$", line)
        if m:
            a = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(a)
    return out


def test_doc_links_resolve() -> None:
    """Relative links of README.md and docs/*.md name files (and headings) that exist."""
    bad = []
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists():
                bad.append(f"{doc.relative_to(REPO)}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                bad.append(f"{doc.relative_to(REPO)}: {target} (no such heading)")
    assert not bad, "\n".join(bad)


def test_runtime_options_documented() -> None:
    """docs/runtime.md names every `Step3Runtime.load` option and every runtime flag."""
    from step3_edge.cli import RUNTIME_OPTIONS
    from step3_edge.runtime.api import OVERRIDES

    doc = (REPO / "docs" / "runtime.md").read_text()
    load = doc[doc.index("## Load options"):doc.index("## Command-line options")]
    flags = doc[doc.index("## Command-line options"):doc.index("## Placement planner")]
    assert not [k for k in OVERRIDES if f"`{k}`" not in load]
    assert not [o.flag for o in RUNTIME_OPTIONS if f"`{o.flag}" not in flags]


def test_server_metrics_documented() -> None:
    """docs/serving.md's metrics table names every metric `GET /metrics` can expose."""
    from step3_edge.app.metrics import BYTES_MOVED, RUNTIME_METRICS, ServerMetrics

    stats: dict[str, dict[str, float]] = {}
    for section, key, *_ in RUNTIME_METRICS:
        stats.setdefault(section, {})[key] = 1
    for key, _ in BYTES_MOVED:
        stats["experts"][key] = 1
    text = ServerMetrics().render(stats, {"model": "m"})
    names = [line.split()[2].removeprefix("step3_edge_") for line in text.splitlines()
             if line.startswith("# TYPE ")]
    assert len(names) > 10
    doc = (REPO / "docs" / "serving.md").read_text()
    table = doc[doc.index("The metrics of `GET /metrics`"):]
    assert not [n for n in names if not re.search(rf"`{n}[`{{]", table)]


def test_readme_command_table_matches_the_cli() -> None:
    """README's command table has a row per `step3-edge` command, and every option it names
    is one of that command's."""
    import argparse

    from step3_edge.cli import COMMANDS, build_parser

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Command line"):readme.index("## Python API")]
    rows = dict(re.findall(r"^\| `([a-z]+)` \| [^|]+ \| (.+) \|$", section, re.M))
    assert sorted(rows) == sorted(COMMANDS)
    bad = []
    for name, options in rows.items():
        parser = build_parser(name)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        flags = {s for a in sub.choices[name]._actions for s in a.option_strings}
        bad += [f"{name} {f}" for f in re.findall(r"`(--[a-z][a-z0-9-]*)", options)
                if f not in flags]
    assert not bad, bad
