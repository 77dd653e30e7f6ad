"""The cluster's own gRPC security, for every server and client between router and workers: a shared
secret (the cluster token) sent as ``authorization: Bearer <token>`` metadata, and optional mutual TLS.

- Servers: ``ClusterSecurity.server_interceptors()`` (thread-pool servers: the workers) or
  ``aio_server_interceptor(services)`` (the router, which guards only its ``Router`` control plane this
  way: its ``Generate`` clients carry the API key instead) refuse a call without the token with
  UNAUTHENTICATED. Health checking and reflection stay open, so probes and ``grpcurl list`` work without
  the secret. ``add_port`` binds with TLS credentials that require a client certificate signed by the CA.
- Clients: ``channel`` / ``aio_channel`` add the token to every call (a client interceptor) and dial
  over TLS with this side's certificate when TLS is configured.

Tokens are compared in constant time (``hmac.compare_digest``). The token is read from
``--cluster-token`` or the environment (``KVFERRY_CLUSTER_TOKEN``), in ``security_from_args`` only.
"""

from __future__ import annotations

import argparse
import collections
import hmac
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from kvferry.common.errors import ConfigError
from kvferry.proto.keepalive import client_keepalive

TOKEN_ENV = "KVFERRY_CLUSTER_TOKEN"
AUTHORIZATION = "authorization"  # gRPC metadata keys are lower case
# Open on every server: health probes (kvferry serve, load balancers) and reflection (schemas only).
OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def bearer_matches(header: str | None, secret: str) -> bool:
    """Whether ``header`` is ``Bearer <secret>`` (scheme case-insensitive), compared in constant time."""
    if not header:
        return False
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), secret.encode())


def metadata_value(metadata: Sequence[tuple[str, str | bytes]] | None, key: str) -> str | None:
    for k, v in metadata or ():
        if k == key:
            return v.decode(errors="replace") if isinstance(v, bytes) else v
    return None


