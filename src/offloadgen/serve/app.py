"""The OpenAI-compatible HTTP API over a Worker: /v1/completions, /v1/chat/completions (whole or
streamed as server-sent events), /v1/models, /health and /metrics. Every failure answers an
OpenAI-style JSON error; nothing a client sends can take the server down."""
from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import OffloadgenError
from ..openai_protocol import (ApiError, ParsedRequest, TextAssembler, chunk_body, new_id, parse_request,
                               response_body, usage_chunk)
from .metrics import ServeMetrics
from .worker import Draining, Handle, QueueFull, Worker


@dataclass
class ServeContext:
    worker: Worker
    tokenizer: object
    metrics: ServeMetrics
    model_name: str
    max_len: int  # the longest prompt + max_tokens a request may ask for (a slot's length)
    api_key: str | None = None
    shutdown_grace_s: float = 30.0
    created: int = 0


class GenerationAborted(Exception):
    """The worker ended a request without an answer (shutdown, a failed pass)."""


def create_app(ctx: ServeContext) -> FastAPI:
    ctx.created = ctx.created or int(time.time())
    ctx.metrics.worker = ctx.worker

    @asynccontextmanager
    async def lifespan(app):
        ctx.worker.start()
        try:
            yield
        finally:
            # blocking join off the loop: a pass in progress may take a while to end
            await asyncio.to_thread(ctx.worker.stop)

    app = FastAPI(title="offloadgen", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx
    _add_error_handlers(app, ctx)
    auth = [Depends(_require_key)]

    @app.get("/health")
    async def health():
        if ctx.worker.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", dependencies=auth)
    async def metrics():
        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [{"id": ctx.model_name, "object": "model", "created": ctx.created,
                                            "owned_by": "offloadgen", "max_model_len": ctx.max_len}]}

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request):
        return await _create(ctx, "completion", request)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request):
        return await _create(ctx, "chat", request)

    return app


async def _require_key(request: Request) -> None:
    key = request.app.state.ctx.api_key
    if not key:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
        raise ApiError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                       code="invalid_api_key")


