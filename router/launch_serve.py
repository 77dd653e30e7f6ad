"""`kvferry serve`: a whole cluster on this machine — the router, ``--num-prefill`` prefill workers and
``--num-decode`` decode workers (1 and 1 by default) as real subprocesses on the default model (or,
with ``--colocated``, ``--num-decode`` workers doing both phases behind the same router: the baseline
that disaggregation is measured against).

Lifecycle:
1. Start the router; wait until its gRPC port answers health checks.
2. Start the workers with ``--router``; wait until the router's ``/health`` says it can serve.
3. Print the URL and a curl example; then supervise (supervisor.py): a process that exits is started
   again with backoff and rejoins, the rest serving meanwhile (the router moves the requests of a lost
   worker, dispatch.py); one that keeps dying is given up on and reported.
4. On SIGINT/SIGTERM: stop the router first (it refuses new requests and lets in-flight ones finish for
   ``--shutdown-grace`` seconds), then the workers; anything still alive after its grace is killed.
   Children run in their own process group (a terminal's Ctrl-C reaches only this launcher, which stops
   them in order) and get SIGTERM if the launcher itself dies (Linux ``PR_SET_PDEATHSIG``): no orphans.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from kvferry.deploy.ray_args import add_ray_arguments
from kvferry.engine.config import ConfigError
from kvferry.engine.device import add_device_arguments, kv_cache_sizing, resolve_device
from kvferry.engine.profiles import add_profile_arguments, profile_argv
from kvferry.log_config import log_environment
from kvferry.proto.cluster_security import TOKEN_ENV
from kvferry.router.auth import API_KEY_ENV
from kvferry.router.placement import add_placement_arguments
from kvferry.router.serve_common import (
    POLL_S, Child, add_router_flag_arguments, curl_example, http_ready, registered_workers, router_flags_argv,
)
from kvferry.router.serve_worker_flags import add_worker_arguments, worker_argv
from kvferry.router.supervisor import RestartPolicy, Supervisor
from kvferry.transport.negotiation import KV_TRANSPORT_CHOICES

logger = logging.getLogger("kvferry.serve")

STARTUP_TIMEOUT_S = 300.0  # model loading on a small CPU box


@dataclass
class Cluster:
    """The processes of one `kvferry serve`, started and stopped in order."""

    router: Child
    workers: list[Child]
    http_url: str
    grpc_address: str
    shutdown_grace_s: float = 30.0
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    # Start the workers one at a time, each once the last has registered: workers whose threads
    # outnumber the cores would otherwise time their warm-up steps against each other, and a step-time
    # model fitted that way over-estimates the steps (a latency profile then refuses what it could serve).
    stagger: bool = False

    @property
    def children(self) -> list[Child]:
        return [self.router, *self.workers]

    def start(self, timeout_s: float = STARTUP_TIMEOUT_S, cancel: threading.Event | None = None) -> None:
        cancel = cancel or threading.Event()
        self.router.start(self.env)
        self._wait(lambda: _grpc_serving(self.grpc_address), timeout_s, "the router's gRPC server", cancel)
        for i, w in enumerate(self.workers):
            w.start(self.env)
            if self.stagger:
                self._wait(lambda n=i + 1: registered_workers(self.http_url) >= n, timeout_s, f"{w.name} to register",
                           cancel)
        self._wait(lambda: http_ready(self.http_url), timeout_s, "the workers to register", cancel)

    def _wait(self, ready, timeout_s: float, what: str, cancel: threading.Event) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if cancel.is_set():
                raise RuntimeError(f"interrupted while waiting for {what}")
            dead = [c for c in self.children if c.process is not None and not c.alive]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited with code {dead[0].process.returncode} while waiting "
                                   f"for {what}")
            if ready():
                return
            time.sleep(POLL_S)
        raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")

    def stop(self, force: threading.Event | None = None) -> None:
        """Router first (in-flight requests finish), then the workers; kill what outlives its grace
        (or everything at once when ``force`` is set)."""
        self.router.terminate()
        if not self.router.wait(self.shutdown_grace_s + 10, force):
            self.router.kill()
        for w in self.workers:
            w.terminate()
        for w in self.workers:
            if not w.wait(30, force):
                w.kill()


def _grpc_serving(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            return answer.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def build_cluster(args: argparse.Namespace) -> Cluster:
    python = [sys.executable, "-m", "kvferry.cli"]
    router_addr = f"{args.host}:{args.grpc_port}"
    common = []
    if args.model:
        common += ["--model", args.model]
    router_argv = [*python, "router", "--host", args.host, "--port", str(args.port), "--grpc-port",
                   str(args.grpc_port), "--shutdown-grace", str(args.shutdown_grace)]
    if args.max_model_len:
        common += ["--max-model-len", str(args.max_model_len)]
    router_argv += common + profile_argv(args)  # the router sends what is left of the TTFT target
    router_argv += router_flags_argv(args)
    worker_common = [*common, *profile_argv(args), "--router", router_addr, "--host", args.host, "--port", "0"]
    if args.dtype:
        worker_common += ["--dtype", args.dtype]
    if args.weights:
        worker_common += ["--weights", args.weights]
    if args.prompt_weights:
        worker_common += ["--prompt-weights", args.prompt_weights]
    worker_common += device_argv(args)
    if args.kv_transport:
        worker_common += ["--kv-transport", args.kv_transport]
    if args.num_decode < 1 or args.num_prefill < (0 if args.colocated else 1):
        raise ConfigError(f"need at least one decode worker and (without --colocated) one prefill worker; got "
                          f"--num-decode {args.num_decode} --num-prefill {args.num_prefill}")

    def worker(role: str, name: str, *extra: str) -> Child:
        # A stable name across restarts: the router's /health tells a worker that came back from one lost.
        own = worker_argv(args, role, len(workers))  # every worker setting given to serve (serve_worker_flags.py)
        child = Child(name, [*python, role, *worker_common, *own, "--name", name, *extra])
        role_threads = args.prefill_threads if role == "prefill" else args.decode_threads
        if role_threads:  # --prefill-threads / --decode-threads: this role's count over the split below
            child.env["KVFERRY_NUM_THREADS"] = str(role_threads)
        return child

    workers: list[Child] = []
    if args.colocated:
        for i in range(args.num_decode):
            workers.append(worker("decode", f"colocated-{i + 1}", "--colocated"))
    else:
        for i in range(args.num_prefill):
            workers.append(worker("prefill", f"prefill-{i + 1}"))
        for i in range(args.num_decode):
            workers.append(worker("decode", f"decode-{i + 1}"))
    cluster = Cluster(Child("router", router_argv), workers, f"http://{args.host}:{args.port}", router_addr,
                      args.shutdown_grace)
    # Workers on one box share its cores: split them, since OpenMP threads that outnumber the cores
    # spin at barriers and make a decode step tens of times slower.
    threads = args.threads or max(1, (os.cpu_count() or 1) // len(workers))
    cluster.env["KVFERRY_NUM_THREADS"] = str(threads)
    cluster.stagger = sum(int(w.env.get("KVFERRY_NUM_THREADS", threads)) for w in workers) > (os.cpu_count() or 1)
    cluster.env.update(log_environment(args))  # --log-level / --log-format reach every child
    # Secrets travel in the environment, not on command lines (which every local user can read).
    if args.api_key:
        cluster.env[API_KEY_ENV] = args.api_key
    if args.cluster_token:
        cluster.env[TOKEN_ENV] = args.cluster_token
    return cluster


def device_argv(args: argparse.Namespace) -> list[str]:
    """The workers' device and KV cache flags; the device resolved here, so a CUDA device that is not
    there stops `kvferry serve` before anything starts (ConfigError)."""
    argv = ["--device", resolve_device(args.device)]
    kv_cache_sizing(args)  # both sizings given: refused here too
    if args.kv_cache_bytes is not None:
        argv += ["--kv-cache-bytes", str(args.kv_cache_bytes)]
    if args.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    return argv


def _model_name(url: str, api_key: str = "") -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/v1/models", headers=headers), timeout=5) as r:
            return json.load(r)["data"][0]["id"]
    except (urllib.error.URLError, OSError, KeyError, IndexError, ValueError):
        return "default"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--host", default="127.0.0.1", help="address everything binds to (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of the OpenAI API (default 8000)")
    parser.add_argument("--grpc-port", type=int, default=50051, help="router gRPC port (default 50051)")
    parser.add_argument("--colocated", action="store_true",
                        help="workers that do prefill and decode both (the baseline to compare against)")
    parser.add_argument("--num-prefill", type=int, default=1, help="prefill workers (default 1; none with --colocated)")
    parser.add_argument("--num-decode", type=int, default=1,
                        help="decode workers, or colocated ones with --colocated (default 1)")
    add_router_flag_arguments(parser)  # --max-migrations, --worker-lease, --pair-*: passed to the router
    parser.add_argument("--max-restarts", type=int, default=RestartPolicy.max_restarts,
                        help="a process that exits this many times within --restart-window is not started again "
                             f"(default {RestartPolicy.max_restarts})")
    parser.add_argument("--restart-window", type=float, default=RestartPolicy.window_s,
                        help=f"seconds over which exits are counted (default {RestartPolicy.window_s:g})")
    parser.add_argument("--dtype", default=None, help="model dtype for the workers (default: auto)")
    parser.add_argument("--weights", default=None, choices=["auto", "quantized", "dequantized"],
                        help="GGUF weights of the workers: quantized or dequantized (default: auto)")
    parser.add_argument("--kv-transport", default=None, choices=KV_TRANSPORT_CHOICES,
                        help="data plane for KV between the workers, passed to each (default auto: shm on this one host)")
    parser.add_argument("--prompt-weights", default=None, choices=["auto", "dense", "per-call"],
                        help="quantized GGUF weights, prompt-sized products: dense (a dequantized copy, fast prefill, more memory), per-call (dequantize on every call, the least memory); default auto: dense where the copy takes at most a quarter of the available memory")
    parser.add_argument("--max-model-len", type=int, default=None, help="context limit (router and workers)")
    add_device_arguments(parser)  # the workers' device and KV cache size
    add_ray_arguments(parser)  # --ray: the same cluster on a Ray cluster (deploy/ray_serve.py)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (KVFERRY_NUM_THREADS; default: the cores split between the workers)")
    parser.add_argument("--prefill-threads", type=int, default=None,
                        help="torch threads of each prefill worker, over --threads (e.g. 2 beside a 1-thread "
                             "decode worker on 2 cores: a long prompt computed on both; docs/PERFORMANCE.md)")
    parser.add_argument("--decode-threads", type=int, default=None,
                        help="torch threads of each decode (or colocated) worker, over --threads")
    parser.add_argument("--shutdown-grace", type=float, default=30.0,
                        help="seconds in-flight requests get to finish on shutdown")
    parser.add_argument("--startup-timeout", type=float, default=STARTUP_TIMEOUT_S,
                        help=f"seconds the router and workers get to start and register before serve gives up "
                             f"(default {STARTUP_TIMEOUT_S:g}; model loading on a small CPU box)")
    parser.add_argument("--api-key", default=None,
                        help=f"key clients must send (Authorization: Bearer); given to the router as ${API_KEY_ENV} "
                             f"(default: ${API_KEY_ENV} if set, inherited; none: the API is open)")
    parser.add_argument("--cluster-token", default=None,
                        help=f"secret the router and workers check on each other's calls; given to them as "
                             f"${TOKEN_ENV} (default: ${TOKEN_ENV} if set, inherited)")
    add_placement_arguments(parser)  # the router's own flags, passed on to it
    add_profile_arguments(parser)  # router and workers alike
    add_worker_arguments(parser)  # every other flag of kvferry prefill / decode, passed to the workers


def run(args: argparse.Namespace) -> int:
    if args.ray:  # Ray is imported only then
        from kvferry.deploy.ray_serve import serve_on_ray

        return serve_on_ray(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cluster = build_cluster(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    stop = threading.Event()
    force = threading.Event()  # a second SIGINT/SIGTERM while stopping: kill instead of waiting

    def on_signal(signum, _frame) -> None:
        if stop.is_set():
            force.set()
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        cluster.start(args.startup_timeout, stop)
        if args.colocated:
            mode = f"{args.num_decode} colocated worker{'s' * (args.num_decode > 1)} (both phases)"
        else:
            mode = f"{args.num_prefill} prefill + {args.num_decode} decode worker{'s' * (args.num_decode > 1)}"
        key = cluster.env.get(API_KEY_ENV, "")  # given with --api-key, or inherited
        print(f"\nkvferry is serving at {cluster.http_url}/v1 ({mode}); gRPC Generate at {cluster.grpc_address}\n"
              f"try:\n  {curl_example(cluster.http_url, _model_name(cluster.http_url, key), key)}\n"
              f"stop with Ctrl-C\n", flush=True)
        policy = RestartPolicy(max_restarts=args.max_restarts, window_s=args.restart_window)
        supervisor = Supervisor(cluster.children, cluster.env, policy)
        while not stop.wait(POLL_S):
            supervisor.poll()
    except RuntimeError as exc:
        if not stop.is_set():
            logger.error("%s", exc)
            code = 1
    finally:
        logger.info("stopping: router first (in-flight requests finish), then the workers; "
                    "Ctrl-C again to kill them now")
        cluster.stop(force)
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code
