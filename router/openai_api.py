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

The handlers are plain functions of the request; what they serve is ``request.app.state.service``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError

import kvferry
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvferry.router.auth import OPEN_PATHS, APIKeyMiddleware
from kvferry.router.body_limit import DEFAULT_MAX_BODY_BYTES, BodySizeLimit
from kvferry.router.openai_extras import add_routes, model_card, parse_json
from kvferry.router.openai_models import (
    ChatCompletionChunk, ChatCompletionResponse, CompletionResponse, HealthResponse, ModelList,
)
from kvferry.router.openai_protocol import (
    ChoiceResult, Formatter, ParsedRequest, parse_chat, parse_completion, usage_of,
)
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


def _parse(parse: Callable[..., ParsedRequest], raw: bytes, service: RouterService,
           client_request_id: str) -> ParsedRequest:
    parsed = parse(parse_json(raw), service.model)
    if not client_request_id:
        return parsed
    return dataclasses.replace(parsed, generation=dataclasses.replace(parsed.generation,
                                                                      client_request_id=client_request_id))


# --- errors ---------------------------------------------------------------------------------------


async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(APIError(str(exc.detail), code=code, status=exc.status_code))


async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(APIError(str(exc)))


async def api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


def worker_failed(error: str | None) -> APIError:
    return APIError(f"generation failed: {error}", code="worker_error", status=502, type="server_error")


# --- generation -----------------------------------------------------------------------------------


@dataclass
class Exchange:
    """One generation request being answered: what it asked, how to format it, where to count it."""

    service: RouterService
    gen: GenerationRequest
    formatter: Formatter
    chat: bool
    api: str  # the metrics label: "completions" or "chat"

    def count(self, outcome: str) -> None:
        self.service.metrics.requests.labels(self.api, outcome).inc()


async def completions(request: Request) -> Response:
    return await serve(request, parse_completion, chat=False, api="completions")


async def chat_completions(request: Request) -> Response:
    return await serve(request, parse_chat, chat=True, api="chat")


async def serve(request: Request, parse: Callable[..., ParsedRequest], chat: bool, api: str) -> Response:
    service: RouterService = request.app.state.service
    try:
        client_id = check_client_request_id(request.headers.get("x-request-id", ""), "X-Request-Id")
        # Tokenizing a long prompt takes milliseconds: on a thread, other requests' streams keep flowing.
        parsed = await asyncio.to_thread(_parse, parse, await request.body(), service, client_id)
    except APIError:
        service.metrics.requests.labels(api, "invalid").inc()
        raise
    gen = parsed.generation
    exchange = Exchange(service, gen, Formatter(gen, service.model, chat, parsed.tool_calling), chat, api)
    response = await respond(request, exchange)
    if gen.client_request_id:
        response.headers["x-request-id"] = gen.client_request_id
    return response


async def respond(request: Request, exchange: Exchange) -> Response:
    deltas = exchange.service.generate(exchange.gen)
    try:
        if exchange.gen.stream:
            first = await race_disconnect(request, anext(deltas))
            if first.finish_reason == "error":  # nothing sent yet: a real HTTP error still fits
                raise worker_failed(first.error)
            return StreamingResponse(
                stream_events(exchange, first, deltas),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await race_disconnect(request, complete(exchange, deltas))
    except ClientDisconnected:
        await deltas.aclose()
        exchange.count("disconnected")
        return Response(status_code=499)
    except APIError as exc:
        await deltas.aclose()
        exchange.count("error")
        return error_response(exc)


async def complete(exchange: Exchange, deltas: AsyncIterator[ChoiceDelta]) -> Response:
    gen = exchange.gen
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
        exchange.count("error")
        raise worker_failed(failed[0].error)
    exchange.count("ok")
    usage = usage_of(gen, sum(len(c.token_ids) for c in choices), [c.num_cached_tokens for c in choices])
    body = exchange.formatter.response(choices, usage)
    headers = {}
    if timings is not None:
        body["kvferry_timings"] = timings
        headers["x-kvferry-timings"] = format_timings(timings)
    return JSONResponse(body, headers=headers)


async def stream_events(
    exchange: Exchange, first: ChoiceDelta, deltas: AsyncIterator[ChoiceDelta]
) -> AsyncIterator[bytes]:
    gen, formatter = exchange.gen, exchange.formatter
    completion_tokens = 0
    cached_tokens = [0] * gen.num_choices  # each choice's, from its last delta
    outcome = "disconnected"
    remaining = gen.num_choices
    try:
        if exchange.chat:
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
                yield sse({"error": worker_failed(delta.error).body()["error"]})
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
        exchange.count(outcome)


# --- models, health, metrics ----------------------------------------------------------------------


async def models(request: Request) -> dict:
    return {"object": "list", "data": [model_card(request.app.state.service.model)]}


async def health(request: Request) -> JSONResponse:
    service: RouterService = request.app.state.service
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
        # Prefill -> decode pairs whose KV transfers failed in a row, out of placement for a cool-down.
        "excluded_pairs": [dataclasses.asdict(p) for p in reg.pairs.excluded_pairs()],
    }
    return JSONResponse(body, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    exposition = request.app.state.service.metrics.exposition()
    return Response(exposition, media_type="text/plain; version=0.0.4; charset=utf-8")


# --- the app --------------------------------------------------------------------------------------


def create_app(service: RouterService, api_key: str = "", max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="kvferry router", version=kvferry.__version__, redoc_url=None,
                  description="OpenAI-compatible API of a kvferry cluster (docs/ROUTER.md)")
    app.state.service = service
    install_openapi(app, api_key_required=bool(api_key), open_paths=OPEN_PATHS)
    app.add_middleware(BodySizeLimit, max_body_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)  # added last: runs first, before the body is read
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(APIError, api_error)

    generation_errors = error_responses(400, 404, 413, 429, 502, 503, 504)
    app.add_api_route("/v1/completions", completions, methods=["POST"], summary="Completions (OpenAI)",
                      responses={**streamed(CompletionResponse, CompletionResponse), **generation_errors})
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], summary="Chat completions (OpenAI)",
                      responses={**streamed(ChatCompletionResponse, ChatCompletionChunk), **generation_errors})
    app.add_api_route("/v1/models", models, methods=["GET"], summary="The served model (OpenAI)",
                      responses={200: {"model": ModelList}})
    add_routes(app, lambda: service.model)
    app.add_api_route("/health", health, methods=["GET"], summary="Whether the router can serve (no API key needed)",
                      responses={200: {"model": HealthResponse},
                                 503: {"model": HealthResponse, "description": "no workers"}})
    app.add_api_route("/metrics", metrics, methods=["GET"], summary="Prometheus metrics (no API key needed)",
                      response_class=Response,
                      responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    return app
