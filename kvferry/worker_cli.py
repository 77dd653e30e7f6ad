"""What `kvferry prefill` and `kvferry decode` share: engine arguments, registration with the router
(RegisterWorker, then Heartbeat every interval, re-registering when the router forgot us; Deregister on
shutdown, draining first), and serving until SIGINT/SIGTERM.

Lifecycle of a worker process:
1. Load the engine, start the gRPC server (port 0 = any free port) and the worker loop.
2. Register with the router (retried with backoff until ``--register-timeout``); a fingerprint the
   router refuses (FAILED_PRECONDITION), or a missing or wrong cluster token (UNAUTHENTICATED), ends
   the process with the router's message and exit code 2.
3. Heartbeat with fresh capacity; a router that restarted answers known=false: register again.
4. SIGINT/SIGTERM: Deregister(draining), health NOT_SERVING, let in-flight requests finish for
   ``--shutdown-grace`` seconds, abort the rest (their blocks return), Deregister, stop the server.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

import grpc

import kvferry
from kvferry.engine.config import CacheConfig, ConfigError, EngineConfig, SchedulerConfig, default_model_path
from kvferry.engine.device import add_device_arguments, kv_cache_sizing, resolve_device
from kvferry.engine.profiles import ProfileError, add_profile_arguments, profile_from_args
from kvferry.proto import router_pb2, router_pb2_grpc
from kvferry.proto.cluster_security import TOKEN_ENV, ClusterSecurity, add_security_arguments, security_from_args
from kvferry.transport.base import KVFingerprint
from kvferry.transport.negotiation import KV_TRANSPORT_CHOICES

logger = logging.getLogger(__name__)

ROLES = {
    "prefill": router_pb2.WORKER_ROLE_PREFILL,
    "decode": router_pb2.WORKER_ROLE_DECODE,
    "colocated": router_pb2.WORKER_ROLE_COLOCATED,
}


class RegistrationRefused(Exception):
    """The router will not take this worker (fingerprint mismatch...); the message says why."""


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--router", default=None, help="router gRPC address host:port to register with")
    parser.add_argument("--host", default="127.0.0.1", help="address the worker's gRPC server binds to")
    parser.add_argument("--port", type=int, default=0, help="gRPC port (default 0: any free port)")
    parser.add_argument("--advertise-host", default=None,
                        help="host the router and peers dial (default: --host; set it when binding 0.0.0.0)")
    parser.add_argument("--name", default=None, help="worker name shown by the router (default: hostname)")
    parser.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--dtype", default=None, help="auto, bfloat16, float32, float16 (CUDA)")
    parser.add_argument("--weights", default=None, choices=["auto", "quantized", "dequantized"],
                        help="GGUF weights: quantized (kept in their blocks, multiplied by the quant kernels), dequantized (made --dtype: the exactness path); default auto: quantized on the CPU where the kernels are built")
    parser.add_argument("--prompt-weights", default=None, choices=["auto", "dense", "per-call"],
                        help="quantized GGUF weights, prompt-sized products: dense (a dequantized copy, fast prefill, more memory), per-call (dequantize on every call, the least memory); default auto: dense where the copy takes at most a quarter of the available memory")
    parser.add_argument("--block-size", type=int, default=16,
                        help="tokens per KV cache block; prefill and decode workers must agree (default 16)")
    parser.add_argument("--num-kv-blocks", type=int, default=0,
                        help="KV cache blocks (0: from --gpu-memory-utilization or --kv-cache-bytes)")
    add_device_arguments(parser)
    parser.add_argument("--kv-transport", default="auto", choices=KV_TRANSPORT_CHOICES,
                        help="data plane for KV caches between prefill and decode workers: auto (shm on one host, else nccl between GPU caches, else tcp, gloo, grpc; docs/KV_TRANSFER.md) or one forced, which fails clearly where it cannot work")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve this worker's KV transfer metrics (Prometheus /metrics: transport and throughput per peer) on this port (default: off)")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="do not reuse the KV of prompt prefixes seen before")
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="hard cap on the batch (default: the profile's; its TPOT target may cap lower)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="tokens one step may carry (default: the profile's)")
    add_profile_arguments(parser)
    parser.add_argument("--no-warm-up", action="store_true",
                        help="skip the few synthetic steps that seed the step-time model at start")
    parser.add_argument("--max-model-len", type=int, default=8192,
                        help="context limit in tokens, prompt + output (default 8192; the model's own if smaller)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the sampler for requests without their own (default 0)")
    parser.add_argument("--shutdown-grace", type=float, default=5.0,
                        help="seconds in-flight requests get to finish on SIGTERM before they are aborted")
    parser.add_argument("--register-timeout", type=float, default=60.0,
                        help="give up if the router cannot be reached for this long at start")
    parser.add_argument("--rpc-timeout", type=float, default=3.0, help="deadline of each call to the router")
    add_security_arguments(parser)  # the cluster token (server and every client) and mutual TLS


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model or default_model_path(),
        dtype=args.dtype,
        device=resolve_device(args.device),
        cache=CacheConfig(
            block_size=args.block_size,
            num_blocks=args.num_kv_blocks,
            enable_prefix_caching=not args.no_prefix_caching,
            **kv_cache_sizing(args),
        ),
        scheduler=scheduler_config_from_args(args),
        seed=args.seed,
        weights=args.weights,
        prompt_weights=args.prompt_weights,
    )


def scheduler_config_from_args(args: argparse.Namespace) -> SchedulerConfig:
    """The profile (with explicit targets) and the batch limits, explicit ones over the profile's."""
    try:
        profile = profile_from_args(args)
    except ProfileError as exc:
        raise ConfigError(str(exc)) from None
    return SchedulerConfig(
        max_num_seqs=args.max_num_seqs or profile.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens or profile.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        profile=profile,
    )


