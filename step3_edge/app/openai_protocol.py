"""The OpenAI chat-completions wire format: request validation and response bodies.

Pure functions over plain dicts (no FastAPI here), so the rules are testable on their own.
A bad request raises `ApiError`, which carries the HTTP status and the OpenAI error body
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

ROLE_MAP = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "audio", "prediction")


class ApiError(Exception):
    """A request the server refuses; `status` is the HTTP status, `body()` the JSON body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat-completions request, messages already in step3-edge chat format."""

    messages: list[dict[str, Any]]
    model: str
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _bad(message: str, param: str | None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float,
            lo_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(f"'{key}' must be a number, got {value!r}", key)
    if value > hi or value < lo or (lo_open and value == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise _bad(f"'{key}' is {value}, expected a value in {bound}", key)
    return float(value)


def _max_tokens(body: dict[str, Any], default: int, limit: int) -> int:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{key}' must be an integer, got {value!r}", key)
    if not 1 <= value <= limit:
        raise _bad(f"'{key}' is {value}, expected 1..{limit}", key)
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if (not isinstance(items, list) or len(items) > MAX_STOP
            or not all(isinstance(s, str) and s for s in items)):
        raise _bad(f"'stop' must be a non-empty string or a list of up to {MAX_STOP} non-empty "
                   f"strings, got {value!r}", "stop")
    return tuple(items)


def _image_part(part: dict[str, Any], where: str) -> dict[str, Any]:
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str) or not url:
        raise _bad(f"{where} is an image_url part without a url string", where)
    if not url.startswith("data:"):
        raise _bad(f"{where} has the url {url[:60]!r}; this server accepts only inline "
                   "data:image/...;base64 URIs and never fetches URLs", where, "invalid_image_url")
    return {"type": "image_url", "image_url": {"url": url}}


def _content(content: Any, role: str, where: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise _bad(f"{where} must be a string or a non-empty list of content parts", where)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        pwhere = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _bad(f"{pwhere} is a text part whose 'text' is not a string", pwhere)
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            if role != "user":
                raise _bad(f"{pwhere}: images are only allowed in user messages", pwhere)
            parts.append(_image_part(part, pwhere))
        else:
            raise _bad(f"{pwhere} has type {kind!r}; supported content parts are 'text' and "
                       "'image_url'", pwhere)
    return parts


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise _bad("'messages' must be a non-empty list", "messages")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _bad(f"{where} must be an object with 'role' and 'content'", where)
        role = ROLE_MAP.get(msg.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise _bad(f"{where} has role {msg.get('role')!r}; supported roles are "
                       f"{', '.join(ROLE_MAP)}", f"{where}.role")
        if role == "system" and out:
            raise _bad(f"{where} is a {msg['role']} message after the first message; Step3 takes "
                       "one system message, first", f"{where}.role")
        if msg.get("content") is None:
            raise _bad(f"{where} has no 'content'", f"{where}.content")
        out.append({"role": role, "content": _content(msg["content"], role, f"{where}.content")})
    if out[-1]["role"] == "assistant":
        raise _bad("the last message is an assistant message; continuing a reply is not "
                   "supported", f"messages[{len(out) - 1}].role")
    return out


def parse_chat_request(body: Any, served_model: str, *, default_max_tokens: int = 256,
                       max_tokens_limit: int = 4096) -> ChatRequest:
    """Validate a decoded JSON body of `POST /v1/chat/completions`; raise ApiError if bad."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    model = body.get("model", served_model)
    if not isinstance(model, str):
        raise _bad(f"'model' must be a string, got {model!r}", "model")
    if model != served_model:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                       f"{served_model!r}", param="model", code="model_not_found")
    for key in UNSUPPORTED:
        if body.get(key):
            raise _bad(f"'{key}' is not supported by step3-edge", key, "unsupported_parameter")
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise _bad(f"'n' is {n!r}; only n=1 is supported", "n", "unsupported_parameter")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad(f"'stream' must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad(f"'seed' must be an integer, got {seed!r}", "seed")
    return ChatRequest(
        messages=_messages(body.get("messages")),
        model=model,
        max_tokens=_max_tokens(body, default_max_tokens, max_tokens_limit),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        stop=_stop(body),
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        seed=seed,
    )


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int, created: int | None = None) -> dict[str, Any]:
    """A non-streamed `chat.completion` object."""
    return {
        "id": cid, "object": "chat.completion", "created": created or int(time.time()),
        "model": model, "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(cid: str, model: str, created: int, delta: dict[str, Any],
               finish_reason: str | None = None, usage_: dict[str, int] | None = None,
               with_choice: bool = True) -> dict[str, Any]:
    """One `chat.completion.chunk` of a streamed answer."""
    choices = ([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
               if with_choice else [])
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created,
                            "model": model, "system_fingerprint": None, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def models_body(model: str, created: int) -> dict[str, Any]:
    """`GET /v1/models`."""
    return {"object": "list", "data": [model_body(model, created)]}


def model_body(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "step3-edge"}
