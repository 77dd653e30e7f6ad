"""The flags of `kvferry serve --ray` and the names they share with the cluster files; Ray-free, so
`kvferry serve --help` does not import Ray."""

from __future__ import annotations

import argparse
import socket

PREFILL_RESOURCE = "kvferry_prefill"  # a node's custom resources say which workers it takes
DECODE_RESOURCE = "kvferry_decode"
ROLE_RESOURCES = {"prefill": PREFILL_RESOURCE, "decode": DECODE_RESOURCE}
NAMESPACE = "kvferry"
DEPLOYMENT_NAME = "kvferry-deployment"  # the named actor `kvferry scale` finds


def pool_size(value: str) -> int | None:
    """A pool's target: a count, or "auto" (None): one worker per unit of the role's resource."""
    if value == "auto":
        return None
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of workers or auto, got {value!r}") from None
    if count < 0:
        raise argparse.ArgumentTypeError(f"a pool cannot have {count} workers")
    return count


def unreachable(address: str, timeout_s: float = 3.0) -> str | None:
    """Why a ``host:port`` Ray address cannot be reached (None if it can, or for "auto"): ray.init
    itself retries an unreachable one for minutes."""
    host, _, port = address.rpartition(":")
    if address == "auto" or address.startswith("ray://") or not host or not port.isdigit():
        return None
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"no Ray cluster answers at {address}: {exc.strerror or exc}"


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray", action="store_true",
                        help="run the cluster on Ray: the router here, prefill and decode workers as Ray actors on "
                             f"the nodes that carry the {PREFILL_RESOURCE} / {DECODE_RESOURCE} resources "
                             "(docs/RAY.md); --num-prefill / --num-decode say how many")
    parser.add_argument("--ray-address", default=None,
                        help="with --ray: the Ray cluster to join (host:port, or auto for the one this node "
                             "belongs to); default: start a local Ray with room for the workers")
    parser.add_argument("--elastic", action="store_true",
                        help=f"with --ray: one decode worker per unit of {DECODE_RESOURCE} in the cluster, "
                             "following nodes as they join and leave, instead of --num-decode")
    parser.add_argument("--worker-cpus", type=float, default=1.0,
                        help="with --ray: CPUs each worker reserves, and its torch threads (default 1)")
    parser.add_argument("--worker-gpus", type=float, default=None,
                        help="with --ray: GPUs each worker reserves (default: 1 where the nodes carrying its "
                             "role's resource have GPUs, else 0); workers with a GPU run on --device cuda")
    parser.add_argument("--worker-args", default="",
                        help="with --ray: extra flags for every worker's command line, as one string "
                             "(e.g. \"--max-num-seqs 32 --no-warm-up\")")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="with --ray: seconds a worker taken out of the pool gets to finish its streams "
                             "before it is stopped (default 120)")
