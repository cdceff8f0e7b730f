"""`step3-edge serve`: an OpenAI-compatible HTTP server over the runtime.

    POST /v1/chat/completions   text and image_url (data URI) parts, stream (SSE), max_tokens,
                                temperature, top_p, stop, seed
    GET  /v1/models, /v1/models/{id}
    GET  /health                the model, the bundle and the runtime's statistics
    GET  /metrics               Prometheus text format (app/metrics.py)
    GET  /livez                 liveness: 200 while the process serves, no auth, no work

Requests run concurrently: each is served from a worker thread and the runtime batches the
sequences in flight. Every error is a JSON body in the OpenAI shape with a 4xx status for bad
requests (5xx only for faults of the server itself); OpenAI fields step3-edge does not
implement are refused with a 400 naming them, never ignored. With an API key, every route but
/livez needs `Authorization: Bearer KEY`.
"""

import argparse
import asyncio
import hmac
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from step3_edge.app.engine import add_server_arguments
from step3_edge.app.openai_protocol import (ApiError, api_error_of, chunk_body, completion_body,
                                            error_body, image_parts, model_body, models_body,
                                            new_completion_id, parse_chat_request, usage)
from step3_edge.cli import positive_float, positive_int
from step3_edge.errors import Step3EdgeError

log = logging.getLogger("step3_edge.app.server")
MAX_BODY_BYTES = 32 * 2**20
BODY_TIMEOUT_S = 30.0
API_KEY_ENV = "STEP3_EDGE_API_KEY"
OPEN_PATHS = ("/livez",)
ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/metrics", "/livez")
_END = object()
def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _next(it: Any) -> Any:
    return next(it, _END)


def _route(path: str) -> str:
    """The route label of a path in the metrics (unknown paths share one label)."""
    if path in ROUTES:
        return path
    return "/v1/models/{id}" if path.startswith("/v1/models/") else "other"


def _error_bytes(message: str, code: str | None = None,
                 type_: str = "invalid_request_error") -> bytes:
    return json.dumps(error_body(message, type_, None, code)).encode()


class _Guard:
    """ASGI middleware: the API key check (every route but liveness) and the request counts."""

    def __init__(self, app: Any, api_key: str | None, metrics: Any) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    def _authorized(self, scope: dict[str, Any]) -> bool:
        if not self.api_key or scope["path"] in OPEN_PATHS:
            return True
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(
                    token.strip().encode("latin-1"), self.api_key.encode())
        return False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route, method = _route(scope["path"]), scope["method"]
        status = [500]
        if not self._authorized(scope):
            status[0] = 401
            body = _error_bytes("a valid API key is required: send the header "
                                "'Authorization: Bearer KEY' with this server's key",
                                "invalid_api_key")
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            self.metrics.count_request(route, method, 401)
            return

        async def counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        chat = route == "/v1/chat/completions" and method == "POST"
        if chat:
            self.metrics.in_flight(+1)
        try:      # returns once the response is sent, or the client has gone
            await self.app(scope, receive, counted)
        finally:
            self.metrics.count_request(route, method, status[0])
            if chat:
                self.metrics.in_flight(-1)


