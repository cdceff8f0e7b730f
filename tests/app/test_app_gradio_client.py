"""`gradio_client` drives the running `step3-edge app` on 127.0.0.1 through its stateless `/chat`
API: each call answers its message (after the history it passes, if any), returns the model's
text without the chat's markup, and raises the reason of a bad request."""

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
    """A client with its own session."""
    from gradio_client import Client

    return Client(gradio_app.url + "/", verbose=False)


def ask(client: Any, text: str, files: tuple[Path, ...] = (), max_tokens: int = 24,
        history: list[dict] | None = None) -> tuple[str, str]:
    from gradio_client import handle_file

    message = {"text": text, "files": [handle_file(str(f)) for f in files]}
    if history is None:
        return client.predict(message, 0.0, 1.0, max_tokens, api_name="/chat")
    return client.predict(message, 0.0, 1.0, max_tokens, history, api_name="/chat")


def prompt_tokens(stats: str) -> int:
    m = re.search(r"tokens: \*\*(\d+)\*\* prompt", stats)
    assert m, stats
    return int(m.group(1))


def test_text_question(client: Any) -> None:
    answer, stats = ask(client, "How many shapes are there?")
    assert isinstance(answer, str) and answer.strip()
    assert not answer.startswith(ERROR_PREFIX), answer
    assert "tokens/s" in stats and "expert-cache hit rate" in stats and "RSS" in stats


def test_one_client_asking_twice_gets_the_same_answer_as_a_fresh_one(gradio_app: Served,
                                                                      client: Any) -> None:
    """No turn of an earlier call is carried into the next one."""
    from gradio_client import Client

    circle = ("What colour is the circle?", (EXAMPLES / "shapes.png",))
    first, stats1 = ask(client, *circle)
    ask(client, "How many shapes are there?", (EXAMPLES / "four_shapes_wide.png",))
    again, stats2 = ask(client, *circle)
    fresh, stats3 = ask(Client(gradio_app.url + "/", verbose=False), *circle)
    assert first == again == fresh, (first, again, fresh)
    assert prompt_tokens(stats1) == prompt_tokens(stats2) == prompt_tokens(stats3) > 100


def test_history_is_passed_explicitly(client: Any) -> None:
    alone, stats = ask(client, "And the square?")
    history = [{"role": "user", "content": "What colour is the circle?"},
               {"role": "assistant", "content": "red"}]
    follow_up, stats2 = ask(client, "And the square?", history=history)
    assert not follow_up.startswith(ERROR_PREFIX), follow_up
    assert prompt_tokens(stats2) > prompt_tokens(stats)     # the earlier turns are in it
    assert prompt_tokens(ask(client, "And the square?")[1]) == prompt_tokens(stats)


def test_the_answer_is_the_model_text_without_chat_markup(client: Any) -> None:
    from step3_edge.app.gradio_app import THINK_SHOWN
    from step3_edge.tokenizer import THINK_END

    answer, _ = ask(client, "What colour is the circle?", (EXAMPLES / "shapes.png",), 48)
    assert THINK_SHOWN not in answer and not answer.startswith(ERROR_PREFIX), answer
    if THINK_END in answer:          # a trained model thinks first: `</think>` as it came
        assert answer.rpartition(THINK_END)[2].strip(), answer


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


def test_corrupt_and_enormous_images_raise_their_reason_and_the_queue_goes_on(
        client: Any, app_env: dict[str, str], tmp_path: Path) -> None:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as e:
        ask(client, "What is this?", (corrupt_png(tmp_path / "corrupt.png"),))
    msg = str(e.value)
    assert "image" in msg.lower() and "corrupt.png" in msg, msg
    assert app_env["GRADIO_TEMP_DIR"] not in msg and "/tmp" not in msg, msg   # the name only
    assert "Error:" not in msg and " object at 0x" not in msg, msg
    with pytest.raises(AppError) as e:
        ask(client, "And this?", (enormous_png(tmp_path / "huge.png"),))
    assert "pixels" in str(e.value).lower(), str(e.value)
    with pytest.raises(AppError):
        ask(client, "   ")
    ok, stats = ask(client, "What colour is the circle?", (EXAMPLES / "shapes.png",))
    assert ok and not ok.startswith(ERROR_PREFIX), ok
    assert "tokens/s" in stats


def test_uploads_above_the_size_limit_are_refused(gradio_app: Served, tmp_path: Path) -> None:
    import httpx

    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (21 * 2**20))           # the app's limit is 20 MB
    with big.open("rb") as f:
        r = httpx.post(gradio_app.url + "/gradio_api/upload", files={"files": f}, timeout=60)
    assert r.status_code == 413, r.text[:200]
