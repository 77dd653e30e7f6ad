"""`kvferry status --router HOST:PORT`: the cluster as the router sees it, from its ``ListWorkers`` RPC —
the model and KV layout every worker agreed on, then one line per worker: its role, address, device, KV cache
in use, running and waiting requests against its batch limit, requests routed to it, the age of its
last heartbeat, and whether it is draining or has a wedged engine. ``--json`` prints the same as JSON.

The call carries the cluster token and mutual TLS like any router client (``--cluster-token`` or
``$KVFERRY_CLUSTER_TOKEN``). Exit status: 0 with the table, 1 if the router cannot be reached or
refuses the call (the reason on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import grpc

from kvferry.common.errors import ConfigError
from kvferry.common.worker import WorkerRole
from kvferry.proto import router_pb2, router_pb2_grpc
from kvferry.proto.cluster_security import TOKEN_ENV, add_security_arguments, security_from_args
from kvferry.proto.convert import role_from_proto
from kvferry.router.registry import RegistryConfig

# An engine this long in one step is reported wedged, as the router judges it (it stops using it).
WEDGED_MS = RegistryConfig.stalled_after_s * 1000


@dataclass(frozen=True)
class WorkerStatus:
    name: str
    role: str
    address: str
    device: str  # what its engine runs on ("cpu", "cuda:0 (NVIDIA H200)"); "" if the worker did not say
    kv_blocks_used: int
    kv_blocks_total: int
    running: int
    waiting: int
    max_running: int  # 0: unknown
    routed_total: int
    heartbeat_age_s: float
    state: str  # serving | draining | wedged

    @property
    def kv_used_fraction(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


def _role_name(value: int) -> str:
    try:
        return str(role_from_proto(value))
    except ValueError:  # a newer router's role
        return "unknown"


def worker_status(info: router_pb2.WorkerInfo) -> WorkerStatus:
    cap = info.capacity
    state = "draining" if info.draining else "wedged" if cap.engine_busy_ms > WEDGED_MS else "serving"
    return WorkerStatus(
        name=info.worker_name or info.worker_id, role=_role_name(info.role), address=info.address, device=info.device,
        kv_blocks_used=cap.total_kv_blocks - cap.free_kv_blocks, kv_blocks_total=cap.total_kv_blocks,
        running=cap.running_requests, waiting=cap.waiting_requests, max_running=cap.max_running_requests,
        routed_total=info.requests_routed_total, heartbeat_age_s=round(info.seconds_since_heartbeat, 1), state=state,
    )


def fetch(address: str, args: argparse.Namespace) -> router_pb2.ListWorkersResponse:
    with security_from_args(args).channel(address) as channel:
        return router_pb2_grpc.RouterStub(channel).ListWorkers(router_pb2.ListWorkersRequest(), timeout=args.timeout)


def model_line(fp: router_pb2.ModelFingerprint) -> str:
    if not fp.model_name:
        return "model: none yet (no worker has registered)"
    return (f"model: {fp.model_name} ({fp.dtype} KV, {fp.block_size}-token blocks, {fp.num_layers} layers, "
            f"context {fp.max_model_len})")


def table(workers: list[WorkerStatus]) -> str:
    header = ("NAME", "ROLE", "ADDRESS", "DEVICE", "KV USED", "RUNNING", "WAITING", "ROUTED", "HEARTBEAT", "STATE")
    rows = [header]
    for w in sorted(workers, key=lambda w: (w.role, w.name)):
        limit = f"/{w.max_running}" if w.max_running else ""
        rows.append((w.name, w.role, w.address, w.device or "-", f"{w.kv_blocks_used}/{w.kv_blocks_total} ({w.kv_used_fraction:.0%})",
                     f"{w.running}{limit}", str(w.waiting), str(w.routed_total), f"{w.heartbeat_age_s:g} s ago",
                     w.state))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(r, widths)).rstrip() for r in rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--router", default="127.0.0.1:50051",
                        help="the router's gRPC address host:port (default 127.0.0.1:50051)")
    parser.add_argument("--json", action="store_true", help="print the model and the workers as JSON")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the router (default 5)")
    add_security_arguments(parser)  # the cluster token and mutual TLS, as the workers use them


def run(args: argparse.Namespace) -> int:
    try:
        answer = fetch(args.router, args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        hint = f" (--cluster-token or ${TOKEN_ENV})" if exc.code() == grpc.StatusCode.UNAUTHENTICATED else ""
        print(f"error: router {args.router}: {exc.code().name}: {exc.details()}{hint}", file=sys.stderr)
        return 1
    workers = [worker_status(w) for w in answer.workers]
    if args.json:
        fp = answer.fingerprint
        model = {"name": fp.model_name, "dtype": fp.dtype, "block_size": fp.block_size,
                 "max_model_len": fp.max_model_len} if fp.model_name else None
        print(json.dumps({"router": args.router, "model": model, "workers": [asdict(w) for w in workers]}, indent=2))
        return 0
    counts = {role: sum(w.role == role for w in workers) for role in WorkerRole}
    print(f"router {args.router}: {', '.join(f'{n} {role}' for role, n in counts.items())} worker(s)")
    print(model_line(answer.fingerprint))
    if workers:
        print(table(workers))
    return 0