def create_app(engine: Any, *, model_name: str | None = None, default_max_tokens: int = 256,
               max_body_bytes: int = MAX_BODY_BYTES, api_key: str | None = None,
               body_timeout_s: float = BODY_TIMEOUT_S) -> Any:
    """The FastAPI application serving `engine` (an `app.engine.ChatEngine`); with `api_key`,
    every route but /livez needs `Authorization: Bearer <api_key>`."""
    from step3_edge.app.extras import require

    fastapi = require("fastapi", "fastapi", "the HTTP server (step3-edge serve)")
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response, StreamingResponse
    from starlette.background import BackgroundTask
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    from step3_edge.app.metrics import CONTENT_TYPE, ServerMetrics
    from step3_edge.cli import version

    served = model_name or engine.name
    created = int(time.time())
    metrics = ServerMetrics()
    app = fastapi.FastAPI(title="step3-edge", version=version(),
                          description="OpenAI-compatible chat completions for Step3")
    app.add_middleware(_Guard, api_key=api_key or None, metrics=metrics)

    def error_response(status: int, body: dict[str, Any], headers: Any = None) -> Any:
        # ASCII JSON: an echoed lone surrogate stays an escape, never an encoding error
        return Response(json.dumps(body, ensure_ascii=True), status_code=status,
                        media_type="application/json", headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Any, e: ApiError) -> Any:
        return error_response(e.status, e.body())

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Any, e: HTTPException) -> Any:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, error_body(str(e.detail), kind),
                              getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Any, e: RequestValidationError) -> Any:
        where = ", ".join(".".join(str(x) for x in err.get("loc", ())) + ": " +
                          str(err.get("msg", "")) for err in e.errors())
        return error_response(400, error_body(f"invalid request: {where}"))

    @app.exception_handler(Exception)
    async def _internal_error(_request: Any, e: Exception) -> Any:
        log.exception("request failed")
        return error_response(500, error_body("internal server error; see the server log",
                                              "server_error"))

    @app.get("/livez", response_model=None)
    async def livez() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/health", response_model=None)
    async def health() -> dict[str, Any]:
        stats = await run_in_threadpool(engine.runtime_stats)
        return {"status": "ok", "model": served, "bundle": str(engine.bundle),
                "uptime_s": round(time.monotonic() - metrics.started, 1), "runtime": stats}

    @app.get("/metrics", response_model=None)
    async def prometheus() -> Any:
        stats = await run_in_threadpool(engine.runtime_stats)
        backend = stats.get("backend") or {}
        info = {"model": served, "version": version(),
                **{k: str(backend.get(k)) for k in ("backend", "device", "dtype")
                   if backend.get(k) is not None}}
        return Response(metrics.render(stats, info), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=None)
    async def list_models() -> dict[str, Any]:
        return models_body(served, created)

    @app.get("/v1/models/{model_id:path}", response_model=None)
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != served:
            raise ApiError(404, f"the model {json.dumps(model_id)} does not exist; this "
                           f"server serves {json.dumps(served)}", param="model",
                           code="model_not_found")
        return model_body(served, created)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Any:
        body = await read_json(request, max_body_bytes, body_timeout_s)
        req = parse_chat_request(body, served, default_max_tokens=default_max_tokens,
                                 max_tokens_limit=engine.max_tokens_limit)
        key = req.max_tokens_key
        cid, now = new_completion_id(), int(time.time())
        answer = None
        try:   # images are decoded and the prompt checked here: errors are still a 4xx
            answer = await run_in_threadpool(
                lambda: engine.answer(req.messages, max_tokens=req.max_tokens,
                                      temperature=req.temperature, top_p=req.top_p,
                                      stop=req.stop, seed=req.seed))
            it = iter(answer)
            first = await run_in_threadpool(_next, it)
        except BaseException as e:
            if answer is not None:
                answer.close()
            if isinstance(e, Step3EdgeError):
                raise api_error_of(e, key, image_parts(req.messages)) from e
            raise
        if not req.stream:
            try:
                rest = await run_in_threadpool(lambda: "".join(it))
            except Step3EdgeError as e:
                raise api_error_of(e, key) from e
            finally:
                answer.close()
                metrics.finished_completion(answer.stats)
            text = ("" if first is _END else first) + rest
            s = answer.stats
            return completion_body(cid, served, text, s.finish_reason, s.prompt_tokens,
                                   s.completion_tokens, now)

        started = []

        async def events() -> AsyncIterator[str]:
            started.append(True)
            try:
                yield _sse(chunk_body(cid, served, now, {"role": "assistant", "content": ""}))
                piece = first
                while piece is not _END:
                    if piece:
                        yield _sse(chunk_body(cid, served, now, {"content": piece}))
                    piece = await run_in_threadpool(_next, it)
                s = answer.stats
                yield _sse(chunk_body(cid, served, now, {}, s.finish_reason))
                if req.include_usage:
                    yield _sse(chunk_body(cid, served, now, {}, None,
                                          usage(s.prompt_tokens, s.completion_tokens),
                                          with_choice=False))
            except Step3EdgeError as e:
                yield _sse(api_error_of(e, key).body())
            except Exception:  # noqa: BLE001 - headers are sent: report in the stream
                log.exception("stream failed")
                yield _sse(error_body("internal server error; see the server log",
                                      "server_error"))
            finally:
                answer.close()      # also on client disconnect: stops the generation
                metrics.finished_completion(answer.stats)
            yield "data: [DONE]\n\n"

        def never_streamed() -> None:
            # runs after the response, also when the client left before the stream began
            if not started:
                answer.close()
                metrics.finished_completion(answer.stats)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(never_streamed))

    return app


