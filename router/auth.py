"""Client authentication at the router: the API key (``--api-key``, or ``KVFERRY_API_KEY``).

- HTTP: every route but ``/health``, ``/metrics`` (probes and Prometheus scrapes) and the API's
  description (``/openapi.json``, ``/docs``) needs ``Authorization: Bearer <key>``; otherwise 401 with
  OpenAI's error body (code ``invalid_api_key``) and ``WWW-Authenticate: Bearer``, before the body is read.
- gRPC: ``Generate`` calls need the metadata ``authorization: Bearer <key>``; otherwise UNAUTHENTICATED.
  Health checking and reflection stay open. The workers' control plane (the ``Router`` service) is
  guarded by the cluster token instead (proto/cluster_security.py).

Keys are compared in constant time (``hmac.compare_digest``); an empty key turns the check off.
"""

from __future__ import annotations

import json
import os

from kvferry.proto import generate_pb2
from kvferry.proto.cluster_security import AioTokenServerInterceptor, BearerCheck, bearer_matches

API_KEY_ENV = "KVFERRY_API_KEY"
# Probes, Prometheus scrapes, and the API's description (a browser on /docs cannot send the key).
OPEN_PATHS = frozenset({"/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect"})
GENERATE_SERVICE = generate_pb2.DESCRIPTOR.services_by_name["Generate"].full_name


def api_key_from(flag: str | None) -> str:
    """The ``--api-key`` flag, else the environment; "" = no key required."""
    return flag if flag is not None else os.environ.get(API_KEY_ENV, "")


def _unauthorized_body() -> bytes:
    error = {"message": "Missing or incorrect API key: send the header 'Authorization: Bearer <key>'.",
             "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
    return json.dumps({"error": error}).encode()


class APIKeyMiddleware:
    """ASGI middleware (not Starlette's BaseHTTPMiddleware, which would buffer streamed responses and
    hide client disconnects from the handlers)."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        body = _unauthorized_body()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"),
        ]})
        await send({"type": "http.response.body", "body": body})

    def _authorized(self, scope) -> bool:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        return header is not None and bearer_matches(header.decode("latin-1"), self.api_key)


def generate_interceptor(api_key: str) -> AioTokenServerInterceptor | None:
    """For the router's gRPC server: ``Generate`` needs the key (None when there is no key)."""
    if not api_key:
        return None
    return AioTokenServerInterceptor(BearerCheck(api_key, "the API key", (GENERATE_SERVICE,)))
