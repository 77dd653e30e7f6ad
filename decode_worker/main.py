"""`kvferry decode --router ADDR`: a decode worker process (see worker_common/process.py for its lifecycle).

With ``--colocated`` it registers as a colocated worker: the router sends it whole requests
(``Reserve(prefill_locally=true)``) and this engine does both phases: the baseline to compare against.
"""

from __future__ import annotations

import argparse

from kvferry.common.worker import WorkerRole
from kvferry.worker_common.process import (
    add_engine_arguments,
    add_kv_checksum_argument,
    load_engine,
    serve,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--lease", type=float, default=30.0,
                        help="seconds a reservation waits for its KV (and a stream for its subscriber)")
    parser.add_argument("--colocated", action="store_true", help="prefill locally too (register as colocated)")
    add_kv_checksum_argument(parser)


def run(args: argparse.Namespace) -> int:
    def start():
        from kvferry.decode_worker.service import create_decode_server
        from kvferry.decode_worker.worker import DecodeWorker, DecodeWorkerConfig
        from kvferry.proto.cluster_security import security_from_args
        from kvferry.transport.metrics import start_metrics_server
        from kvferry.transport.negotiation import start_receiver_transports

        engine = load_engine(args, WorkerRole.DECODE)
        worker = DecodeWorker(engine, DecodeWorkerConfig(lease_s=args.lease), worker_id=args.name or "decode")
        start_receiver_transports(worker.receiver, args.kv_transport, args.host, args.advertise_host,
                                  kv_checksum=args.kv_checksum)
        if args.metrics_port is not None:
            start_metrics_server(args.metrics_port, args.host, worker.receiver.pair_stats, "receiver")
        server, health, port = create_decode_server(worker, args.host, args.port, args.advertise_host,
                                                    security_from_args(args))
        worker.start()
        server.start()
        return worker, server, health, port

    return serve(args, WorkerRole.COLOCATED if args.colocated else WorkerRole.DECODE, start)
