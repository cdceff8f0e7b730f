"""The official `openai` client against `step3-edge serve` on 127.0.0.1."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from app_helpers import EXAMPLES, Served, corrupt_png

pytestmark = pytest.mark.timeout(600)
MODEL = "step3-test"
THREE = EXAMPLES / "three_shapes.png"        # "Describe the image." gets a long answer


@pytest.fixture(scope="module")
def client(openai_server: Served) -> Any:
    import openai

    return openai.OpenAI(base_url=openai_server.url + "/v1", api_key="not-needed",
                         max_retries=0, timeout=120)


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_message(question: str, path: Path = EXAMPLES / "shapes.png") -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(path)}},
        {"type": "text", "text": question}]}]


def test_models_and_health(client: Any, openai_server: Served) -> None:
    import httpx

    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(openai_server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_plain_request(client: Any) -> None:
    r = client.chat.completions.create(model=MODEL, max_tokens=12, temperature=0,
                                       messages=[{"role": "user", "content": "Say hello"}])
    assert r.object == "chat.completion" and r.model == MODEL
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    # a trained model may end its turn at once on a prompt outside its task (0 tokens)
    assert 0 <= r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0
    assert (choice.finish_reason == "length") == (r.usage.completion_tokens == 12)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_equals_the_plain_answer(client: Any) -> None:
    kw: dict[str, Any] = dict(model=MODEL, max_tokens=48, temperature=0,
                              messages=image_message("Describe the image.", THREE))
    plain = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(1 for p in pieces if p) >= 2, pieces          # streamed, not one block
    assert "".join(pieces) == plain
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1


def test_image_request(client: Any) -> None:
    text_only = client.chat.completions.create(
        model=MODEL, max_tokens=4, temperature=0,
        messages=[{"role": "user", "content": "What colour is the circle?"}])
    r = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                       messages=image_message("What colour is the circle?"))
    assert isinstance(r.choices[0].message.content, str)
    assert r.usage.prompt_tokens > text_only.usage.prompt_tokens + 100   # the image's tokens


def test_stop_string_cuts_the_answer(client: Any) -> None:
    kw: dict[str, Any] = dict(model=MODEL, max_tokens=48, temperature=0,
                              messages=image_message("Describe the image.", THREE))
    full = client.chat.completions.create(**kw).choices[0].message.content
    assert len(full) >= 4, full
    stop = full[2:4]
    cut = client.chat.completions.create(stop=[stop], **kw).choices[0]
    assert cut.message.content == full[:full.index(stop)]
    assert cut.finish_reason == "stop"


def test_sampling_parameters_are_accepted(client: Any) -> None:
    r = client.chat.completions.create(model=MODEL, max_tokens=6, temperature=0.8, top_p=0.9,
                                       seed=3, messages=[{"role": "user", "content": "Hi"}])
    assert r.usage.completion_tokens <= 6


@pytest.mark.parametrize("body, status, param", [
    ({"messages": "hello"}, 400, "messages"),
    ({"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}]},
     400, "messages[0].content[0]"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
])
def test_malformed_requests_get_json_errors(openai_server: Served, body: dict, status: int,
                                            param: str) -> None:
    import httpx

    body = {"model": MODEL, **body}
    r = httpx.post(openai_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_bad_json_corrupt_image_and_unknown_route(openai_server: Served, client: Any,
                                                  tmp_path: Path) -> None:
    import httpx
    import openai

    url = openai_server.url
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert httpx.get(url + "/v1/nothing-here").status_code == 404
    assert "error" in httpx.get(url + "/v1/nothing-here").json()
    for stream in (False, True):      # a corrupt image is a 400 before any stream starts
        with pytest.raises(openai.BadRequestError) as e:
            out = client.chat.completions.create(
                model=MODEL, max_tokens=4, stream=stream,
                messages=image_message("?", corrupt_png(tmp_path / "bad.png")))
            list(out) if stream else None
        assert e.value.status_code == 400
        assert e.value.body["code"] == "invalid_image" and "image" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=4, messages=[])
    assert e.value.status_code == 400
    # still serving: the task prompt the model answers at temperature 0 (a sampled answer to
    # an off-task prompt may end its turn at once, with no token)
    ok = client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0,
                                        messages=image_message("Describe the image.", THREE))
    assert ok.usage.completion_tokens >= 1 and ok.choices[0].message.content


def test_eight_concurrent_clients_all_complete(openai_server: Served) -> None:
    import openai

    def one(i: int) -> tuple[str, str]:
        c = openai.OpenAI(base_url=openai_server.url + "/v1", api_key="x", max_retries=0,
                          timeout=300)
        msgs = (image_message("What colour is the circle?") if i % 4 == 3 else
                [{"role": "user", "content": f"Question {i % 2}: name a shape."}])
        kw: dict[str, Any] = dict(model=MODEL, max_tokens=12, temperature=0, messages=msgs)
        if i % 2:
            chunks = c.chat.completions.create(stream=True, **kw)
            return msgs[-1]["content"] if isinstance(msgs[-1]["content"], str) else "img", \
                "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        r = c.chat.completions.create(**kw)
        return (msgs[-1]["content"] if isinstance(msgs[-1]["content"], str) else "img",
                r.choices[0].message.content)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert len(results) == 8
    by_prompt: dict[str, set[str]] = {}
    for prompt, text in results:
        by_prompt.setdefault(prompt, set()).add(text)
    # greedy answers to the same prompt agree, however the batch was formed
    assert all(len(texts) == 1 for texts in by_prompt.values()), json.dumps(
        {k: sorted(v) for k, v in by_prompt.items()})


def test_prompt_over_the_context_is_a_400(client: Any) -> None:
    import openai

    limit = 65536
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=limit, stream=True,
                                       messages=[{"role": "user", "content": "x" * 64}])
    assert e.value.body["code"] in ("context_length_exceeded", None)
    assert "context" in e.value.body["message"] or "max_tokens" in e.value.body["message"]


def test_a_client_that_leaves_mid_stream_does_not_hurt_the_server(openai_server: Served,
                                                                  client: Any) -> None:
    import httpx

    body = {"model": MODEL, "max_tokens": 200, "stream": True, "temperature": 0,
            "messages": image_message("Describe the image.", THREE)}
    with httpx.stream("POST", openai_server.url + "/v1/chat/completions", json=body,
                      timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content": "' in line and '""' not in line:
                break                                  # leave after the first piece of text
    # still serving: the task prompt the model answers at temperature 0 (a sampled answer to
    # an off-task prompt may end its turn at once, with no token)
    ok = client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0,
                                        messages=image_message("Describe the image.", THREE))
    assert ok.usage.completion_tokens >= 1 and ok.choices[0].message.content
