"""KV transfer throughput: gRPC (kvferry's transport) against a raw loopback TCP socket, same bytes.

    python bench/kv_transfer_bench.py                       # 2048-token bf16 KV of SmolLM2-135M (~47 MB)
    python bench/kv_transfer_bench.py --tokens 512 --repeats 5

The receiver runs in a separate process in both cases (prefill and decode workers are processes).
gRPC: the whole path a request's KV takes — the sender's cache blocks copied into ``PushKV`` chunks,
written into the reserved blocks on the receiver (scattered: reversed block order), acknowledgement back. Raw TCP: ``sendall`` of
the same bytes into ``recv_into`` a preallocated buffer, then a one-byte acknowledgement. A third line,
"gRPC bytes only", sends the same bytes in the same messages to a handler that only counts them: the
cost of gRPC itself, so the gap between it and the KV transfer is kvferry's own overhead. TCP and gRPC
transfers alternate (both receivers stay up) so that other load on the machine hits both alike; each
figure is the median of ``--repeats`` transfers after one warm-up round. Prints both and their ratio (target >= 0.6).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import struct
import sys
import time
from concurrent import futures

import torch

from kvferry.engine.config import DTYPES, ModelConfig
from kvferry.transport.base import FirstToken, KVFingerprint, KVTarget, TransferState, gather_blocks
from kvferry.transport.grpc_transport import DEFAULT_CHUNK_BYTES, DEFAULT_WINDOW_BYTES

SINK_SERVICE = "kvferry.bench.Sink"  # raw bytes messages, no protobuf, no KV writes

# SmolLM2-135M-Instruct, the default model.
DEFAULT_SHAPE = dict(num_layers=30, num_kv_heads=3, head_dim=64)


def model_config(args) -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=args.num_layers, num_heads=9, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
        rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        name="bench",
    )


def num_blocks(args) -> int:
    return -(-args.tokens // args.block_size)


def kv_caches(args, fill: float | None) -> list[torch.Tensor]:
    shape = (2, num_blocks(args) + 8, args.block_size, args.num_kv_heads, args.head_dim)
    dtype = DTYPES[args.dtype]
    if fill is not None:
        return [torch.full(shape, fill, dtype=dtype) for _ in range(args.num_layers)]
    return [torch.randn(shape).to(dtype) for _ in range(args.num_layers)]


# ---- receivers (child processes) ---------------------------------------------------------------------
def grpc_receiver_main(args, port_queue, request_queue) -> None:
    import grpc

    from kvferry.transport.grpc_transport import add_kv_transfer_service, channel_options
    from kvferry.transport.receiver import KVReceiver

    torch.set_num_threads(1)
    fp = KVFingerprint.from_model(model_config(args), DTYPES[args.dtype], args.block_size)
    receiver = KVReceiver(kv_caches(args, 0.0), fp, receiver_id="bench-decode")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=channel_options(args.chunk_bytes, args.window_bytes))
    add_kv_transfer_service(server, receiver)

    def sink(request_iterator, context) -> bytes:  # gRPC alone: count the bytes, store nothing
        return str(sum(len(m) for m in request_iterator)).encode()

    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SINK_SERVICE, {"Push": grpc.stream_unary_rpc_method_handler(sink)}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_queue.put((port, receiver.instance_id))
    blocks = list(range(num_blocks(args)))[::-1]  # reversed: a real scatter, not one contiguous copy
    for _ in range(args.repeats + 2):  # bounded: one reservation per transfer the parent makes
        request_id = request_queue.get(timeout=120)
        if request_id is None:
            break
        receiver.expect(request_id, blocks)
        port_queue.put("ready")
    server.stop(grace=1.0)


def tcp_receiver_main(nbytes: int, port_queue, repeats: int) -> None:
    buf = bytearray(nbytes)
    view = memoryview(buf)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port_queue.put(listener.getsockname()[1])
        listener.settimeout(60)
        conn, _ = listener.accept()
    with conn:
        conn.settimeout(60)
        for _ in range(repeats + 1):
            (size,) = struct.unpack("!Q", conn.recv(8, socket.MSG_WAITALL))
            got = 0
            while got < size:
                n = conn.recv_into(view[got:size])
                if n == 0:
                    return
                got += n
            conn.sendall(b"k")


# ---- senders (this process) --------------------------------------------------------------------------
class GrpcTrial:
    def __init__(self, args, src: list[torch.Tensor], ctx):
        from kvferry.transport.grpc_transport import GrpcKVSender

        self.args, self.src = args, src
        self.port_queue, self.request_queue = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(
            target=grpc_receiver_main, args=(args, self.port_queue, self.request_queue), daemon=True
        )
        self.proc.start()
        port, instance_id = self.port_queue.get(timeout=60)
        fp = KVFingerprint.from_model(model_config(args), DTYPES[args.dtype], args.block_size)
        self.sender = GrpcKVSender(fp, chunk_bytes=args.chunk_bytes, window_bytes=args.window_bytes)
        self.target = KVTarget(f"127.0.0.1:{port}", instance_id, timeout_s=60.0)
        self.src_blocks = list(range(num_blocks(args)))
        self.count = 0

    def run(self) -> float:
        request_id = f"bench-{self.count}"
        self.count += 1
        self.request_queue.put(request_id)
        assert self.port_queue.get(timeout=60) == "ready"
        t0 = time.perf_counter()
        handle = self.sender.open(self.target, request_id, len(self.src_blocks))
        for layer_idx, layer in enumerate(self.src):
            handle.send_layer(layer_idx, layer, self.src_blocks)
        handle.finish(FirstToken(0))
        state = handle.wait(60.0)
        elapsed = time.perf_counter() - t0
        if state is not TransferState.DONE:
            raise RuntimeError(f"gRPC transfer failed: {handle.error}")
        return elapsed

    def run_sink(self, chunks: list[bytes]) -> float:
        """The same bytes in the same number of messages to a receiver that only counts them."""
        push = self.sender.channel(self.target.address).stream_unary(f"/{SINK_SERVICE}/Push")
        t0 = time.perf_counter()
        push(iter(chunks), timeout=60.0)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.sender.close()
        self.request_queue.put(None)
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()


class TcpTrial:
    def __init__(self, args, payload: bytes, ctx):
        self.payload = payload
        port_queue = ctx.Queue()
        self.proc = ctx.Process(target=tcp_receiver_main, args=(len(payload), port_queue, args.repeats), daemon=True)
        self.proc.start()
        self.conn = socket.create_connection(("127.0.0.1", port_queue.get(timeout=60)), timeout=60)

    def run(self) -> float:
        t0 = time.perf_counter()
        self.conn.sendall(struct.pack("!Q", len(self.payload)))
        self.conn.sendall(self.payload)
        if self.conn.recv(1) != b"k":
            raise RuntimeError("raw TCP receiver closed early")
        return time.perf_counter() - t0

    def close(self) -> None:
        self.conn.close()
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--num-layers", type=int, default=DEFAULT_SHAPE["num_layers"])
    parser.add_argument("--num-kv-heads", type=int, default=DEFAULT_SHAPE["num_kv_heads"])
    parser.add_argument("--head-dim", type=int, default=DEFAULT_SHAPE["head_dim"])
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES)
    parser.add_argument("--window-bytes", type=int, default=DEFAULT_WINDOW_BYTES, help="HTTP/2 flow-control window")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    src = kv_caches(args, None)
    blocks = list(range(num_blocks(args)))
    payload = b"".join(gather_blocks(layer, blocks).view(torch.uint8).numpy().tobytes() for layer in src)
    nbytes = len(payload)
    print(
        f"payload: {args.tokens} tokens x {args.num_layers} layers, {args.dtype}, block {args.block_size}, "
        f"{args.num_kv_heads} kv heads x {args.head_dim} = {nbytes / 1e6:.1f} MB; "
        f"gRPC chunks of {args.chunk_bytes >> 10} KiB, window {args.window_bytes >> 20} MiB; median of {args.repeats}"
    )
    # Both receivers stay up and the trials alternate, so load from other processes hits both alike.
    ctx = mp.get_context("spawn")
    tcp_trial, grpc_trial = TcpTrial(args, payload, ctx), GrpcTrial(args, src, ctx)
    step = args.chunk_bytes
    chunks = [payload[i : i + step] for i in range(0, nbytes, step)]
    tcp_times, grpc_times, sink_times = [], [], []
    try:
        for i in range(args.repeats + 1):  # the first round warms up (connections, allocations)
            t_tcp, t_grpc, t_sink = tcp_trial.run(), grpc_trial.run(), grpc_trial.run_sink(chunks)
            if i:
                tcp_times.append(t_tcp)
                grpc_times.append(t_grpc)
                sink_times.append(t_sink)
    finally:
        tcp_trial.close()
        grpc_trial.close()
    tcp, grpc_t, sink = (statistics.median(t) for t in (tcp_times, grpc_times, sink_times))
    tcp_gbps, grpc_gbps = nbytes / tcp / 1e9, nbytes / grpc_t / 1e9
    print(f"raw TCP loopback : {tcp * 1e3:8.2f} ms  {tcp_gbps:6.2f} GB/s")
    print(f"gRPC KV transfer : {grpc_t * 1e3:8.2f} ms  {grpc_gbps:6.2f} GB/s  (cache blocks -> PushKV -> cache blocks, ack)")
    print(f"gRPC bytes only  : {sink * 1e3:8.2f} ms  {nbytes / sink / 1e9:6.2f} GB/s  "
          f"(same messages, receiver only counts them: gRPC's own ceiling here)")
    ratio = grpc_gbps / tcp_gbps
    print(f"ratio gRPC / raw TCP: {ratio:.2f}  (target >= 0.60: {'met' if ratio >= 0.6 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
