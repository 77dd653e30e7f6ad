"""What `kvferry prefill` and `kvferry decode` share: engine arguments, and a worker process's
lifecycle around its registration with the router (registration.py), serving until SIGINT/SIGTERM.

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
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from kvferry.common.errors import ConfigError
from kvferry.common.worker import WorkerRole
from kvferry.engine.config import CacheConfig, EngineConfig, SchedulerConfig, default_model_path
from kvferry.engine.device import add_device_arguments, device_label, kv_cache_sizing, resolve_device
from kvferry.engine.profiles import ProfileError, add_profile_arguments, profile_from_args
from kvferry.proto.cluster_security import add_security_arguments, security_from_args
from kvferry.transport.negotiation import KV_CHECKSUM_CHOICES, KV_TRANSPORT_CHOICES, transports_for
from kvferry.worker_common.registration import RegistrationRefused, RouterRegistration

if TYPE_CHECKING:
    from kvferry.engine.engine import LLMEngine

logger = logging.getLogger(__name__)


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


def add_kv_checksum_argument(parser: argparse.ArgumentParser) -> None:
    """The receiving (decode) worker's choice: the sender hashes whatever the receiver asks for."""
    parser.add_argument("--kv-checksum", default="auto", choices=KV_CHECKSUM_CHOICES,
                        help="per-layer xxh3 checksums of received KV: auto (verify every data plane but shm, whose bytes never leave this host's memory) or always (shm too: hashed over the source blocks on the sender, over the copied blocks here)")


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


def load_engine(args: argparse.Namespace, role: WorkerRole) -> LLMEngine:
    """The worker's engine from its flags, warmed up unless ``--no-warm-up``; a ``--kv-transport`` this
    host cannot run is a ConfigError before the model loads."""
    from kvferry.engine.engine import LLMEngine  # the model code: only once a worker really starts

    transports_for(args.kv_transport)
    engine = LLMEngine(engine_config_from_args(args), role=role)
    if not args.no_warm_up:
        engine.warm_up()  # seeds the step-time model the scheduler plans with
    return engine


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
    role: WorkerRole,
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
            registration = RouterRegistration(
                args.router, role, address, worker.engine.fingerprint, worker.stats,
                args.name or socket.gethostname(), args.rpc_timeout, security_from_args(args),
                device=device_label(worker.engine.config.device),
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
