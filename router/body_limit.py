"""A bound on HTTP request bodies (``--max-body-bytes``): a larger body is refused with 413 and OpenAI's
error body (code ``request_too_large``) before the application sees any of it.

A declared ``Content-Length`` over the limit is refused at once; a chunked body is counted as it
arrives. The body is read here, up to the limit, and handed on in one message; the receive channel is
then passed through, so handlers still see the client disconnect.
"""

from __future__ import annotations

import json

DEFAULT_MAX_BODY_BYTES = 8 << 20  # a full 8k-token context as token ids is ~60 KB; prompt lists fit too


def _error(status: int, message: str, code: str) -> tuple[int, bytes]:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return status, json.dumps(body).encode()


class BodySizeLimit:
    def __init__(self, app, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        too_large = _error(413, f"the request body exceeds {limit} bytes", "request_too_large")
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None:
            if not declared.isdigit():
                await _respond(send, *_error(400, "invalid Content-Length header", "invalid_request"))
                return
            if int(declared) > limit:
                await _respond(send, *too_large)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _respond(send, *too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        first: dict | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():
            nonlocal first
            if first is not None:
                message, first = first, None
                return message
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)


async def _respond(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),  # the rest of the body is never read
    ]})
    await send({"type": "http.response.body", "body": body})
