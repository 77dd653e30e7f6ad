"""The router's gRPC server: the client-facing ``Generate`` service, the workers' ``Router`` control
plane (registration, heartbeats), standard health checking (grpc.health.v1) and server reflection.

``Generate`` maps onto the same ``GenerationRequest`` / ``ChoiceDelta`` stream as the HTTP API: invalid
input is INVALID_ARGUMENT, no room within the queue timeout RESOURCE_EXHAUSTED, a request refused for
its TTFT target RESOURCE_EXHAUSTED with ``retry-after`` (seconds) in the trailing metadata, a worker
failure UNAVAILABLE. A cancelled call (client gone, deadline passed) aborts the request on its workers. A
finished call's phase timings are in its trailing metadata, ``x-kvferry-timings`` (router/timings.py).
A client's ``request_id`` is echoed in the response, never sent to a worker (those ids are the router's).
A request that does not decode (corrupt, or a string that is not UTF-8) is INVALID_ARGUMENT, not UNKNOWN.
With an API key, ``Generate`` needs it as ``authorization: Bearer`` metadata (router/auth.py); with a
cluster token, so does the ``Router`` control plane, with that token (proto/cluster_security.py).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvferry.common.sampling import SamplingParamsError, TokenLogprobs
from kvferry.proto import generate_pb2, generate_pb2_grpc, router_pb2, router_pb2_grpc
from kvferry.proto.cluster_security import ClusterSecurity
from kvferry.proto.convert import (
    capacity_from_proto, capacity_to_proto, fingerprint_from_proto, fingerprint_to_proto, grammar_from_proto,
    role_from_proto, role_to_proto,
)
from kvferry.proto.keepalive import server_keepalive
from kvferry.router.auth import generate_interceptor
from kvferry.router.openai_protocol import ChoiceResult, usage_of
from kvferry.router.registry import RegistrationError
from kvferry.router.request import (
    APIError,
    ChoiceDelta,
    GenerationRequest,
    ServedModel,
    check_client_request_id,
    check_context,
    check_token_ids,
    encode_text,
    make_sampling_params,
)
from kvferry.router.service import RouterService
from kvferry.router.strict_decoding import InvalidArgumentOnDecodeError
from kvferry.router.timings import format_timings

logger = logging.getLogger(__name__)

FINISH_REASONS = {
    None: generate_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": generate_pb2.FINISH_REASON_STOP,
    "length": generate_pb2.FINISH_REASON_LENGTH,
    "abort": generate_pb2.FINISH_REASON_ABORT,
}
SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "logprobs", "n",
)


def status_of(exc: APIError) -> grpc.StatusCode:
    if exc.status == 400:
        return grpc.StatusCode.INVALID_ARGUMENT
    if exc.code == "no_capacity" or exc.status == 429:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if exc.status in (502, 503):
        return grpc.StatusCode.UNAVAILABLE
    if exc.status == 504:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.INTERNAL


def trailing_of(exc: APIError) -> tuple[tuple[str, str], ...]:
    """An early rejection's ``retry-after`` (seconds), as trailing metadata of the failed call."""
    retry_after = exc.retry_after_header
    return (("retry-after", retry_after),) if retry_after is not None else ()


def parse_generate(msg: generate_pb2.GenerateRequest, model: ServedModel) -> GenerationRequest:
    client_request_id = check_client_request_id(msg.request_id, "request_id")
    if msg.model and msg.model != model.name:
        raise APIError(f"unknown model {msg.model!r}; this server serves {model.name!r}", param="model",
                       code="model_not_found")
    kind = msg.WhichOneof("input")
    if kind == "prompt":
        prompt = encode_text(model, msg.prompt, "prompt")
    elif kind == "prompt_token_ids":
        prompt = check_token_ids(model, list(msg.prompt_token_ids.ids), "prompt_token_ids")
    elif kind == "chat":
        if not msg.chat.messages:
            raise APIError("chat.messages is empty", param="chat.messages")
        messages = [{"role": m.role, "content": m.content} for m in msg.chat.messages]
        for i, m in enumerate(messages):
            if m["role"] not in ("system", "user", "assistant", "tool"):
                raise APIError(f"chat.messages[{i}].role {m['role']!r} is not system/user/assistant/tool",
                               param=f"chat.messages[{i}].role")
        prompt = encode_text(model, model.tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                             "chat")
    else:
        raise APIError("one of prompt, chat or prompt_token_ids is required", param="input")
    s = msg.sampling
    fields_: dict = {name: getattr(s, name) for name in SAMPLING_FIELDS if s.HasField(name)}
    max_tokens_given = s.HasField("max_tokens")
    if max_tokens_given and s.max_tokens <= 0:
        raise APIError("max_tokens must be at least 1", param="max_tokens")
    if max_tokens_given:
        fields_["max_tokens"] = s.max_tokens
    elif kind == "chat":
        fields_["max_tokens"] = model.max_model_len
    fields_["stop"] = tuple(s.stop)
    if s.stop_token_ids:
        fields_["stop_token_ids"] = check_token_ids(model, list(s.stop_token_ids), "stop_token_ids")
    fields_["ignore_eos"] = s.ignore_eos
    if s.HasField("grammar"):  # structured output: checked here, applied by every worker that samples
        try:
            fields_["grammar"] = grammar_from_proto(s.grammar)
        except SamplingParamsError as exc:
            raise APIError(f"sampling.{exc}", param=f"sampling.{exc.param}", code="invalid_value") from None
    if fields_.get("n", 1) > 16:
        raise APIError("n must be in [1, 16]", param="n")
    params = check_context(model, [prompt], make_sampling_params(**fields_), max_tokens_given)
    return GenerationRequest(
        request_id=f"gen-{uuid.uuid4().hex}", prompts=(prompt,), params=params, client_request_id=client_request_id
    )


