"""Helpers of the app tests: servers as subprocesses on 127.0.0.1, bad images."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "step3_edge" / "assets" / "examples"
START_TIMEOUT_S = 240
API_KEY = "test-key-3f9c"           # the key of the `keyed_server` fixture


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    """A running server subprocess."""

    url: str
    proc: subprocess.Popen
    log: Path
    started_s: float            # seconds from spawn to the first successful response

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, t0: float) -> float:
    while time.monotonic() - t0 < START_TIMEOUT_S:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n"
                               f"{log.read_text(errors='replace')[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"server not ready after {START_TIMEOUT_S} s:\n"
                       f"{log.read_text(errors='replace')[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Terminate a server we started, then kill it if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def spawn(args: list[str], ready_path: str, log: Path, env: dict[str, str]) -> Served:
    """Start `step3-edge ARGS --host 127.0.0.1 --port P` and wait until `ready_path` answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "step3_edge.cli", *args, "--host", "127.0.0.1",
           "--port", str(port)]
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        started = _wait_ready(proc, url + ready_path, log, t0)
    except BaseException:
        stop(proc)
        raise
    return Served(url, proc, log, started)


def corrupt_png(path: Path) -> Path:
    """A file that starts like a PNG and is not one."""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"definitely not image data " * 20)
    return path


def enormous_png(path: Path, side: int = 30_000) -> Path:
    """A small, valid PNG header that claims side x side pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data +
                struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)      # 8-bit grey
    idat = zlib.compress(b"\x00" * (side + 1) * 4)                  # a few rows only
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) +
                     chunk(b"IEND", b""))
    return path


def printable_checkpoint(out: Path) -> Path:
    """A synthetic `tiny` checkpoint (block-fp8, as the default) whose lm_head favours the
    printable byte tokens, so that answers have text to stream; used while the embedded default
    is the random synthetic model, whose answers decode to nothing."""
    import torch

    from step3_edge.config import Step3Config
    from step3_edge.layout import expected_weights
    from step3_edge.synth import random_weight, write_checkpoint

    cfg = Step3Config.preset("tiny")
    weights = {s.name: random_weight(s, 7) for s in expected_weights(cfg).values()}
    head = weights["lm_head.weight"].float()
    keep = torch.zeros(head.shape[0], 1)
    keep[3 + 32:3 + 127] = 4.0                   # byte tokens ' '..'~'
    keep[1] = 1.0                                # end of sentence, now and then
    weights["lm_head.weight"] = (head * keep).to(head.dtype if head.dtype != torch.float32
                                                 else torch.bfloat16)
    return write_checkpoint(cfg, out, "block-fp8", weights=weights, progress=False)


def default_is_trained() -> bool:
    """True once a trained default model ships in step3_edge/assets/default-model."""
    from step3_edge.defaults import SHIPPED

    return (SHIPPED / "config.json").is_file()


# ------------------------------------------------------------------ the browser
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-quic", "--no-first-run", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage"]
# records every change of the answer to the next question, with its time (ms, page clock)
WATCH_JS = """() => {
  if (window.__obs) window.__obs.disconnect();
  window.__seen = [];
  const root = document.querySelector('#chatbot');
  const bots = () => root.querySelectorAll('[data-testid="bot"]');
  const before = window.__before = bots().length;
  const note = () => {
    const all = bots();
    if (all.length <= before) return;           // only the answer to the next question
    const text = all[all.length - 1].innerText.trim();
    const seen = window.__seen;
    if (text && (!seen.length || seen[seen.length - 1].text !== text))
      seen.push({t: performance.now(), text: text});
  };
  window.__obs = new MutationObserver(note);
  window.__obs.observe(root, {subtree: true, childList: true, characterData: true});
}"""


def browser_unavailable() -> str | None:
    """Why the browser test cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install 'step3-edge[dev]')"
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is missing (apt-get install chromium; .ci/run does it)"
    return None


def launch_browser(p: object) -> object:
    return p.chromium.launch(executable_path=str(CHROMIUM), headless=True,  # type: ignore
                             args=CHROMIUM_ARGS)


def open_app(page: object, url: str, timeout_ms: int = 60_000) -> None:
    """Load the app and wait until its chat input is there (never `networkidle`: Gradio keeps
    a connection open)."""
    page.goto(url, wait_until="load", timeout=timeout_ms)  # type: ignore[attr-defined]
    page.wait_for_selector("#chat_input textarea", timeout=timeout_ms)  # type: ignore


def ask_in_browser(page: object, image: Path | None, question: str, timeout_ms: int = 120_000
                   ) -> dict:
    """Upload `image` (if any), type `question`, send, and wait for the answer to finish.

    Returns the bot-message changes the page saw ({t, text}, ms), the send time and the side
    panel's text once the answer is complete.
    """
    pg = page
    if image is not None:
        pg.set_input_files("#chat_input input[type=file]", str(image))  # type: ignore
        pg.wait_for_selector("#chat_input img", timeout=timeout_ms)  # type: ignore
    pg.fill("#chat_input textarea", question)  # type: ignore
    pg.evaluate(WATCH_JS)  # type: ignore
    sent = pg.evaluate("() => performance.now()")  # type: ignore
    pg.click("#chat_input [data-testid=submit-button]")  # type: ignore
    # done: a new answer is in the chat and the send button is back in place of stop
    pg.wait_for_function(
        "() => document.querySelectorAll('#chatbot [data-testid=\"bot\"]').length > "
        "window.__before && document.querySelector('#chat_input [data-testid=submit-button]')"
        " && !document.querySelector('#chat_input button[aria-label=Stop]')",
        timeout=timeout_ms)  # type: ignore
    return {"sent": sent, "seen": pg.evaluate("() => window.__seen"),  # type: ignore
            "stats": pg.inner_text("#stats")}  # type: ignore