def router_fingerprint(fp: KVFingerprint, vocab_size: int, max_model_len: int) -> router_pb2.ModelFingerprint:
    """The KV fingerprint's fields (the config hash as ``model_digest``) plus what the router serves by."""
    fields = dataclasses.asdict(fp)
    fields["model_digest"] = fields.pop("model_config_hash")
    return router_pb2.ModelFingerprint(**fields, vocab_size=vocab_size, max_model_len=max_model_len)


def capacity_from_stats(stats: dict) -> router_pb2.WorkerCapacity:
    return router_pb2.WorkerCapacity(
        total_kv_blocks=stats["total_kv_blocks"],
        free_kv_blocks=stats["free_kv_blocks"],
        queued_prefill_tokens=stats.get("queued_prefill_tokens", 0),
        running_requests=stats["running_requests"],
        waiting_requests=stats["waiting_requests"],
        kv_bytes_sent_total=stats.get("kv_bytes_sent_total", 0),
        kv_bytes_received_total=stats.get("kv_bytes_received_total", 0),
        kv_transfer_seconds_total=stats["kv_transfer_seconds_total"],
        kv_transfers_total=stats["kv_transfers_total"],
        max_running_requests=stats["max_running_requests"],
        engine_busy_ms=stats.get("engine_busy_ms", 0),
    )