def _logprobs(items: list[TokenLogprobs] | None, model: ServedModel) -> list[generate_pb2.TokenLogprob]:
    decode = model.tokenizer.decode
    return [
        generate_pb2.TokenLogprob(
            token_id=lp.token_id, token=decode([lp.token_id]), logprob=lp.logprob,
            top_logprobs=[generate_pb2.TopLogprob(token_id=t, token=decode([t]), logprob=v) for t, v in lp.top_logprobs.items()],
        )
        for lp in items or ()
    ]


class GenerateServicer(generate_pb2_grpc.GenerateServicer):
    def __init__(self, service: RouterService) -> None:
        self.service = service

    async def _deltas(self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext,
                      api: str) -> tuple[GenerationRequest, AsyncIterator[ChoiceDelta]]:
        try:  # tokenizing on a thread: other streams keep flowing meanwhile
            gen = await asyncio.to_thread(parse_generate, request, self.service.model)
        except APIError as exc:
            self.service.metrics.requests.labels(api, "invalid").inc()
            await context.abort(status_of(exc), exc.message, trailing_metadata=trailing_of(exc))
        return gen, self.service.generate(gen)

    async def Generate(self, request, context):
        gen, deltas = await self._deltas(request, context, "grpc")
        choices = [ChoiceResult(i) for i in range(gen.num_choices)]
        timings: dict[str, float] | None = None
        try:
            async for delta in deltas:
                choices[delta.index].add(delta)
                timings = delta.timings or timings
        except APIError as exc:
            self.service.metrics.requests.labels("grpc", "error").inc()
            await context.abort(status_of(exc), exc.message, trailing_metadata=trailing_of(exc))
        finally:
            await deltas.aclose()
        failed = [c for c in choices if c.finish_reason == "error"]
        if failed:
            self.service.metrics.requests.labels("grpc", "error").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"generation failed: {failed[0].error}")
        self.service.metrics.requests.labels("grpc", "ok").inc()
        if timings is not None:
            context.set_trailing_metadata((("x-kvferry-timings", format_timings(timings)),))
        usage = usage_of(gen, sum(len(c.token_ids) for c in choices))
        model = self.service.model
        return generate_pb2.GenerateResponse(
            request_id=gen.client_request_id or gen.request_id,
            model=model.name,
            choices=[
                generate_pb2.Choice(index=c.index, text=c.text, token_ids=c.token_ids,
                                    logprobs=_logprobs(c.logprobs, model),
                                    finish_reason=FINISH_REASONS.get(c.finish_reason, 0))
                for c in choices
            ],
            usage=generate_pb2.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                                     total_tokens=usage.total_tokens),
        )

    async def GenerateStream(self, request, context):
        gen, deltas = await self._deltas(request, context, "grpc_stream")
        model = self.service.model
        completion_tokens, remaining = 0, gen.num_choices
        outcome = "disconnected"
        try:
            async for delta in deltas:
                if delta.finish_reason == "error":
                    outcome = "error"
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"generation failed: {delta.error}")
                completion_tokens += len(delta.token_ids)
                remaining -= delta.finish_reason is not None
                if remaining == 0 and delta.timings is not None:
                    context.set_trailing_metadata((("x-kvferry-timings", format_timings(delta.timings)),))
                chunk = generate_pb2.GenerateChunk(
                    request_id=gen.client_request_id or gen.request_id, index=delta.index, token_ids=delta.token_ids, text=delta.text,
                    logprobs=_logprobs(delta.logprobs, model), finish_reason=FINISH_REASONS.get(delta.finish_reason, 0),
                )
                if remaining == 0:
                    usage = usage_of(gen, completion_tokens)
                    chunk.usage.CopyFrom(generate_pb2.Usage(
                        prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                        total_tokens=usage.total_tokens))
                yield chunk
            outcome = "ok"
        except APIError as exc:
            outcome = "error"
            await context.abort(status_of(exc), exc.message, trailing_metadata=trailing_of(exc))
        finally:
            await deltas.aclose()
            self.service.metrics.requests.labels("grpc_stream", outcome).inc()

    async def ListModels(self, request, context):
        model = self.service.model
        return generate_pb2.ListModelsResponse(
            models=[generate_pb2.ModelInfo(id=model.name, max_model_len=model.max_model_len)]
        )


