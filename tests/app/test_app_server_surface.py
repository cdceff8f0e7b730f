"""`step3-edge serve` beyond chat completions, with the official `openai` client: unsupported
fields refused by name, malformed requests as 400s (never 500s), error text in the HTTP
client's words, `/metrics` in the Prometheus text format, `/livez`, and `--api-key`."""

from __future__ import annotations

import base64
import json
import math
import re
import socket
from typing import Any

import pytest
from app_helpers import API_KEY, EXAMPLES, Served

pytestmark = pytest.mark.timeout(600)
MODEL = "step3-test"
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def client(openai_server: Served) -> Any:
    import openai

    return openai.OpenAI(base_url=openai_server.url + "/v1", api_key="not-needed",
                         max_retries=0, timeout=120)


# ------------------------------------------------------------------ unsupported fields
@pytest.mark.parametrize("kwargs, field", [
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"logit_bias": {"42": 5}}, "logit_bias"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"presence_penalty": 1.0}, "presence_penalty"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"store": True}, "store"),
    ({"extra_body": {"top_k": 5}}, "top_k"),
])
def test_every_unsupported_field_is_a_400_naming_it(client: Any, kwargs: dict,
                                                    field: str) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=4, messages=HI, **kwargs)
    assert e.value.status_code == 400
    assert e.value.body["param"] == field, e.value.body
    assert field in e.value.body["message"]
    assert "True" not in e.value.body["message"]        # JSON words (true), not Python's


def test_fields_at_their_defaults_are_accepted(client: Any) -> None:
    r = client.chat.completions.create(model=MODEL, max_tokens=4, messages=HI, n=1,
                                       logprobs=False, response_format={"type": "text"},
                                       frequency_penalty=0, presence_penalty=0, user="u-1")
    assert r.choices[0].logprobs is None and r.usage.completion_tokens <= 4


# ------------------------------------------------------------------ malformed requests
def _post(url: str, raw: bytes) -> Any:
    import httpx

    return httpx.post(url + "/v1/chat/completions", content=raw, timeout=60,
                      headers={"content-type": "application/json"})


@pytest.mark.parametrize("raw, code_or_param", [
    (b"[" * 100_000, "invalid_json"),                                     # RecursionError
    (json.dumps({"model": MODEL, "messages": [{"role": ["user"], "content": "x"}]}).encode(),
     "messages[0].role"),                                                 # unhashable
    (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     "messages[0].content[0]"),
    (json.dumps({"messages": HI, "seed": 2**70}).encode(), "seed"),
    (json.dumps({"messages": HI, "temperature": 10**400}).encode(), "temperature"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": ' + b"9" * 5000 + b"}",
     "invalid_json"),
    (json.dumps({"messages": [{"role": "user", "content": "x", "tool_calls": [{}]}]}).encode(),
     "messages[0].tool_calls"),
    (b"\xff\xfe{}", "invalid_json"),
])
def test_malformed_requests_are_400s_not_500s(openai_server: Served, raw: bytes,
                                              code_or_param: str) -> None:
    r = _post(openai_server.url, raw)
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert code_or_param in (err["code"], err["param"]), err
    assert "Traceback" not in err["message"] and "Error:" not in err["message"]


def test_a_body_shorter_than_its_content_length_is_a_400(openai_server: Served) -> None:
    host, port = openai_server.url.removeprefix("http://").split(":")
    # the server (--body-timeout 3) answers once the rest of the body fails to arrive; the
    # socket's own timeout is only there so that a server that never answers fails the test
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n"
                  b'{"messages": [')
        reply = s.recv(65536).decode()
        head, _, body = reply.partition("\r\n\r\n")
        size = re.search(r"content-length: (\d+)", head, re.I)
        while size and len(body.encode()) < int(size.group(1)):
            more = s.recv(65536).decode()
            if not more:
                break
            body += more
        reply = head + "\r\n\r\n" + body
    assert reply.startswith("HTTP/1.1 400"), reply[:200]
    assert '"incomplete_body"' in reply, reply[-300:]


def test_error_text_is_in_the_http_vocabulary(openai_server: Served, client: Any) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=10**9, messages=HI)
    limit = int(re.search(r"expected 1\.\.(\d+)", e.value.body["message"]).group(1))
    for key in ("max_tokens", "max_completion_tokens"):       # prompt + answer > context
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=[
                {"role": "user", "content": "x " * 40}], **{key: limit})
        msg = e.value.body["message"]
        assert key in msg and "max_new_tokens" not in msg, msg
        assert e.value.body["code"] == "context_length_exceeded"
    png = (EXAMPLES / "shapes.png").read_bytes()
    for data in (b"\x89PNG\r\n\x1a\n" + b"junk" * 30, png[: len(png) // 3]):
        url = "data:image/png;base64," + base64.b64encode(data).decode()
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, max_tokens=4, messages=[
                {"role": "user", "content": [{"type": "text", "text": "?"},
                                             {"type": "image_url", "image_url": {"url": url}}]}])
        msg = e.value.body["message"]
        assert e.value.body["param"] == "messages[0].content[1]", e.value.body
        assert "image" in msg and " object at 0x" not in msg and "BytesIO" not in msg, msg
        assert "/tmp" not in msg and "Error:" not in msg, msg


# ------------------------------------------------------------------ metrics and liveness
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_]\w*="(?:[^"\\]|\\.)*",?)*\})? '
                    r'(-?[0-9.eE+-]+|\+Inf|-Inf|NaN)$')


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by metric name; fails on a line outside the text exposition format, a sample
    without its # TYPE, or a histogram whose buckets are not cumulative."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            types[name] = kind
            continue
        m = SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        name = m.group(1)
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in types or types.get(base) == "histogram", f"no # TYPE for {name}"
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out.setdefault(name, []).append((labels, float(m.group(3))))
    for name, kind in types.items():
        if kind == "histogram":
            counts = [v for _, v in out[name + "_bucket"]]
            assert counts == sorted(counts) and out[name + "_count"][0][1] == counts[-1]
    return out


