"""A KV peer in a process of its own, for the kill -9 tests (run as a script).

    python kv_peer_process.py receiver FINGERPRINT_JSON NUM_BLOCKS REQUEST:BLOCKS[,BLOCKS...] ...
        a KVReceiver on zeroed caches behind a gRPC server with every data plane; prints
        {"address", "instance_id"} and serves until killed.
    python kv_peer_process.py sender FINGERPRINT_JSON TRANSPORT ADDRESS INSTANCE_ID REQUEST BLOCKS NUM_LAYERS
        sends NUM_LAYERS layers of random KV for REQUEST, prints "sent" once they left, then stops
        itself (SIGSTOP) mid-transfer, for the test to kill.
    python kv_peer_process.py close-and-exit TRANSPORT
        a receiver and a sender in this process, one transfer between them, both closed, then a normal
        exit: its status says whether tearing down left the process able to exit cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch


def caches(fp, num_blocks: int, fill: float | None):
    shape = (2, num_blocks, fp.block_size, fp.num_kv_heads, fp.head_dim)
    dtype = getattr(torch, fp.dtype)
    return [torch.zeros(shape, dtype=dtype) if fill is not None else torch.randn(shape).to(dtype)
            for _ in range(fp.num_layers)]


def receiver(fp, num_blocks: int, expectations: list[str]) -> None:
    from concurrent import futures

    import grpc

    from kvferry.transport.grpc_transport import add_kv_transfer_service, channel_options
    from kvferry.transport.negotiation import start_receiver_transports
    from kvferry.transport.receiver import KVReceiver

    rx = KVReceiver(caches(fp, num_blocks, 0.0), fp, receiver_id="decode-peer")
    for item in expectations:
        request_id, blocks = item.split(":")
        rx.expect(request_id, [int(b) for b in blocks.split(",")])
    start_receiver_transports(rx, "auto")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=channel_options(64 << 20))
    add_kv_transfer_service(server, rx)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(json.dumps({"address": f"127.0.0.1:{port}", "instance_id": rx.instance_id}), flush=True)
    while True:
        time.sleep(1)


def sender(fp, transport: str, address: str, instance_id: str, request_id: str, blocks: str, num_layers: int) -> None:
    from kvferry.transport.base import KVTarget
    from kvferry.transport.negotiation import NegotiatedKVSender

    block_ids = [int(b) for b in blocks.split(",")]
    src = caches(fp, max(block_ids) + 1, None)
    if transport == "shm+memfd":  # the cache in a memfd, as an engine's: shm's one copy
        from kvferry.engine.kv_memory import shared_zeros

        src, transport = shared_zeros([tuple(c.shape) for c in src], src[0].dtype), "shm"
        for layer in src:
            layer.copy_(torch.randn(layer.shape).to(layer.dtype))
    tx = NegotiatedKVSender(fp, sender_id="prefill-peer", kv_transport=transport, chunk_bytes=4096)
    handle = tx.open(KVTarget(address, instance_id, timeout_s=60.0), request_id, len(block_ids))
    for layer_idx in range(num_layers):
        handle.send_layer(layer_idx, src[layer_idx], block_ids)
    expected = num_layers * fp.layer_nbytes(len(block_ids))
    end = time.monotonic() + 30
    while handle.bytes_sent < expected and time.monotonic() < end:
        time.sleep(0.01)
    print("sent" if handle.bytes_sent >= expected else f"stuck: {handle.error}", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)  # mid-transfer: no more layers, no trailer


def close_and_exit(transport: str) -> None:
    from kv_helpers import ReceiverServer, kv_caches, sender

    from kvferry.transport.base import FirstToken, KVTarget, TransferState

    server, tx = ReceiverServer(transport), sender(transport)
    server.receiver.expect("one", [1])
    handle = tx.send(KVTarget(server.address, server.receiver.instance_id, 30.0), "one", kv_caches(), [0], FirstToken(1))
    assert handle.wait(30.0) is TransferState.DONE, handle.error
    tx.close()
    server.close()
    print("closed", flush=True)


def main(argv: list[str]) -> None:
    from kvferry.transport.base import KVFingerprint

    if argv[0] == "close-and-exit":
        return close_and_exit(argv[1])
    role, fp = argv[0], KVFingerprint(**json.loads(argv[1]))
    if role == "receiver":
        receiver(fp, int(argv[2]), argv[3:])
    else:
        sender(fp, argv[2], argv[3], argv[4], argv[5], argv[6], int(argv[7]))


if __name__ == "__main__":
    main(sys.argv[1:])
