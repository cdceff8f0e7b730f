"""`step3-edge serve`: an OpenAI-compatible HTTP server over the runtime.

    POST /v1/chat/completions   text and image_url (data URI) parts, stream (SSE), max_tokens,
                                temperature, top_p, stop, seed
    GET  /v1/models, /v1/models/{id}
    GET  /health

Requests run concurrently: each is served from a worker thread and the runtime batches the
sequences in flight. Every error is a JSON body in the OpenAI shape with a 4xx status for bad
requests (5xx only for faults of the server itself).
"""

import argparse
import json
import logging
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from step3_edge.app.engine import add_runtime_arguments
from step3_edge.app.openai_protocol import (ApiError, chunk_body, completion_body, error_body,
                                            model_body, models_body, new_completion_id,
                                            parse_chat_request, usage)
from step3_edge.errors import ImageError, PromptError, Step3EdgeError

log = logging.getLogger("step3_edge.app.server")
MAX_BODY_BYTES = 32 * 2**20
_END = object()


def _api_error_of(e: Step3EdgeError) -> ApiError:
    """A runtime error -> 400 when the request caused it, 500 when the server did."""
    message = e.problem + (f" ({e.remedy})" if e.remedy else "")
    if isinstance(e, ImageError):
        return ApiError(400, message, param="messages", code="invalid_image")
    if isinstance(e, PromptError):
        code = "context_length_exceeded" if "context" in e.problem.lower() else None
        return ApiError(400, message, param="messages", code=code)
    return ApiError(500, message, type_="server_error")


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _next(it: Any) -> Any:
    return next(it, _END)


def create_app(engine: Any, *, model_name: str | None = None, default_max_tokens: int = 256,
               max_body_bytes: int = MAX_BODY_BYTES) -> Any:
    """The FastAPI application serving `engine` (an `app.engine.ChatEngine`)."""
    from step3_edge.app.extras import require

    fastapi = require("fastapi", "fastapi", "the HTTP server (step3-edge serve)")
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    served = model_name or engine.name
    created = int(time.time())
    started = time.monotonic()
    app = fastapi.FastAPI(title="step3-edge", version="0.1.0",
                          description="OpenAI-compatible chat completions for Step3")

    def error_response(e: ApiError) -> Any:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Any, e: ApiError) -> Any:
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Any, e: HTTPException) -> Any:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Any, e: RequestValidationError) -> Any:
        return JSONResponse(error_body(str(e.errors())), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(_request: Any, e: Exception) -> Any:
        log.exception("request failed")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}",
                                       "server_error"), status_code=500)

    @app.get("/health", response_model=None)
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": served, "bundle": str(engine.bundle),
                "uptime_s": round(time.monotonic() - started, 1),
                "runtime": engine.runtime_stats()}

    @app.get("/v1/models", response_model=None)
    async def list_models() -> dict[str, Any]:
        return models_body(served, created)

    @app.get("/v1/models/{model_id:path}", response_model=None)
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != served:
            raise ApiError(404, f"the model {model_id!r} does not exist; this server serves "
                           f"{served!r}", param="model", code="model_not_found")
        return model_body(served, created)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Any:
        body = await _read_json(request, max_body_bytes)
        req = parse_chat_request(body, served, default_max_tokens=default_max_tokens,
                                 max_tokens_limit=engine.max_tokens_limit)
        cid, now = new_completion_id(), int(time.time())
        try:   # images are decoded and the prompt checked here: errors are still a 4xx
            answer = await run_in_threadpool(
                lambda: engine.answer(req.messages, max_tokens=req.max_tokens,
                                      temperature=req.temperature, top_p=req.top_p,
                                      stop=req.stop, seed=req.seed))
        except Step3EdgeError as e:
            raise _api_error_of(e) from e
        it = iter(answer)
        try:
            first = await run_in_threadpool(_next, it)
        except BaseException as e:
            answer.close()
            if isinstance(e, Step3EdgeError):
                raise _api_error_of(e) from e
            raise
        if not req.stream:
            try:
                rest = await run_in_threadpool(lambda: "".join(it))
            except Step3EdgeError as e:
                raise _api_error_of(e) from e
            finally:
                answer.close()
            text = ("" if first is _END else first) + rest
            s = answer.stats
            return completion_body(cid, served, text, s.finish_reason, s.prompt_tokens,
                                   s.completion_tokens, now)

        async def events() -> AsyncIterator[str]:
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
                yield _sse(_api_error_of(e).body())
            except Exception as e:  # noqa: BLE001 - headers are sent: report in the stream
                log.exception("stream failed")
                yield _sse(error_body(f"internal error: {type(e).__name__}: {e}",
                                      "server_error"))
            finally:
                answer.close()      # also on client disconnect: stops the generation
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


async def _read_json(request: Any, limit: int) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body is {length} bytes, above the limit of {limit}",
                       code="request_too_large")
    raw = await request.body()
    if len(raw) > limit:
        raise ApiError(413, f"the request body is above the limit of {limit} bytes",
                       code="request_too_large")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}",
                       code="invalid_json") from e


# ------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    add_runtime_arguments(p, port=8000)
    p.add_argument("--model-name", help="model id reported by /v1/models (default: the "
                   "bundle's model name)")
    p.add_argument("--default-max-tokens", type=int, default=256,
                   help="max_tokens when a request gives none")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    from step3_edge.app.engine import ChatEngine
    from step3_edge.app.extras import import_in_background, require
    from step3_edge.runtime.chat_cli import runtime_overrides

    feature = "the HTTP server (step3-edge serve)"
    imports = [import_in_background(m, m, feature) for m in ("fastapi", "uvicorn")]
    engine = ChatEngine.load(args.bundle, **runtime_overrides(args))
    for t in imports:
        t.join()
    uvicorn = require("uvicorn", "uvicorn", feature)
    app = create_app(engine, model_name=args.model_name,
                     default_max_tokens=args.default_max_tokens)
    print(f"step3-edge serve: {args.model_name or engine.name} from {engine.bundle} on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=5)
    return 0
