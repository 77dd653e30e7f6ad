"""`kvferry serve --ray`: the cluster on a Ray cluster — the router beside this command (run it on the
head node), prefill and decode workers as Ray actors where the ``kvferry_prefill`` / ``kvferry_decode``
resources are (ray_deployment.py).

Lifecycle:
1. Join the Ray cluster at ``--ray-address``, or start a local one with room for the workers.
2. Start the router as a child process (the same command line `kvferry serve` runs) and wait for its
   gRPC control plane.
3. Create the named ``Deployment`` actor on this node; it places the workers, which register with the
   router. Wait until every pool is at its target and the router's ``/health`` says it can serve.
4. Print the URL; then watch the router (if it exits, stop everything and exit non-zero). The
   deployment meanwhile replaces lost workers, follows joining nodes (``--elastic``) and answers
   `kvferry scale`.
5. On SIGINT/SIGTERM: the router first (in-flight requests finish for ``--shutdown-grace``), then the
   workers, then Ray. If this process dies instead, Ray ends the actors it owns, and with them the
   worker processes (each dies with its actor): nothing is left behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import threading
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kvferry.deploy.ray_args import DEPLOYMENT_NAME, NAMESPACE, ROLE_RESOURCES, unreachable
from kvferry.deploy.ray_deployment import Deployment, PoolSpec
from kvferry.deploy.router_control import RouterControl
from kvferry.engine.config import ConfigError
from kvferry.engine.device import kv_cache_sizing
from kvferry.engine.profiles import profile_argv
from kvferry.proto.cluster_security import TOKEN_ENV
from kvferry.router.auth import API_KEY_ENV
from kvferry.router.serve_common import Child, curl_example, http_ready, router_flags_argv

logger = logging.getLogger("kvferry.serve")

POLL_S = 0.25
WORKER_SHUTDOWN_GRACE_S = 5.0  # at the end: the router has already let in-flight requests finish


def router_argv(args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, "-m", "kvferry.cli", "router", "--host", args.host, "--port", str(args.port),
            "--grpc-port", str(args.grpc_port), "--shutdown-grace", str(args.shutdown_grace)]
    argv += _model_argv(args) + profile_argv(args)  # the router sends what is left of the TTFT target
    return argv + router_flags_argv(args)


def worker_argv(args: argparse.Namespace, router_address: str, device: str) -> list[str]:
    """The flags of every worker's command line. Workers listen on all of their node's interfaces and
    advertise the node's address (the actor adds ``--advertise-host``); a drained worker gets
    ``--drain-timeout`` to finish its streams."""
    argv = ["--router", router_address, "--host", "0.0.0.0", "--port", "0", "--device", device,
            "--shutdown-grace", str(args.drain_timeout), *_model_argv(args), *profile_argv(args)]
    for flag in ("dtype", "weights", "prompt_weights", "kv_cache_bytes", "gpu_memory_utilization", "kv_transport"):
        if getattr(args, flag, None) is not None:
            argv += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    return argv + shlex.split(args.worker_args)


def _model_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--model", args.model] if args.model else []
    return argv + (["--max-model-len", str(args.max_model_len)] if args.max_model_len else [])


def check_args(args: argparse.Namespace) -> None:
    """What can be refused before Ray starts."""
    if args.colocated:
        raise ConfigError("--colocated is not supported with --ray: run prefill and decode pools")
    if args.num_prefill < 1 or (args.num_decode < 1 and not args.elastic):
        raise ConfigError(f"--ray needs at least one prefill and one decode worker; got --num-prefill "
                          f"{args.num_prefill} --num-decode {args.num_decode}")
    if args.worker_cpus <= 0:
        raise ConfigError(f"--worker-cpus must be positive, got {args.worker_cpus:g}")
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        raise ConfigError(f"unknown device {args.device!r}; choose auto, cpu, cuda or cuda:N")
    problem = args.ray_address and unreachable(args.ray_address)
    if problem:
        raise ConfigError(problem)
    if args.device.startswith("cuda:"):
        raise ConfigError("with --ray each worker gets its GPU from Ray: use --device cuda (or auto), not cuda:N")
    kv_cache_sizing(args)  # both sizings given: refused here


def worker_gpus(args: argparse.Namespace, role: str) -> float:
    """``--worker-gpus``, or 1 where the alive nodes that carry the role's resource have GPUs."""
    if args.worker_gpus is not None:
        return args.worker_gpus
    if args.device == "cpu":
        return 0.0
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(ROLE_RESOURCES[role])]
    return 1.0 if any(r.get("GPU") for r in nodes) else 0.0


def pool_specs(args: argparse.Namespace, router_address: str) -> list[PoolSpec]:
    specs = []
    for role, target in (("prefill", args.num_prefill), ("decode", None if args.elastic else args.num_decode)):
        gpus = worker_gpus(args, role)
        if args.device.startswith("cuda") and not gpus:
            raise ConfigError(f"--device cuda with --ray: no node carrying {ROLE_RESOURCES[role]} has a GPU "
                              "(or --worker-gpus is 0)")
        device = "cuda" if gpus else "cpu"
        threads = args.prefill_threads if role == "prefill" else args.decode_threads
        env = (("KVFERRY_NUM_THREADS", str(threads)),) if threads else ()  # over worker_env's --threads
        specs.append(PoolSpec(role, (role, *worker_argv(args, router_address, device)), target,
                              args.worker_cpus, gpus, env))
    return specs


