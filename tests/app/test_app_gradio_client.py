"""`gradio_client` drives the running `step3-edge app` on 127.0.0.1 through its `/chat` API."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from app_helpers import EXAMPLES, Served, corrupt_png, enormous_png

from step3_edge.app.gradio_app import ERROR_PREFIX

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def client(gradio_app: Served) -> Any:
    """A fresh client: its own session, so its own chat history."""
    from gradio_client import Client

    return Client(gradio_app.url + "/", verbose=False)


def ask(client: Any, text: str, files: tuple[Path, ...] = (), max_tokens: int = 24
        ) -> tuple[str, str]:
    from gradio_client import handle_file

    message = {"text": text, "files": [handle_file(str(f)) for f in files]}
    answer, stats = client.predict(message, 0.0, 1.0, max_tokens, api_name="/chat")
    return answer, stats


def prompt_tokens(stats: str) -> int:
    m = re.search(r"tokens: \*\*(\d+)\*\* prompt", stats)
    assert m, stats
    return int(m.group(1))


def test_text_question(client: Any) -> None:
    answer, stats = ask(client, "How many shapes are there?")
    assert isinstance(answer, str) and answer.strip()
    assert not answer.startswith(ERROR_PREFIX), answer
    assert "tokens/s" in stats and "expert-cache hit rate" in stats and "RSS" in stats


def test_image_question_and_history_keeps_the_image(client: Any) -> None:
    text_only, _ = ask(client, "Hello")
    answer, stats = ask(client, "What colour is the circle?", (EXAMPLES / "shapes.png",))
    assert not answer.startswith(ERROR_PREFIX), answer
    with_image = prompt_tokens(stats)
    assert with_image > 100, stats              # the image's tokens are in the prompt
    follow_up, stats2 = ask(client, "And the square?")
    assert not follow_up.startswith(ERROR_PREFIX), follow_up
    assert prompt_tokens(stats2) > with_image   # the earlier image is still in the conversation


def test_streamed_answer(client: Any) -> None:
    from gradio_client import handle_file

    job = client.submit({"text": "Describe the image.",
                         "files": [handle_file(str(EXAMPLES / "three_shapes.png"))]},
                        0.0, 1.0, 48, api_name="/chat")
    partials = [answer for answer, _ in job]
    final = job.result()[0]
    texts = [p for i, p in enumerate(partials) if p and (i == 0 or p != partials[i - 1])]
    assert len(texts) >= 3, f"expected a streamed answer, got updates {partials!r}"
    for a, b in zip(texts, texts[1:], strict=False):
        assert b.startswith(a), (a, b)            # each update extends the previous one
    assert final == texts[-1] and not final.startswith(ERROR_PREFIX)


def test_corrupt_and_enormous_images_answer_in_chat_and_the_queue_goes_on(
        client: Any, tmp_path: Path) -> None:
    bad, _ = ask(client, "What is this?", (corrupt_png(tmp_path / "corrupt.png"),))
    assert bad.startswith(ERROR_PREFIX) and "image" in bad.lower(), bad
    huge, _ = ask(client, "And this?", (enormous_png(tmp_path / "huge.png"),))
    assert huge.startswith(ERROR_PREFIX) and "pixels" in huge.lower(), huge
    # the same session goes on: the failed turns are dropped from the conversation
    ok, stats = ask(client, "What colour is the circle?", (EXAMPLES / "shapes.png",))
    assert not ok.startswith(ERROR_PREFIX), ok
    assert "tokens/s" in stats


def test_uploads_above_the_size_limit_are_refused(gradio_app: Served, tmp_path: Path) -> None:
    import httpx

    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (21 * 2**20))           # the app's limit is 20 MB
    with big.open("rb") as f:
        r = httpx.post(gradio_app.url + "/gradio_api/upload", files={"files": f}, timeout=60)
    assert r.status_code == 413, r.text[:200]
