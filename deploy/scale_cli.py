"""`kvferry scale --decode N|auto [--prefill N|auto] [--drain-node NODE] [--ray-address ADDR]`: resize the
pools of a running `kvferry serve --ray` deployment, waiting until the new size serves. Taking workers
out drains them (the router places nothing new on them, their streams finish, then they exit); auto
makes a pool follow its resource (one worker per unit of ``kvferry_<role>`` in the cluster);
``--drain-node`` takes one node's workers out, so that the node can leave. Without any of these it
prints the deployment's workers."""

from __future__ import annotations

import argparse
import json
import sys

from kvferry.deploy.ray_args import DEPLOYMENT_NAME, NAMESPACE, pool_size, unreachable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decode", type=pool_size, default=argparse.SUPPRESS,
                        help="decode workers wanted, or auto: one per unit of kvferry_decode in the cluster")
    parser.add_argument("--prefill", type=pool_size, default=argparse.SUPPRESS,
                        help="prefill workers wanted, or auto: one per unit of kvferry_prefill in the cluster")
    parser.add_argument("--drain-node", default=None,
                        help="take the workers on this node (a Ray node id, or an IP: every node there) out of "
                             "their pools, draining them, and place no new ones there; then stop Ray on it")
    parser.add_argument("--ray-address", default="auto",
                        help="the Ray cluster the deployment runs on (default auto: the one this node belongs to)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for the pools to reach their size (drains included; default 300)")
    parser.add_argument("--json", action="store_true", help="print the deployment's state as JSON")


def run(args: argparse.Namespace) -> int:
    import ray

    problem = unreachable(args.ray_address)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        ray.init(address=args.ray_address, namespace=NAMESPACE, logging_level="WARNING", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        print(f"error: no Ray cluster at {args.ray_address}: {exc}", file=sys.stderr)
        return 2
    try:
        try:
            deployment = ray.get_actor(DEPLOYMENT_NAME, namespace=NAMESPACE)
        except ValueError:
            print(f"error: no kvferry deployment on the Ray cluster at {args.ray_address} "
                  "(start one with kvferry serve --ray)", file=sys.stderr)
            return 2
        wanted = {role: getattr(args, role) for role in ("prefill", "decode") if hasattr(args, role)}
        settled = True
        if args.drain_node:
            try:
                state = ray.get(deployment.drain_node.remote(args.drain_node, args.timeout))
            except ray.exceptions.RayTaskError as exc:
                print(f"error: {exc.cause}", file=sys.stderr)
                return 2
            settled = state["settled"]
        for role, target in wanted.items():
            state = ray.get(deployment.scale.remote(role, target, args.timeout))
            settled = settled and state["settled"]
        state = ray.get(deployment.state.remote())
        summary = ray.get(deployment.summary.remote())
    finally:
        ray.shutdown()
    if args.json:
        print(json.dumps(state, indent=2))
    else:
        for w in state["workers"]:
            print(f"{w['name']:<12} {w['status']:<9} {w['address'] or '-':<22} node {w['node_id'] or '-'}")
        print(summary)
    if not settled:
        print(f"error: not there after {args.timeout:g} s: {summary}", file=sys.stderr)
        return 1
    return 0