class RouterServicer(router_pb2_grpc.RouterServicer):
    """Workers' registration and heartbeats, checked against the router's own model."""

    def __init__(self, service: RouterService) -> None:
        self.service = service

    async def RegisterWorker(self, request, context):
        registry, model = self.service.registry, self.service.model
        try:
            role = role_from_proto(request.role)
        except ValueError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown worker role {request.role}")
        fingerprint = fingerprint_from_proto(request.fingerprint)
        if fingerprint.vocab_size and fingerprint.vocab_size != model.vocab_size:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{role.name.lower()} worker at {request.address} is incompatible with this router: vocab_size: "
                f"router {model.vocab_size}, worker {fingerprint.vocab_size} (not the router's model)",
            )
        try:
            worker = registry.register(
                role, request.address, fingerprint, capacity_from_proto(request.capacity),
                name=request.worker_name, kv_address=request.kv_address, device=request.device,
            )
        except RegistrationError as exc:
            logger.warning("refused a worker: %s", exc)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        logger.info("worker %s joined: %s at %s", worker.worker_id, role.name.lower(), worker.address)
        return router_pb2.RegisterWorkerResponse(
            worker_id=worker.worker_id,
            heartbeat_interval_ms=int(registry.config.heartbeat_interval_s * 1000),
            lease_ms=int(registry.config.lease_s * 1000),
        )

    async def Heartbeat(self, request, context):
        registry = self.service.registry
        known = registry.heartbeat(request.worker_id, capacity_from_proto(request.capacity))
        return router_pb2.HeartbeatResponse(
            known=known, heartbeat_interval_ms=int(registry.config.heartbeat_interval_s * 1000)
        )

    async def Deregister(self, request, context):
        worker = self.service.registry.workers.get(request.worker_id)
        if self.service.registry.deregister(request.worker_id, request.draining) and not request.draining:
            logger.info("worker %s left", request.worker_id)
            if worker is not None:
                await self.service.dispatcher.forget(worker.address)
        return router_pb2.DeregisterResponse()

    async def ListWorkers(self, request, context):
        registry = self.service.registry
        now = registry.clock()
        return router_pb2.ListWorkersResponse(
            workers=[
                router_pb2.WorkerInfo(
                    worker_id=w.worker_id, role=role_to_proto(w.role), address=w.address, worker_name=w.name,
                    capacity=capacity_to_proto(w.capacity), draining=w.draining,
                    seconds_since_heartbeat=now - w.last_heartbeat, requests_routed_total=w.requests_routed_total,
                    device=w.device,
                )
                for w in registry.workers.values()
            ],
            fingerprint=fingerprint_to_proto(registry.fingerprint, router_pb2.ModelFingerprint) if registry.fingerprint else None,
        )


def create_grpc_server(
    service: RouterService, address: str, security: ClusterSecurity = ClusterSecurity(), api_key: str = ""
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """The server (not started), its health servicer, and the bound port. ``api_key`` guards Generate,
    ``security.token`` the Router control plane; ``security.tls``: mutual TLS on the port."""
    router_service = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
    interceptors = [i for i in (generate_interceptor(api_key), security.aio_server_interceptor((router_service,)))
                    if i is not None] + [InvalidArgumentOnDecodeError()]
    server = grpc.aio.server(interceptors=interceptors, options=server_keepalive())
    generate_pb2_grpc.add_GenerateServicer_to_server(GenerateServicer(service), server)
    router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        generate_pb2.DESCRIPTOR.services_by_name["Generate"].full_name,
        router_pb2.DESCRIPTOR.services_by_name["Router"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    port = security.add_port(server, address)
    if port == 0:
        raise OSError(f"cannot bind the gRPC server to {address}")
    return server, health_servicer, port