class RouterRegistration:
    """Registration and heartbeats for one worker; ``start`` blocks until registered (or raises)."""

    def __init__(
        self,
        router_address: str,
        role: str,
        address: str,
        fingerprint: router_pb2.ModelFingerprint,
        capacity: Callable[[], router_pb2.WorkerCapacity],
        name: str,
        rpc_timeout_s: float = 3.0,
        security: ClusterSecurity = ClusterSecurity(),
    ):
        self.router_address = router_address
        self.request = router_pb2.RegisterWorkerRequest(
            role=ROLES[role], address=address, fingerprint=fingerprint, worker_name=name,
            kv_address=address if role != "prefill" else "", version=kvferry.__version__,
        )
        self.capacity = capacity
        self.rpc_timeout_s = rpc_timeout_s
        self.worker_id = ""
        self.interval_s = 0.5
        self._channel = security.channel(router_address)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        delay = 0.2
        while True:
            try:
                self._register()
                break
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise RegistrationRefused(f"{exc.details()} (--cluster-token or ${TOKEN_ENV})") from None
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION or exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise RegistrationRefused(exc.details()) from None
                if time.monotonic() + delay > end:
                    raise RegistrationRefused(
                        f"router {self.router_address} unreachable for {timeout_s:g}s: {exc.code().name}"
                    ) from None
                logger.info("router %s not reachable yet (%s); retrying", self.router_address, exc.code().name)
                self._stop.wait(delay)
                delay = min(delay * 2, 2.0)
        self._thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._thread.start()

    def _register(self) -> None:
        self.request.capacity.CopyFrom(self.capacity())
        answer = self._stub.RegisterWorker(self.request, timeout=self.rpc_timeout_s)
        self.worker_id = answer.worker_id
        self.interval_s = max(answer.heartbeat_interval_ms / 1000.0, 0.05) if answer.heartbeat_interval_ms else 0.5
        logger.info("registered with router %s as %s", self.router_address, self.worker_id)

    def _heartbeat_loop(self) -> None:
        failing = False  # log an outage once, and its end
        while not self._stop.wait(self.interval_s):
            try:
                answer = self._stub.Heartbeat(
                    router_pb2.HeartbeatRequest(worker_id=self.worker_id, capacity=self.capacity()),
                    timeout=self.rpc_timeout_s,
                )
                if failing:
                    logger.info("router %s reachable again", self.router_address)
                    failing = False
                if not answer.known:
                    logger.info("router %s forgot this worker; registering again", self.router_address)
                    self._register()
                elif answer.heartbeat_interval_ms:
                    self.interval_s = max(answer.heartbeat_interval_ms / 1000.0, 0.05)
            except grpc.RpcError as exc:
                if not failing:
                    logger.warning("heartbeat to %s failed: %s (retrying)", self.router_address, exc.code().name)
                failing = True
            except Exception:
                logger.exception("heartbeat failed")

    def deregister(self, draining: bool) -> None:
        if not self.worker_id:
            return
        try:
            self._stub.Deregister(
                router_pb2.DeregisterRequest(worker_id=self.worker_id, draining=draining), timeout=self.rpc_timeout_s
            )
        except grpc.RpcError as exc:
            logger.warning("deregister from %s failed: %s", self.router_address, exc.code().name)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.rpc_timeout_s + 1)
        self.deregister(draining=False)
        self._channel.close()


def wait_for_signal() -> int:
    """Block until SIGINT or SIGTERM; returns the signal number."""
    received: list[int] = []
    done = threading.Event()

    def handler(signum, _frame) -> None:
        received.append(signum)
        done.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not done.wait(1.0):
            pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return received[0]


def serve(
    args: argparse.Namespace,
    role: str,
    start_worker: Callable[[], tuple[object, grpc.Server, object, int]],
) -> int:
    """Run a worker process. ``start_worker() -> (worker, server, health, port)`` builds and starts
    them; ``worker`` has ``stats()``, ``drain_wait(timeout_s)`` and ``stop()``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        worker, server, health, port = start_worker()
    except ConfigError as exc:  # a bad flag, model or device: one line, not a traceback
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    address = f"{args.advertise_host or args.host}:{port}"
    print(f"kvferry {role} worker serving gRPC on {address}", flush=True)
    registration = None
    try:
        if args.router:
            engine = worker.engine
            fp = router_fingerprint(worker.fingerprint, engine.model_config.vocab_size, engine.max_model_len)
            registration = RouterRegistration(
                args.router, role, address, fp, lambda: capacity_from_stats(worker.stats()),
                args.name or socket.gethostname(), args.rpc_timeout, security_from_args(args),
            )
            registration.start(args.register_timeout)
        signum = wait_for_signal()
        logger.info("signal %d: draining for up to %.1fs", signum, args.shutdown_grace)
    except RegistrationRefused as exc:
        logger.error("registration refused: %s", exc)
        print(f"error: the router refused this worker: {exc}", flush=True)
        worker.stop()
        server.stop(grace=None)
        return 2
    if registration is not None:
        registration.deregister(draining=True)
    health.enter_graceful_shutdown()  # every service NOT_SERVING from here on
    worker.drain_wait(args.shutdown_grace)
    worker.stop()
    server.stop(grace=1.0).wait(2.0)
    if registration is not None:
        registration.stop()
    return 0