def _add_error_handlers(app: FastAPI, ctx: ServeContext) -> None:
    def reply(e: ApiError) -> JSONResponse:
        if e.status >= 400 and e.status != 401:
            ctx.metrics.rejected.labels(str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return reply(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        what = {404: f"no route {request.method} {request.url.path}", 405: f"{request.method} is not allowed on "
                f"{request.url.path}"}.get(e.status_code, str(e.detail))
        return reply(ApiError(e.status_code, what, code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        return reply(ApiError(400, f"invalid request: {e.errors()}"))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        # the traceback goes to the server's log, never to the client
        return reply(ApiError(500, f"internal error: {type(e).__name__}", type="server_error"))


MAX_BODY_BYTES = 32 << 20  # far above any prompt a context holds; a larger body is refused unread


async def _json_body(request: Request):
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({getattr(e, 'msg', type(e).__name__)})") from None


def _submit(ctx: ServeContext, parsed: ParsedRequest) -> Handle:
    try:
        return ctx.worker.submit(parsed.prompt_ids, parsed.sampling)
    except QueueFull:
        _, pass_s = ctx.metrics.recent()
        # a slot frees when a request ends: a few passes is a fair guess at the wait
        retry = max(1, math.ceil(3 * (pass_s or 1.0)))
        raise ApiError(429, f"the server is at capacity ({ctx.worker.slots} slots busy and "
                            f"{ctx.worker.max_queue} requests waiting); retry later", type="requests",
                       code="rate_limit_exceeded", headers={"Retry-After": str(retry)}) from None
    except Draining:
        raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down") from None
    except OffloadgenError as e:  # the batcher refuses what parse_request let through: still the request's fault
        raise ApiError(400, str(e)) from None


async def _create(ctx: ServeContext, kind: str, request: Request):
    body = await _json_body(request)
    parsed = parse_request(kind, body, ctx.tokenizer, ctx.max_len, model_names=[ctx.model_name])
    handle = _submit(ctx, parsed)
    rid, created = new_id(kind), int(time.time())
    if parsed.stream:
        async def client_gone(message):  # also covers a hang-up before the stream's first event
            ctx.worker.cancel(handle)

        return EventSourceResponse(_stream(ctx, handle, parsed, rid, created), ping=15,
                                   shutdown_grace_period=ctx.shutdown_grace_s + 1,
                                   client_close_handler_callable=client_gone)
    try:
        text, reason, n_tokens = await _until_done_or_gone(ctx, handle, parsed, request)
    finally:
        ctx.worker.cancel(handle)  # a no-op once answered; frees the slot if the client left
    ctx.metrics.requests.labels(kind, reason).inc()
    return response_body(kind, rid, ctx.model_name, text, reason, len(parsed.prompt_ids), n_tokens, created)


async def _pieces(ctx: ServeContext, handle: Handle, asm: TextAssembler):
    """(text delta, finish reason or None) as tokens arrive; the last piece has the reason."""
    first = True
    while True:
        event = await handle.queue.get()
        if first:
            ctx.metrics.ttft.observe(time.perf_counter() - handle.submitted)
            first = False
        if event.error:
            raise GenerationAborted(event.error)
        delta = asm.add(event.new_ids)
        if asm.stopped or event.finished:
            if not event.finished:
                ctx.worker.cancel(handle)  # a stop string ends the answer whatever the batcher saw
            yield delta + asm.finish(), "stop" if asm.stopped else event.finish_reason
            return
        if delta or event.new_ids:
            # A chunk for every pass that made a token, even one whose text is held back (an
            # unfinished character, a possible stop string) or empty: clients time tokens by
            # chunks, as they do with vLLM, which sends these too.
            yield delta, None


async def _until_done_or_gone(ctx: ServeContext, handle: Handle, parsed: ParsedRequest, request: Request):
    """The whole answer; or, if the client hangs up first, nothing (its slot is freed by the caller)."""
    asm = TextAssembler(ctx.tokenizer, parsed.sampling.stop)

    async def collect():
        parts, reason = [], None
        async for delta, reason in _pieces(ctx, handle, asm):
            parts.append(delta)
        return "".join(parts), reason

    task = asyncio.ensure_future(collect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                break
            if await request.is_disconnected():
                raise ApiError(499, "the client closed the connection")
    finally:
        if not task.done():
            task.cancel()
    try:
        text, reason = task.result()
    except GenerationAborted as e:
        raise ApiError(503, str(e), type="server_error", code="aborted") from None
    return text, reason, len(asm.token_ids)


async def _stream(ctx: ServeContext, handle: Handle, parsed: ParsedRequest, rid: str, created: int):
    """Server-sent events: chunks, a usage chunk if asked for, then [DONE]. The finally block runs
    when the client disconnects too (the response cancels this generator), freeing the slot."""
    kind, model, usage_field = parsed.kind, ctx.model_name, parsed.include_usage
    asm = TextAssembler(ctx.tokenizer, parsed.sampling.stop)
    reason = None
    try:
        if kind == "chat":  # OpenAI's first chat chunk names the role
            yield _sse(chunk_body(kind, rid, model, created, first=True, with_usage_field=usage_field))
        async for delta, reason in _pieces(ctx, handle, asm):
            yield _sse(chunk_body(kind, rid, model, created, delta, reason, with_usage_field=usage_field))
        if usage_field:
            yield _sse(usage_chunk(kind, rid, model, created, len(parsed.prompt_ids), len(asm.token_ids)))
        ctx.metrics.requests.labels(kind, reason).inc()
        yield {"data": "[DONE]"}
    except GenerationAborted as e:
        yield _sse(ApiError(503, str(e), type="server_error", code="aborted").body())
    finally:
        ctx.worker.cancel(handle)


def _sse(body: dict) -> dict:
    return {"data": json.dumps(body, ensure_ascii=False)}