# ---- servers -----------------------------------------------------------------------------------------
_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _refusing(handler: grpc.RpcMethodHandler, behavior: Callable) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` whose behaviour is ``behavior`` (which aborts)."""
    factory = _HANDLER_FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(behavior, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


@dataclass(frozen=True)
class BearerCheck:
    """Which methods need ``authorization: Bearer <secret>``: those under ``services`` (full names),
    or, with ``services`` empty, every method but health and reflection."""

    secret: str = field(repr=False)
    what: str  # named in the refusal: "the cluster token", "the API key"
    services: tuple[str, ...] = ()

    def protects(self, method: str) -> bool:
        if self.services:
            return any(method.startswith(f"/{s}/") for s in self.services)
        return not method.startswith(OPEN_METHOD_PREFIXES)

    def allows(self, details: grpc.HandlerCallDetails) -> bool:
        if not self.protects(details.method):
            return True
        return bearer_matches(metadata_value(details.invocation_metadata, AUTHORIZATION), self.secret)

    def refusal(self, method: str) -> str:
        return f"{method} needs {self.what}: metadata 'authorization: Bearer <{self.what.removeprefix('the ')}>'"


class TokenServerInterceptor(grpc.ServerInterceptor):
    """Thread-pool servers: calls that fail ``check`` end with UNAUTHENTICATED before any handler runs."""

    def __init__(self, check: BearerCheck) -> None:
        self.check = check

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or self.check.allows(details):
            return handler
        message = self.check.refusal(details.method)

        def refuse(_request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return _refusing(handler, refuse)


class AioTokenServerInterceptor(grpc.aio.ServerInterceptor):
    """The asyncio server's version of ``TokenServerInterceptor``."""

    def __init__(self, check: BearerCheck) -> None:
        self.check = check

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or self.check.allows(details):
            return handler
        message = self.check.refusal(details.method)

        async def refuse(_request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return _refusing(handler, refuse)


# ---- clients -----------------------------------------------------------------------------------------
class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                            "compression")),
    grpc.ClientCallDetails,
):
    pass


class _TokenClientInterceptor(
    grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call of a thread-based channel."""

    def __init__(self, token: str) -> None:
        self._entry = (AUTHORIZATION, f"Bearer {token}")

    def _with_token(self, d: grpc.ClientCallDetails) -> _CallDetails:
        metadata = [*(d.metadata or ()), self._entry]
        return _CallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready,
                            getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)


def _aio_with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), (AUTHORIZATION, f"Bearer {token}"))
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                      details.wait_for_ready)


class _AioToken:
    """Adds the token (``_aio_with_token``) to the calls of one kind on an asyncio channel. grpc.aio files
    an interceptor under the first of the four interceptor kinds it is an instance of, so each kind is a
    class of its own below, with this one method as its ``intercept_*``."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def _intercept(self, continuation, details, request_or_iterator):
        return await continuation(_aio_with_token(details, self._token), request_or_iterator)


class _AioUnaryUnaryToken(_AioToken, grpc.aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _AioToken._intercept


class _AioUnaryStreamToken(_AioToken, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _AioToken._intercept


class _AioStreamUnaryToken(_AioToken, grpc.aio.StreamUnaryClientInterceptor):
    intercept_stream_unary = _AioToken._intercept


class _AioStreamStreamToken(_AioToken, grpc.aio.StreamStreamClientInterceptor):
    intercept_stream_stream = _AioToken._intercept


# ---- configuration -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TLSFiles:
    """PEM files for mutual TLS: this side's certificate and key, and the CA that signs every peer's."""

    cert: str
    key: str
    ca: str
    server_name: str = ""  # clients check the peer's certificate for this name instead of the dialed host

    def __post_init__(self) -> None:
        for name in ("cert", "key", "ca"):
            path = getattr(self, name)
            if not os.path.isfile(path):
                raise ConfigError(f"--tls-{name} {path}: no such file")

    def _read(self) -> tuple[bytes, bytes, bytes]:
        def read(path: str) -> bytes:
            with open(path, "rb") as f:
                return f.read()

        return read(self.cert), read(self.key), read(self.ca)

    def server_credentials(self) -> grpc.ServerCredentials:
        cert, key, ca = self._read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        cert, key, ca = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


@dataclass(frozen=True)
class ClusterSecurity:
    """The cluster token ("" = none required, none sent) and optional mutual TLS."""

    token: str = field(default="", repr=False)
    tls: TLSFiles | None = None

    # ---- servers ----
    def server_interceptors(self) -> list[grpc.ServerInterceptor]:
        """For a worker's server: every method but health and reflection needs the token."""
        return [TokenServerInterceptor(BearerCheck(self.token, "the cluster token"))] if self.token else []

    def aio_server_interceptor(self, services: tuple[str, ...]) -> AioTokenServerInterceptor | None:
        """For the router's server: the token guards ``services`` (full names) only."""
        if not self.token:
            return None
        return AioTokenServerInterceptor(BearerCheck(self.token, "the cluster token", services))

    def add_port(self, server: grpc.Server | grpc.aio.Server, address: str) -> int:
        """Bind ``address`` (TLS when configured); the bound port, 0 if binding failed."""
        if self.tls is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.tls.server_credentials())

    # ---- clients ----
    def channel(self, address: str, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
        options = [*client_keepalive(), *options]  # a dead peer fails the calls in seconds
        if self.tls is None:
            channel = grpc.insecure_channel(address, options=list(options))
        else:
            channel = grpc.secure_channel(address, self.tls.channel_credentials(),
                                          options=[*options, *self.tls.channel_options()])
        return grpc.intercept_channel(channel, _TokenClientInterceptor(self.token)) if self.token else channel

    def aio_channel(self, address: str, options: Sequence[tuple[str, object]] = ()) -> grpc.aio.Channel:
        options = [*client_keepalive(), *options]
        interceptors = [
            kind(self.token) for kind in (_AioUnaryUnaryToken, _AioUnaryStreamToken, _AioStreamUnaryToken,
                                          _AioStreamStreamToken)
        ] if self.token else None
        if self.tls is None:
            return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
        return grpc.aio.secure_channel(address, self.tls.channel_credentials(),
                                       options=[*options, *self.tls.channel_options()], interceptors=interceptors)


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cluster-token", default=None,
                        help=f"shared secret every router and worker of the cluster must present (default: "
                             f"${TOKEN_ENV}; none: the control plane and worker RPCs are open). Prefer the "
                             "environment variable: a command line is visible to every local user")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate of this process (mutual TLS)")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-ca", default=None, help="PEM CA certificate that signs every peer's certificate")
    parser.add_argument("--tls-server-name", default=None,
                        help="name the peers' certificates carry, checked instead of the dialed host "
                             "(default: the host in the address)")


def security_from_args(args: argparse.Namespace) -> ClusterSecurity:
    """The flags, with the token from the environment when the flag is absent."""
    token = args.cluster_token if args.cluster_token is not None else os.environ.get(TOKEN_ENV, "")
    tls_flags = (args.tls_cert, args.tls_key, args.tls_ca)
    if any(tls_flags) and not all(tls_flags):
        raise ConfigError("mutual TLS needs all three of --tls-cert, --tls-key and --tls-ca")
    tls = TLSFiles(*tls_flags, server_name=args.tls_server_name or "") if all(tls_flags) else None
    return ClusterSecurity(token=token, tls=tls)
