"""The OpenAI chat-completions wire format: request validation and response bodies.

Pure functions over plain dicts (no FastAPI here), so the rules are testable on their own.
A bad request raises `ApiError`, which carries the HTTP status and the OpenAI error body
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from step3_edge.errors import ImageError, PromptError, Step3EdgeError

ROLE_MAP = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4
SEED_RANGE = (-2**63, 2**64 - 1)        # what torch.Generator.manual_seed takes
SUPPORTED = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
             "stop", "stream", "stream_options", "seed")
# accepted and ignored: they ask nothing of the model
IGNORED = ("user", "safety_identifier", "prompt_cache_key")
# OpenAI fields accepted only with a value that asks for nothing beyond the default (null is
# always "not given"); any other value is a 400 naming the field
NO_OP: dict[str, tuple[Any, ...]] = {
    "n": (1,), "logprobs": (False,), "top_logprobs": (), "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0), "logit_bias": ({},), "response_format": ({"type": "text"},),
    "tools": ([],), "tool_choice": ("none",), "parallel_tool_calls": (True, False),
    "functions": ([],), "function_call": ("none",), "modalities": (["text"],),
    "audio": (), "prediction": (), "store": (False,), "metadata": ({},),
    "service_tier": ("auto", "default"), "reasoning_effort": (), "web_search_options": (),
    "verbosity": (),
}
WHY = {
    "n": "only n=1 (one choice) is supported",
    "logprobs": "log probabilities are not returned by step3-edge",
    "top_logprobs": "log probabilities are not returned by step3-edge",
    "frequency_penalty": "repetition penalties are not implemented",
    "presence_penalty": "repetition penalties are not implemented",
    "logit_bias": "logit biases are not implemented",
    "response_format": "structured output (JSON mode, JSON schema) is not implemented; only "
                       "{\"type\": \"text\"}",
    "tools": "tool calling is not implemented", "tool_choice": "tool calling is not implemented",
    "functions": "function calling is not implemented",
    "function_call": "function calling is not implemented",
    "modalities": "the model answers in text only",
    "audio": "the model answers in text only",
    "prediction": "predicted outputs are not implemented",
    "store": "completions are not stored", "metadata": "completions are not stored",
    "service_tier": "there are no service tiers",
    "reasoning_effort": "the reasoning effort is not adjustable",
    "web_search_options": "there is no web search",
    "verbosity": "the verbosity is not adjustable",
}
MESSAGE_KEYS = ("role", "content", "name")


def show(value: Any, depth: int = 0) -> str:
    """A client's value as JSON text for an error message: strings, lists and objects cut
    short, nesting capped (a 100,000-deep list is `[[[...]]]`), surrogates escaped."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, int):
        # str() of a 5,000-digit int is a ValueError; bit_length is cheap
        bits = value.bit_length()
        return str(value) if bits < 200 else f"an integer of {bits} bits"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, dict)):
        if depth >= 3:
            return "[...]" if isinstance(value, list) else "{...}"
        if isinstance(value, list):
            items = [show(v, depth + 1) for v in value[:6]]
        else:
            items = [f"{show(str(k))}: {show(v, depth + 1)}" for k, v in list(value.items())[:6]]
        more = ", ..." if len(value) > 6 else ""
        a, b = "[]" if isinstance(value, list) else "{}"
        return a + ", ".join(items) + more + b
    return f"<{type(value).__name__}>"


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
    max_tokens_key: str = "max_tokens"       # the field the client used (error messages)
    extra: dict[str, Any] = field(default_factory=dict)


def _bad(message: str, param: str | None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float,
            lo_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"'{key}' must be a number, got {show(value)}", key)
    bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
    if (isinstance(value, float) and not math.isfinite(value)) or value > hi or value < lo \
            or (lo_open and value == lo):
        raise _bad(f"'{key}' is {show(value)}, expected a value in {bound}", key)
    return float(value)


def _max_tokens(body: dict[str, Any], default: int, limit: int) -> int:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{key}' must be an integer, got {show(value)}", key)
    if not 1 <= value <= limit:
        raise _bad(f"'{key}' is {show(value)}, expected 1..{limit}", key)
    return value