async def read_json(request: Any, limit: int, timeout_s: float = BODY_TIMEOUT_S) -> Any:
    """The request's JSON body: 413 above `limit` bytes, 400 when it does not arrive in full
    within `timeout_s` (shorter than its Content-Length, or a client that went away), is not
    JSON or nests too deeply."""
    from starlette.requests import ClientDisconnect

    length = request.headers.get("content-length")
    if length is not None and not length.isdigit():
        raise ApiError(400, f"the Content-Length header {json.dumps(length[:40])} is not a "
                       "number", code="invalid_request")
    if length is not None and int(length) > limit:
        raise ApiError(413, f"the request body is {length} bytes, above the limit of {limit}",
                       code="request_too_large")

    async def collect() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is above the limit of {limit} bytes",
                               code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        raw = await asyncio.wait_for(collect(), timeout_s)
    except TimeoutError:
        raise ApiError(400, f"the request body did not arrive in full within {timeout_s:g} s "
                       f"(Content-Length {length or 'not given'}); send the whole body",
                       code="incomplete_body") from None
    except ClientDisconnect:
        raise ApiError(400, "the client closed the connection before the whole request body "
                       "arrived", code="incomplete_body") from None
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiError(400, "the request body nests arrays or objects too deeply",
                       code="invalid_json") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}",
                       code="invalid_json") from None
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not UTF-8 text (byte {e.start})",
                       code="invalid_json") from None
    except ValueError:              # Python refuses integers of more than 4,300 digits
        raise ApiError(400, "the request body holds a number of more than 4,300 digits",
                       code="invalid_json") from None


# ------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    add_server_arguments(p, port=8000)
    g = p.add_argument_group("server options")
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /livez "
                   f"(default: ${API_KEY_ENV} when set, else no key; the variable keeps the "
                   "key out of the process list)")
    g.add_argument("--model-name", metavar="NAME",
                   help="model id reported by /v1/models and expected in requests (default: "
                   "the --model folder's name; step3-edge-default for the embedded model)")
    g.add_argument("--default-max-tokens", type=positive_int, default=256, metavar="N",
                   help="max_tokens of a request that gives none")
    g.add_argument("--max-body-mb", type=positive_float, default=MAX_BODY_BYTES / 2**20,
                   metavar="MB", help="largest request body (images are inline data URIs)")
    g.add_argument("--body-timeout", type=positive_float, default=BODY_TIMEOUT_S,
                   metavar="SECONDS", help="time allowed for a request body to arrive in full; "
                   "a slower or truncated one is a 400")
    g.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")


def run(args: argparse.Namespace) -> int:
    from step3_edge.app.engine import ChatEngine
    from step3_edge.app.extras import import_in_background, require
    from step3_edge.cli import runtime_overrides

    feature = "the HTTP server (step3-edge serve)"
    imports = [import_in_background(m, m, feature) for m in ("fastapi", "uvicorn")]
    engine = ChatEngine.load(args.model, **runtime_overrides(args))
    for t in imports:
        t.join()
    uvicorn = require("uvicorn", "uvicorn", feature)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    app = create_app(engine, model_name=args.model_name,
                     default_max_tokens=args.default_max_tokens,
                     max_body_bytes=int(args.max_body_mb * 2**20), api_key=api_key,
                     body_timeout_s=args.body_timeout)
    print(f"step3-edge serve: {args.model_name or engine.name} from {engine.bundle} on "
          f"http://{args.host}:{args.port}/v1" + (" (API key required)" if api_key else ""),
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=5)
    return 0
