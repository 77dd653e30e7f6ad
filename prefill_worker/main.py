"""`kvferry prefill --router ADDR`: a prefill worker process (see kvferry/worker_cli.py for its lifecycle)."""

from __future__ import annotations

import argparse

from kvferry.worker_cli import add_engine_arguments, engine_config_from_args, serve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--transfer-timeout", type=float, default=30.0,
                        help="deadline of one request's KV transfer (handshake to acknowledgement)")
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20, help="KV bytes per gRPC message")


def run(args: argparse.Namespace) -> int:
    def start():
        from kvferry.engine.engine import LLMEngine
        from kvferry.prefill_worker.service import create_prefill_server
        from kvferry.prefill_worker.worker import PrefillWorker
        from kvferry.transport.base import KVFingerprint
        from kvferry.transport.grpc_transport import GrpcKVSender

        engine = LLMEngine(engine_config_from_args(args), role="prefill")
        if not args.no_warm_up:
            engine.warm_up()  # seeds the step-time model the scheduler plans with
        fingerprint = KVFingerprint.from_model(engine.model_config, engine.dtype, engine.config.cache.block_size)
        sender = GrpcKVSender(fingerprint, sender_id=args.name or "prefill", chunk_bytes=args.chunk_bytes)
        worker = PrefillWorker(engine, sender, worker_id=args.name or "prefill")
        server, health, port = create_prefill_server(worker, args.host, args.port, args.transfer_timeout)
        worker.start()
        server.start()
        return worker, server, health, port

    return serve(args, "prefill", start)