def start_ray(args: argparse.Namespace) -> None:
    if args.ray_address:
        ray.init(address=args.ray_address, namespace=NAMESPACE, include_dashboard=False)
        return
    # A local Ray with room for the workers asked for: the roles' resources and enough CPUs.
    decode = args.num_decode
    cpus = max(os.cpu_count() or 1, (args.num_prefill + decode) * args.worker_cpus)
    ray.init(namespace=NAMESPACE, num_cpus=cpus, include_dashboard=False,
             resources={ROLE_RESOURCES["prefill"]: args.num_prefill, ROLE_RESOURCES["decode"]: decode})


def router_address_for_workers(args: argparse.Namespace) -> str:
    host = args.host
    if host in ("0.0.0.0", "::", ""):
        host = ray.util.get_node_ip_address()
    elif host in ("127.0.0.1", "localhost", "::1") and len({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}) > 1:
        logger.warning("the router binds %s, which workers on other nodes cannot reach: use --host 0.0.0.0", host)
    return f"{host}:{args.grpc_port}"


def check_head_node() -> None:
    here = ray.get_runtime_context().get_node_id()
    head = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]]
    if head and head[0] != here:
        logger.warning("kvferry serve --ray runs on a worker node: the router runs here, not on the head node")


def worker_env(args: argparse.Namespace) -> dict[str, str]:
    """What the workers get from this command (Ray starts them from its own environment, not this
    one): every KVFERRY_* setting (the model, the cluster token) and a thread count that matches the
    CPUs they reserve. Secrets go in the environment, never on a command line."""
    env = {k: v for k, v in os.environ.items() if k.startswith("KVFERRY_")}
    if args.cluster_token:
        env[TOKEN_ENV] = args.cluster_token
    env["KVFERRY_NUM_THREADS"] = str(args.threads or max(1, int(args.worker_cpus)))
    return env


def router_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    if args.cluster_token:
        env[TOKEN_ENV] = args.cluster_token
    if args.api_key:
        env[API_KEY_ENV] = args.api_key
    return env


def _deployment_exists() -> bool:
    try:
        ray.get_actor(DEPLOYMENT_NAME, namespace=NAMESPACE)
        return True
    except ValueError:
        return False


def _wait(ref: ray.ObjectRef, stop: threading.Event):
    """``ray.get(ref)``, giving up when ``stop`` is set (Ctrl-C during start-up)."""
    while not ray.wait([ref], timeout=POLL_S)[0]:
        if stop.is_set():
            raise RuntimeError("interrupted")
    return ray.get(ref)


def serve_on_ray(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        check_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    stop = threading.Event()
    force = threading.Event()

    def on_signal(signum, _frame) -> None:
        if stop.is_set():
            force.set()
        stop.set()

    start_ray(args)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    router = Child("router", router_argv(args))
    deployment = None
    code = 0
    try:
        check_head_node()
        router_address = router_address_for_workers(args)
        specs = pool_specs(args, router_address)
        if _deployment_exists():
            raise ConfigError("a kvferry deployment already runs on this Ray cluster (kvferry scale resizes it)")
        router.start(router_env(args))
        control = RouterControl(f"127.0.0.1:{args.grpc_port}" if args.host in ("0.0.0.0", "::") else router_address,
                                token=worker_env(args).get(TOKEN_ENV, ""))
        control.wait_serving(args.startup_timeout)
        control.close()
        deployment = ray.remote(Deployment).options(
            name=DEPLOYMENT_NAME, namespace=NAMESPACE, num_cpus=0, max_concurrency=16,
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
        ).remote(router_address, specs, worker_env(args), args.drain_timeout, args.startup_timeout)
        _wait(deployment.start.remote(), stop)
        state = _wait(deployment.wait_ready.remote(args.startup_timeout), stop)
        url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
        deadline = time.monotonic() + 60
        while not http_ready(url) and time.monotonic() < deadline and not stop.is_set():
            time.sleep(POLL_S)
        counts = {role: sum(1 for w in state["workers"] if w["role"] == role) for role in ("prefill", "decode")}
        elastic = f", following {ROLE_RESOURCES['decode']}" if args.elastic else ""
        print(f"\nkvferry is serving at {url}/v1 (Ray: {counts['prefill']} prefill + {counts['decode']} decode "
              f"workers{elastic}); gRPC Generate at {router_address}\n"
              f"try:\n  {curl_example(url, 'default')}\n"
              f"resize the decode pool with: kvferry scale --decode N --ray-address {ray.get_runtime_context().gcs_address}\n"
              "stop with Ctrl-C\n", flush=True)
        while not stop.wait(POLL_S):
            if not router.alive:
                logger.error("the router exited with code %s: stopping", router.process.returncode)
                code = 1
                break
    except (RuntimeError, ConfigError, ValueError, ray.exceptions.RayError) as exc:
        if not stop.is_set():
            logger.error("%s", exc)
            print(f"error: {exc}", file=sys.stderr, flush=True)
            code = 1
    finally:
        logger.info("stopping: router first (in-flight requests finish), then the workers, then Ray")
        router.terminate()
        if not router.wait(args.shutdown_grace + 10, force):
            router.kill()
        if deployment is not None:
            # Bounded: the actors and placement groups it owns go with it when it is killed anyway.
            done = deployment.shutdown.remote(0 if force.is_set() else WORKER_SHUTDOWN_GRACE_S)
            if not ray.wait([done], timeout=60)[0]:
                logger.warning("the workers did not stop within 60 s: killing them")
            ray.kill(deployment)
        ray.shutdown()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code
