"""`kvferry prefill --router ADDR`: a prefill worker process (see worker_common/process.py for its lifecycle)."""

from __future__ import annotations

import argparse

from kvferry.common.worker import WorkerRole
from kvferry.worker_common.process import add_engine_arguments, load_engine, serve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--transfer-timeout", type=float, default=30.0,
                        help="deadline of one request's KV transfer (handshake to acknowledgement)")
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20, help="KV bytes per message (gRPC) or frame (tcp, shm)")


def run(args: argparse.Namespace) -> int:
    def start():
        from kvferry.prefill_worker.service import create_prefill_server
        from kvferry.prefill_worker.worker import PrefillWorker
        from kvferry.proto.cluster_security import security_from_args
        from kvferry.transport.metrics import start_metrics_server
        from kvferry.transport.negotiation import NegotiatedKVSender

        engine = load_engine(args, WorkerRole.PREFILL)
        security = security_from_args(args)  # the KV handshakes and pushes carry the token too
        sender = NegotiatedKVSender(
            engine.fingerprint, sender_id=args.name or "prefill", kv_transport=args.kv_transport, chunk_bytes=args.chunk_bytes,
            security=security, kv_device=str(engine.config.device),
        )
        if args.metrics_port is not None:
            start_metrics_server(args.metrics_port, args.host, sender.stats, "sender")
        worker = PrefillWorker(engine, sender, worker_id=args.name or "prefill")
        server, health, port = create_prefill_server(worker, args.host, args.port, args.transfer_timeout, security)
        worker.start()
        server.start()
        return worker, server, health, port

    return serve(args, WorkerRole.PREFILL, start)