def _value(samples: dict, name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x
                                                           for k, x in labels.items()))


def test_metrics_count_requests_tokens_latency_and_experts(openai_server: Served,
                                                           client: Any) -> None:
    import httpx

    def scrape() -> dict:
        r = httpx.get(openai_server.url + "/metrics", timeout=60)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return parse_prometheus(r.text)

    before = scrape()
    plain = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "Describe."}])
    chunks = list(client.chat.completions.create(
        model=MODEL, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, messages=[{"role": "user", "content": "Hi!"}]))
    streamed = chunks[-1].usage
    after = scrape()

    def grew(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    p = "step3_edge_"
    assert grew(p + "http_requests_total", route="/v1/chat/completions", status="200") == 2
    assert grew(p + "completion_tokens_total") == (plain.usage.completion_tokens +
                                                    streamed.completion_tokens)
    assert grew(p + "prompt_tokens_total") == (plain.usage.prompt_tokens +
                                                streamed.prompt_tokens)
    assert grew(p + "time_to_first_token_seconds_count") == 2
    assert grew(p + "request_duration_seconds_count") == 2
    assert grew(p + "time_per_output_token_seconds_count") >= 1
    assert grew(p + "expert_accesses_total") > 0
    hit_rate = _value(after, p + "expert_hit_rate")
    assert 0.0 <= hit_rate <= 1.0 and not math.isnan(hit_rate)
    for name in ("experts_cpu_computed_total", "experts_resident", "kv_capacity_tokens",
                 "sequences_running", "uptime_seconds"):
        assert p + name in after, name
    assert {lab["kind"] for lab, _ in after[p + "bytes_moved_total"]} == {
        "expert_weights", "activations"}
    assert after[p + "info"][0][0]["model"] == MODEL
    assert _value(after, p + "requests_in_progress") == 0


def test_liveness_is_cheap_and_apart_from_health(openai_server: Served) -> None:
    import httpx

    r = httpx.get(openai_server.url + "/livez", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert "runtime" in httpx.get(openai_server.url + "/health", timeout=60).json()


# ------------------------------------------------------------------ --api-key
def test_api_key_guards_every_route_but_liveness(keyed_server: Served) -> None:
    import httpx
    import openai

    url = keyed_server.url
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong-key", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=MODEL, max_tokens=4, messages=HI)
    assert e.value.status_code == 401
    assert e.value.body["code"] == "invalid_api_key" and e.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    assert good.chat.completions.create(model=MODEL, max_tokens=4,
                                        messages=HI).usage.completion_tokens >= 1
    assert [m.id for m in good.models.list().data] == [MODEL]
    for path in ("/health", "/metrics", "/v1/models", "/v1/nothing"):
        r = httpx.get(url + path, timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        assert r.json()["error"]["code"] == "invalid_api_key"
    auth = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(url + "/metrics", headers=auth, timeout=60).status_code == 200
    assert httpx.get(url + "/health", headers=auth, timeout=60).status_code == 200
    assert httpx.get(url + "/livez", timeout=10).status_code == 200       # no key needed
    metrics = parse_prometheus(httpx.get(url + "/metrics", headers=auth, timeout=60).text)
    assert _value(metrics, "step3_edge_http_requests_total", status="401") >= 4


def test_runtime_flags_reach_the_runtime_and_its_errors_speak_http(keyed_server: Served) -> None:
    """`serve --kv-tokens 512 --resident 1.0 --miss cpu`: the runtime runs with them, and a
    request beyond that KV pool is a 400 in the request's and the server's words."""
    import httpx
    import openai

    auth = {"Authorization": f"Bearer {API_KEY}"}
    runtime = httpx.get(keyed_server.url + "/health", headers=auth, timeout=60).json()["runtime"]
    assert runtime["scheduler"]["kv_capacity_tokens"] == 512
    assert runtime["experts"]["miss"] == "cpu"
    good = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=API_KEY, max_retries=0,
                         timeout=120)
    with pytest.raises(openai.BadRequestError) as e:
        good.chat.completions.create(model=MODEL, max_tokens=1000, messages=HI)
    msg = e.value.body["message"]
    assert "max_tokens" in msg and "--kv-tokens" in msg, msg
    assert "max_new_tokens" not in msg and "kv_tokens" not in msg, msg
