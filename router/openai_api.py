"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions, models, health, metrics;
tokenize, detokenize, version and a single model's card come from ``openai_extras``.

Streaming responses are server-sent events (``data: {json}`` lines, then ``data: [DONE]``). The handler
waits for the first output before answering, so a request that cannot be placed (queue full or timed
out) still gets a proper HTTP error status. A client that disconnects — while waiting or mid-stream —
cancels its request, which aborts it on every worker.

Where the time went (router/timings.py) comes back to the client as ``kvferry_timings`` (phase ->
seconds) in the response body, or in the last SSE chunk before ``[DONE]``; a non-streaming response also
has it in the ``x-kvferry-timings`` header (a stream's headers leave before the timings exist).

Before any handler: the API key (router/auth.py) and the body-size limit (router/body_limit.py). A
request's body is parsed and tokenized on a worker thread, off the event loop. A client's
``X-Request-Id`` header comes back on the response; the ids workers see are the router's own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import FastAPI, Request

import kvferry
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvferry.router.auth import OPEN_PATHS, APIKeyMiddleware
from kvferry.router.body_limit import DEFAULT_MAX_BODY_BYTES, BodySizeLimit
from kvferry.router.openai_extras import add_routes, model_card, parse_json
from kvferry.router.openai_models import (
    ChatCompletionChunk, ChatCompletionResponse, CompletionResponse, HealthResponse, ModelList,
)
from kvferry.router.openai_protocol import ChoiceResult, Formatter, parse_chat, parse_completion, usage_of
from kvferry.router.registry import WorkerRole
from kvferry.router.request import APIError, ChoiceDelta, GenerationRequest, check_client_request_id
from kvferry.router.service import RouterService
from kvferry.router.openapi_schema import error_responses, install_openapi, streamed
from kvferry.router.timings import format_timings

T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


def error_response(exc: APIError) -> JSONResponse:
    retry_after = exc.retry_after_header
    headers = {"Retry-After": retry_after} if retry_after is not None else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


async def _until_disconnect(request: Request) -> None:
    while True:  # ends with the connection: uvicorn answers http.disconnect once the client is gone
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def race_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` unless the client disconnects first (then cancel it)."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not work.done():
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise ClientDisconnected()
    return work.result()


def _parse(parse: Callable, raw: bytes, service: RouterService, client_request_id: str) -> GenerationRequest:
    gen = parse(parse_json(raw), service.model)
    return dataclasses.replace(gen, client_request_id=client_request_id) if client_request_id else gen


def create_app(service: RouterService, api_key: str = "", max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="kvferry router", version=kvferry.__version__, redoc_url=None,
                  description="OpenAI-compatible API of a kvferry cluster (docs/ROUTER.md)")
    install_openapi(app, api_key_required=bool(api_key), open_paths=OPEN_PATHS)
    app.add_middleware(BodySizeLimit, max_body_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)  # added last: runs first, before the body is read

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(str(exc.detail), code=code, status=exc.status_code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(APIError(str(exc)))

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    async def serve(request: Request, parse: Callable, chat: bool, api: str) -> Response:
        try:
            client_id = check_client_request_id(request.headers.get("x-request-id", ""), "X-Request-Id")
            # Tokenizing a long prompt takes milliseconds: on a thread, other requests' streams keep flowing.
            gen = await asyncio.to_thread(_parse, parse, await request.body(), service, client_id)
        except APIError:
            service.metrics.requests.labels(api, "invalid").inc()
            raise
        response = await _generate(request, gen, chat, api)
        if gen.client_request_id:
            response.headers["x-request-id"] = gen.client_request_id
        return response

    async def _generate(request: Request, gen: GenerationRequest, chat: bool, api: str) -> Response:
        formatter = Formatter(gen, service.model, chat)
        deltas = service.generate(gen)
        try:
            if gen.stream:
                first = await race_disconnect(request, anext(deltas))
                if first.finish_reason == "error":  # nothing sent yet: a real HTTP error still fits
                    raise APIError(f"generation failed: {first.error}", code="worker_error", status=502,
                                   type="server_error")
                return StreamingResponse(
                    stream_events(gen, formatter, first, deltas, chat, api),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            return await race_disconnect(request, complete(gen, formatter, deltas, api))
        except ClientDisconnected:
            await deltas.aclose()
            service.metrics.requests.labels(api, "disconnected").inc()
            return Response(status_code=499)
        except APIError as exc:
            await deltas.aclose()
            service.metrics.requests.labels(api, "error").inc()
            return error_response(exc)

    async def complete(
        gen: GenerationRequest, formatter: Formatter, deltas: AsyncIterator[ChoiceDelta], api: str
    ) -> Response:
        choices = [ChoiceResult(i) for i in range(gen.num_choices)]
        timings: dict[str, float] | None = None  # the last choice to finish: its phases add up
        try:
            async for delta in deltas:
                choices[delta.index].add(delta)
                timings = delta.timings or timings
        finally:
            await deltas.aclose()
        failed = [c for c in choices if c.finish_reason == "error"]
        if failed:
            service.metrics.requests.labels(api, "error").inc()
            raise APIError(f"generation failed: {failed[0].error}", code="worker_error", status=502,
                           type="server_error")
        service.metrics.requests.labels(api, "ok").inc()
        usage = usage_of(gen, sum(len(c.token_ids) for c in choices), [c.num_cached_tokens for c in choices])
        body = formatter.response(choices, usage)
        headers = {}
        if timings is not None:
            body["kvferry_timings"] = timings
            headers["x-kvferry-timings"] = format_timings(timings)
        return JSONResponse(body, headers=headers)

    async def stream_events(
        gen: GenerationRequest, formatter: Formatter, first: ChoiceDelta, deltas: AsyncIterator[ChoiceDelta],
        chat: bool, api: str,
    ) -> AsyncIterator[bytes]:
        completion_tokens = 0
        cached_tokens = [0] * gen.num_choices  # each choice's, from its last delta
        outcome = "disconnected"
        remaining = gen.num_choices
        try:
            if chat:
                for i in range(gen.num_choices):
                    yield sse(formatter.role_chunk(i))
            delta: ChoiceDelta | None = first
            timings: dict[str, float] | None = None
            while delta is not None:
                completion_tokens += len(delta.token_ids)
                if delta.finish_reason is not None:
                    remaining -= 1
                    cached_tokens[delta.index] = delta.num_cached_tokens
                timings = delta.timings or timings
                if delta.finish_reason == "error":
                    yield sse({"error": APIError(f"generation failed: {delta.error}", code="worker_error",
                                                 status=502, type="server_error").body()["error"]})
                if delta.text or delta.finish_reason is not None or delta.logprobs:
                    chunk = formatter.delta_chunk(delta)
                    if remaining == 0 and not gen.include_usage and timings is not None:
                        chunk["kvferry_timings"] = timings  # the last chunk before [DONE]
                    yield sse(chunk)
                delta = await anext(deltas, None)
            if gen.include_usage:
                chunk = formatter.usage_chunk(usage_of(gen, completion_tokens, cached_tokens))
                if timings is not None:
                    chunk["kvferry_timings"] = timings
                yield sse(chunk)
            yield sse("[DONE]")
            outcome = "ok"
        except APIError as exc:
            outcome = "error"
            yield sse(exc.body())
            yield sse("[DONE]")
        finally:
            await deltas.aclose()
            service.metrics.requests.labels(api, outcome).inc()

    generation_errors = error_responses(400, 404, 413, 429, 502, 503, 504)

    @app.post("/v1/completions", summary="Completions (OpenAI)",
              responses={**streamed(CompletionResponse, CompletionResponse), **generation_errors})
    async def completions(request: Request) -> Response:
        return await serve(request, parse_completion, chat=False, api="completions")

    @app.post("/v1/chat/completions", summary="Chat completions (OpenAI)",
              responses={**streamed(ChatCompletionResponse, ChatCompletionChunk), **generation_errors})
    async def chat_completions(request: Request) -> Response:
        return await serve(request, parse_chat, chat=True, api="chat")

    @app.get("/v1/models", summary="The served model (OpenAI)", responses={200: {"model": ModelList}})
    async def models() -> dict:
        return {"object": "list", "data": [model_card(service.model)]}

    add_routes(app, lambda: service.model)

    @app.get("/health", summary="Whether the router can serve (no API key needed)",
             responses={200: {"model": HealthResponse}, 503: {"model": HealthResponse, "description": "no workers"}})
    async def health() -> JSONResponse:
        reg = service.registry
        decode = reg.live(WorkerRole.DECODE)
        colocated = reg.live(WorkerRole.COLOCATED)
        prefill = reg.live(WorkerRole.PREFILL)
        ready = bool(colocated) or bool(decode and prefill)
        body = {
            "status": "ok" if ready else "no_workers",
            "workers": {"prefill": len(prefill), "decode": len(decode), "colocated": len(colocated)},
            "queued": service.admission.num_waiting,
            "running": service.num_running,
            # Workers whose heartbeats stopped and that have not registered again under their name.
            "lost_workers": [
                {"name": w.name, "role": w.role.name.lower(), "address": w.address,
                 "seconds_ago": round(reg.clock() - w.lost_at, 1), "times_lost": w.times_lost}
                for w in reg.lost.values()
            ],
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics (no API key needed)", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        return Response(service.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
