"""`kvferry router`: the HTTP OpenAI API and the gRPC server (Generate + worker registration) in one
process and one event loop.

Lifecycle:
1. Load the served model's tokenizer and config (no weights): the router tokenizes, checks context
   lengths and detokenizes; workers exchange token ids only.
2. Start the gRPC server (workers register here) and the HTTP server; expire silent workers every
   heartbeat interval.
3. On SIGINT/SIGTERM: refuse new requests (503 / UNAVAILABLE), let in-flight ones finish for up to
   ``--shutdown-grace`` seconds, then cut the rest (which aborts them on their workers), and exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import threading
from dataclasses import dataclass, field

import uvicorn
from grpc_health.v1 import health_pb2

from kvferry.engine.config import ConfigError, SchedulerConfig, default_model_path
from kvferry.engine.profiles import ProfileError, SLOProfile, add_profile_arguments, profile_from_args
from kvferry.proto.cluster_security import ClusterSecurity, add_security_arguments, security_from_args
from kvferry.router.admission import AdmissionConfig, AdmissionQueue
from kvferry.router.auth import API_KEY_ENV, api_key_from
from kvferry.router.body_limit import DEFAULT_MAX_BODY_BYTES
from kvferry.router.dispatch import DispatchConfig, Dispatcher
from kvferry.router.grpc_api import create_grpc_server
from kvferry.router.openai_api import create_app
from kvferry.router.pair_health import PairHealthConfig
from kvferry.router.placement import DisaggregationPolicy, add_placement_arguments, placement_from_args
from kvferry.router.registry import RegistryConfig, WorkerRegistry
from kvferry.router.request import ServedModel
from kvferry.router.service import RouterService

logger = logging.getLogger("kvferry.router")


@dataclass(frozen=True)
class RouterConfig:
    model: str = field(default_factory=default_model_path)
    served_model_name: str | None = None  # default: the model file/dir name without .gguf
    max_model_len: int = SchedulerConfig().max_model_len
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    shutdown_grace_s: float = 30.0
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    placement: DisaggregationPolicy = field(default_factory=DisaggregationPolicy)
    api_key: str = field(default="", repr=False)  # clients' key; "" = open (router/auth.py)
    security: ClusterSecurity = field(default_factory=ClusterSecurity)  # cluster token and mutual TLS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    request_timeout_s: float = 3600.0  # a request not finished by then is aborted: 504; 0 = no deadline

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536 or not 0 <= self.grpc_port < 65536:
            raise ConfigError("ports must be in [0, 65535] (0 = any free port)")
        if self.max_model_len <= 0 or self.shutdown_grace_s < 0:
            raise ConfigError("max_model_len must be positive and shutdown_grace_s >= 0")
        if self.max_body_bytes <= 0 or self.request_timeout_s < 0:
            raise ConfigError("max_body_bytes must be positive and request_timeout_s >= 0 (0: no deadline)")


def load_served_model(path: str, served_name: str | None, max_model_len: int) -> ServedModel:
    """Tokenizer and model config only (reads the GGUF header or config.json, never the weights)."""
    from kvferry.engine.loader import load_config_and_tokenizer

    config, tokenizer, default_name = load_config_and_tokenizer(path)
    return ServedModel(
        name=served_name or default_name,
        tokenizer=tokenizer,
        vocab_size=config.vocab_size,
        max_model_len=min(config.max_model_len, max_model_len),
    )


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the router shuts HTTP and gRPC down together."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


@dataclass
class RouterHandle:
    """What a running router exposes to whoever started it (tests, ``kvferry serve``)."""

    service: RouterService
    http_port: int
    grpc_port: int
    stop: asyncio.Event


async def expire_workers(registry: WorkerRegistry, dispatcher: Dispatcher, stop: asyncio.Event,
                         interval_s: float) -> None:
    """Until ``stop``: remove the workers whose lease ran out and move the requests of those and of
    wedged ones now, not when their streams time out."""
    while not stop.is_set():
        for worker in registry.expire():
            logger.warning("worker %s (%s at %s) missed its heartbeats: removed",
                           worker.worker_id, worker.role.name.lower(), worker.address)
            dispatcher.worker_lost(worker, "missed its heartbeats")  # its requests move now
            await dispatcher.forget(worker.address)
        for worker in registry.take_newly_stalled():
            logger.warning("worker %s (%s at %s): its engine has been busy in one step for %.0f s; no new "
                           "requests for it, and its requests move", worker.worker_id, worker.role.name.lower(),
                           worker.address, worker.capacity.engine_busy_ms / 1000)
            dispatcher.worker_lost(worker, "has a wedged engine")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


async def serve(
    config: RouterConfig, on_ready=None, stop: asyncio.Event | None = None, model: ServedModel | None = None
) -> None:
    """Run until SIGINT/SIGTERM (main thread) or until ``stop`` is set; ``on_ready(RouterHandle)`` once up."""
    model = model or load_served_model(config.model, config.served_model_name, config.max_model_len)
    admission = AdmissionQueue(config.admission)
    registry = WorkerRegistry(config.registry, on_change=admission.notify)  # room may have grown: wake the queue
    service = RouterService(model, registry, admission, config.dispatch, config.placement, config.security,
                            config.request_timeout_s)
    dispatcher = service.dispatcher

    grpc_server, health_servicer, grpc_port = create_grpc_server(
        service, f"{config.grpc_host}:{config.grpc_port}", config.security, config.api_key
    )
    await grpc_server.start()
    for name in ("", "kvferry.generate.v1.Generate", "kvferry.router.v1.Router"):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    http = _Server(uvicorn.Config(
        create_app(service, config.api_key, config.max_body_bytes), host=config.host, port=config.port, log_level="warning",
        timeout_graceful_shutdown=int(config.shutdown_grace_s) or None, lifespan="off",
    ))
    stop = stop or asyncio.Event()
    if threading.current_thread() is threading.main_thread():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

    http_task = asyncio.create_task(http.serve())
    expiry_task = asyncio.create_task(expire_workers(registry, dispatcher, stop, config.registry.heartbeat_interval_s))
    for _ in range(600):  # up to 30 s
        if http.started or http_task.done():
            break
        await asyncio.sleep(0.05)
    if not http.started:  # failed to bind (uvicorn logs why)
        stop.set()
        http.should_exit = True
        await grpc_server.stop(None)
        await expiry_task
        await asyncio.gather(http_task, return_exceptions=True)
        raise OSError(f"the HTTP server on {config.host}:{config.port} did not start")
    port = http.servers[0].sockets[0].getsockname()[1]
    print(f"kvferry router: http://{config.host}:{port}/v1 (OpenAI API), "
          f"grpc {config.grpc_host}:{grpc_port} (Generate, worker registration); model {model.name}",
          flush=True)
    if on_ready is not None:
        on_ready(RouterHandle(service, port, grpc_port, stop))
    await stop.wait()

    logger.warning("shutting down: finishing in-flight requests (up to %.0f s)", config.shutdown_grace_s)
    service.shutting_down = True
    await health_servicer.enter_graceful_shutdown()
    http.should_exit = True
    await asyncio.gather(http_task, grpc_server.stop(config.shutdown_grace_s), return_exceptions=True)
    await expiry_task
    await dispatcher.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = RouterConfig.__dataclass_fields__
    parser.add_argument("--model", default=None, help="model path (GGUF file or HF dir); default: SmolLM2-135M")
    parser.add_argument("--served-model-name", default=None, help="the name clients use (default: file name)")
    parser.add_argument("--max-model-len", type=int, default=d["max_model_len"].default,
                        help="context limit in tokens, prompt + output (default %(default)s; the model's own "
                             "or a registered worker's, if smaller, wins)")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--grpc-host", default=None, help="gRPC host (default: --host)")
    parser.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (default 50051)")
    parser.add_argument("--queue-timeout", type=float, default=AdmissionConfig.timeout_s,
                        help="seconds a request may wait for KV room before it fails")
    parser.add_argument("--max-queue", type=int, default=AdmissionConfig.max_waiting,
                        help="requests that may wait for KV room at once")
    parser.add_argument("--heartbeat-interval", type=float, default=RegistryConfig.heartbeat_interval_s,
                        help="seconds between worker heartbeats, told to each worker at registration "
                             "(default %(default)s)")
    parser.add_argument("--worker-lease", type=float, default=RegistryConfig.lease_s,
                        help="seconds without a heartbeat before a worker is removed")
    parser.add_argument("--max-migrations", type=int, default=DispatchConfig.max_migrations,
                        help="times one request may move to another worker after the one it ran on was lost "
                             f"(default {DispatchConfig.max_migrations}; 0: fail it at once)")
    parser.add_argument("--pair-failure-limit", type=int, default=PairHealthConfig.failure_limit,
                        help="KV transfers in a row that may fail between a prefill and a decode worker (refused "
                             "connection, failed handshake, deadline, corrupt bytes) before the router stops "
                             "placing requests on that pair for a cool-down (default %(default)s; 0: never)")
    parser.add_argument("--pair-cooldown", type=float, default=PairHealthConfig.cooldown_s,
                        help="seconds such a pair is left out before it is tried again; doubled each time it "
                             f"fails again, up to {PairHealthConfig.max_cooldown_s:g} s (default %(default)s)")
    parser.add_argument("--shutdown-grace", type=float, default=30.0,
                        help="seconds in-flight requests get to finish on SIGTERM before they are cut "
                             "(default %(default)s)")
    parser.add_argument("--api-key", default=None,
                        help=f"key clients must send as 'Authorization: Bearer <key>' (HTTP) or authorization "
                             f"metadata (gRPC Generate); default: ${API_KEY_ENV}; none: the API is open")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="largest HTTP request body; larger ones get 413 (default %(default)s)")
    parser.add_argument("--request-timeout", type=float, default=RouterConfig.request_timeout_s,
                        help="seconds a request may take in all before it is aborted with 504 / "
                             "DEADLINE_EXCEEDED (default %(default)s; 0: no deadline)")
    add_security_arguments(parser)  # the cluster token workers must present, and mutual TLS
    add_placement_arguments(parser)
    add_profile_arguments(parser)  # the router uses the TTFT target and the local prefill threshold
    parser.add_argument("--log-level", default="info", help="debug, info, warning or error (default info)")


def _placement(args: argparse.Namespace) -> DisaggregationPolicy:
    # The profile sets the short-prompt threshold; --local-prefill-* flags override it.
    base = DisaggregationPolicy(local_prefill_max_tokens=_profile(args).local_prefill_max_tokens)
    try:
        return placement_from_args(args, base)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _profile(args: argparse.Namespace) -> SLOProfile:
    try:
        return profile_from_args(args)
    except ProfileError as exc:
        raise ConfigError(str(exc)) from None


def _pairs(args: argparse.Namespace) -> PairHealthConfig:
    try:
        return PairHealthConfig(args.pair_failure_limit, args.pair_cooldown,
                                max(PairHealthConfig.max_cooldown_s, args.pair_cooldown))
    except ValueError as exc:
        raise ConfigError(f"--pair-failure-limit / --pair-cooldown: {exc}") from None


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    if args.max_migrations < 0:
        raise ConfigError(f"--max-migrations must be 0 or more, got {args.max_migrations}")
    return RouterConfig(
        model=args.model or default_model_path(),
        served_model_name=args.served_model_name,
        max_model_len=args.max_model_len,
        host=args.host,
        port=args.port,
        grpc_host=args.grpc_host or args.host,
        grpc_port=args.grpc_port,
        shutdown_grace_s=args.shutdown_grace,
        registry=RegistryConfig(args.heartbeat_interval, args.worker_lease, pairs=_pairs(args)),
        admission=AdmissionConfig(max_waiting=args.max_queue, timeout_s=args.queue_timeout),
        dispatch=DispatchConfig(ttft_slo_ms=_profile(args).ttft_slo_ms, max_migrations=args.max_migrations),
        placement=_placement(args),
        api_key=api_key_from(args.api_key),
        security=security_from_args(args),
        max_body_bytes=args.max_body_bytes,
        request_timeout_s=args.request_timeout,
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = config_from_args(args)
        asyncio.run(serve(config))
    except (ConfigError, OSError) as exc:
        logger.error("%s", exc)
        return 1
    return 0