def _text(value: str, where: str) -> str:
    """`value` unless it holds a lone surrogate (JSON lets "\\ud800" through; it is no text)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _bad(f"{where} holds a lone surrogate ({show(value[e.start:e.end])} at index "
                   f"{e.start}), which is not valid Unicode text", where, "invalid_text") from None
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if (not isinstance(items, list) or len(items) > MAX_STOP
            or not all(isinstance(s, str) and s for s in items)):
        raise _bad(f"'stop' must be a non-empty string or a list of up to {MAX_STOP} non-empty "
                   f"strings, got {show(value)}", "stop")
    return tuple(_text(s, "stop") for s in items)


def _image_part(part: dict[str, Any], where: str) -> dict[str, Any]:
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str) or not url:
        raise _bad(f"{where} is an image_url part without a url string", where)
    if not url.startswith("data:"):
        raise _bad(f"{where} has the url {show(url[:60])}; this server accepts only inline "
                   "data:image/...;base64 URIs and never fetches URLs", where, "invalid_image_url")
    return {"type": "image_url", "image_url": {"url": url}}


def _content(content: Any, role: str, where: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return _text(content, where)
    if not isinstance(content, list) or not content:
        raise _bad(f"{where} must be a string or a non-empty list of content parts", where)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        pwhere = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _bad(f"{pwhere} is a text part whose 'text' is not a string", pwhere)
            parts.append({"type": "text", "text": _text(part["text"], pwhere)})
        elif kind == "image_url":
            if role != "user":
                raise _bad(f"{pwhere}: images are only allowed in user messages", pwhere)
            parts.append(_image_part(part, pwhere))
        else:
            raise _bad(f"{pwhere} has type {show(kind)}; supported content parts are 'text' "
                       "and 'image_url'", pwhere)
    return parts


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise _bad("'messages' must be a non-empty list", "messages")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _bad(f"{where} must be an object with 'role' and 'content'", where)
        raw_role = msg.get("role")
        role = ROLE_MAP.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise _bad(f"{where} has role {show(raw_role)}; supported roles are "
                       f"{', '.join(ROLE_MAP)}", f"{where}.role")
        if role == "system" and out:
            raise _bad(f"{where} is a {raw_role} message after the first message; Step3 takes "
                       "one system message, first", f"{where}.role")
        for key, v in msg.items():
            if key not in MESSAGE_KEYS and v is not None:
                raise _bad(f"{where} has the field {show(key)}, which step3-edge does not "
                           "support (tool calls, audio and refusals are not implemented)",
                           f"{where}.{key}", "unsupported_parameter")
        if msg.get("content") is None:
            raise _bad(f"{where} has no 'content'", f"{where}.content")
        out.append({"role": role, "content": _content(msg["content"], role, f"{where}.content")})
    if out[-1]["role"] == "assistant":
        raise _bad("the last message is an assistant message; continuing a reply is not "
                   "supported", f"messages[{len(out) - 1}].role")
    return out


def _no_op(value: Any, allowed: tuple[Any, ...]) -> bool:
    # type-exact: n=True or logprobs=0 are not the defaults they compare equal to
    return any(type(value) is type(a) and value == a for a in allowed)


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """A 400 naming the first field that asks for something step3-edge does not do."""
    for key, value in body.items():
        if value is None or key in SUPPORTED or key in IGNORED:
            continue
        if key in NO_OP:
            if _no_op(value, NO_OP[key]):
                continue
            raise _bad(f"'{key}' is {show(value)}: {WHY[key]}", key, "unsupported_parameter")
        raise _bad(f"unrecognized request argument {show(key)}", key, "unknown_parameter")


def parse_chat_request(body: Any, served_model: str, *, default_max_tokens: int = 256,
                       max_tokens_limit: int = 4096) -> ChatRequest:
    """Validate a decoded JSON body of `POST /v1/chat/completions`; raise ApiError if bad."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    model = body.get("model", served_model)
    if not isinstance(model, str):
        raise _bad(f"'model' must be a string, got {show(model)}", "model")
    if model != served_model:
        raise ApiError(404, f"the model {show(model)} does not exist; this server serves "
                       f"{show(served_model)}", param="model", code="model_not_found")
    _refuse_unsupported(body)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad(f"'stream' must be true or false, got {show(stream)}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad(f"'seed' must be an integer, got {show(seed)}", "seed")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise _bad(f"'seed' is {show(seed)}, expected a 64-bit integer "
                   f"({SEED_RANGE[0]}..{SEED_RANGE[1]})", "seed")
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
        max_tokens_key=("max_completion_tokens" if body.get("max_completion_tokens") is not None
                        else "max_tokens"),
    )


# ------------------------------------------------------------------ runtime errors -> HTTP
def http_message(e: Step3EdgeError, max_tokens_key: str = "max_tokens") -> str:
    """A runtime error's text in the words of an HTTP client: the request's field names, no
    Python object reprs or exception class names, the server's options as its operator
    passes them."""
    from step3_edge.app.extras import plain_text

    text = plain_text(e.problem + (f" ({e.remedy})" if e.remedy else ""))
    text = text.replace("max_new_tokens", max_tokens_key)
    text = text.replace("re-encode the image with base64.b64encode",
                        "encode the image's bytes in standard base64")
    text = text.replace("load with a larger kv_tokens / a plan with more KV",
                        "ask the server's operator for a larger --kv-tokens")
    return text.replace("kv_tokens", "--kv-tokens")


def image_parts(messages: list[dict[str, Any]]) -> list[str]:
    """Where the request's image parts are, e.g. ["messages[0].content[1]"]."""
    return [f"messages[{i}].content[{j}]" for i, m in enumerate(messages)
            if isinstance(m["content"], list)
            for j, p in enumerate(m["content"]) if p.get("type") == "image_url"]


def api_error_of(e: Step3EdgeError, max_tokens_key: str = "max_tokens",
                  images: list[str] | None = None) -> ApiError:
    """A runtime error -> 400 when the request caused it, 500 when the server did."""
    message = http_message(e, max_tokens_key)
    if isinstance(e, ImageError):
        where = images[0] if images and len(images) == 1 else "messages"
        return ApiError(400, f"{where}: {message}" if where != "messages" else message,
                        param=where, code="invalid_image")
    if isinstance(e, PromptError):
        code = ("context_length_exceeded" if "context" in e.problem.lower()
                or "KV capacity" in e.problem else None)
        return ApiError(400, message, param="messages", code=code)
    import logging

    logging.getLogger("step3_edge.app.server").error("runtime error: %s", e)
    return ApiError(500, "the server failed to answer; see its log", type_="server_error")


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
