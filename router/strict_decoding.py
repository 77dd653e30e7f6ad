"""Undecodable gRPC requests (corrupt wire format, a string field that is not UTF-8) answered with
INVALID_ARGUMENT naming the message type, where gRPC itself would answer UNKNOWN: a client error, not
a server one.

A server interceptor for the router's asyncio server: each unary-request handler receives the raw bytes
and decodes them itself. Streaming-request methods (reflection) are left as they are.
"""

from __future__ import annotations

import inspect

import grpc
from google.protobuf.message import DecodeError


class InvalidArgumentOnDecodeError(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            return handler  # a thread-run handler: not on this server
        decode = handler.request_deserializer
        method = details.method

        async def decoded(raw: bytes, context):
            try:
                return decode(raw)
            except DecodeError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: undecodable request: {exc}")

        if handler.response_streaming:
            if inspect.isasyncgenfunction(behavior):
                async def stream(raw, context):
                    async for item in behavior(await decoded(raw, context), context):
                        yield item
            else:  # a coroutine that writes with context.write
                async def stream(raw, context):
                    return await behavior(await decoded(raw, context), context)

            return grpc.unary_stream_rpc_method_handler(stream, response_serializer=handler.response_serializer)

        async def unary(raw, context):
            return await behavior(await decoded(raw, context), context)

        return grpc.unary_unary_rpc_method_handler(unary, response_serializer=handler.response_serializer)
