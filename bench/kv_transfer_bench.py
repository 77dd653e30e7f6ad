"""KV transfer throughput, every data plane against the physical path it rides on, in one run.

    python bench/kv_transfer_bench.py                  # 2048-token bf16 KV of SmolLM2-135M (~47 MB)
    python bench/kv_transfer_bench.py --tokens 512 --repeats 5
    python bench/kv_transfer_bench.py --quick          # tiny sizes: checks that it runs, times nothing useful

The receiver runs in a separate process (prefill and decode workers are processes): a ``KVReceiver`` with
every data plane started, behind a gRPC server. Each kvferry line is the whole path a request's KV takes
with ``--kv-transport`` forced to it: the sender's cache blocks -> the data plane -> written into the
reserved blocks on the receiver (scattered: reversed block order) -> checksums verified ->
acknowledgement. Baselines, same bytes: **memcpy** (one ``copy_`` of the packed payload into a
preallocated buffer, one thread) for shm; a **raw TCP** loopback socket (``sendall`` into ``recv_into``
a preallocated buffer, then a one-byte ack) for tcp, gloo and grpc;
"gRPC bytes only" sends the same bytes in the same messages to a handler that only counts them (gRPC's
own ceiling). The trials alternate (all receivers stay up) so that other load on the machine hits all
alike; each figure is the median of ``--repeats`` transfers after one warm-up round. Prints the ratios
against the targets: shm >= 0.5x memcpy, tcp >= 0.8x raw TCP, gloo >= 0.6x raw TCP; grpc >= 0.6x.
Prints the CPU model and its flags first (the figures depend on the machine).

The sender's cache is allocated as an engine's (``allocate_kv_caches``: a memfd on Linux), so shm takes
its one-copy path (the receiver copies the rows straight out of the sender's cache); "shm-slots" forces
shm's fallback (rows -> a slot -> the blocks: two copies) on the same cache for comparison.
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
from kvferry.engine.model import allocate_kv_caches
from kvferry.transport.base import FirstToken, KVFingerprint, KVTarget, TransferState, gather_blocks
from kvferry.transport.grpc_transport import DEFAULT_CHUNK_BYTES, DEFAULT_WINDOW_BYTES
from kvferry.transport.negotiation import KV_CHECKSUM_CHOICES
from kvferry.transport.shm_transport import ShmSenderPlane

# kvferry's data planes measured here (nccl needs two GPUs); shm-slots: shm's fallback, forced
TRANSPORTS = ("shm", "shm-slots", "tcp", "gloo", "grpc")
TARGETS = {"shm": ("memcpy", 0.5), "shm-slots": ("memcpy", 0.5), "tcp": ("raw TCP", 0.8), "gloo": ("raw TCP", 0.6), "grpc": ("raw TCP", 0.6)}

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
    # The sender's cache as an engine allocates it (a memfd on Linux: shm's one copy reads it in place).
    caches = allocate_kv_caches(model_config(args), shape[1], args.block_size, dtype)
    for layer in caches:
        layer.copy_(torch.randn(shape).to(dtype))
    return caches


# ---- receivers (child processes) ---------------------------------------------------------------------
def grpc_receiver_main(args, port_queue, request_queue) -> None:
    import grpc

    from kvferry.transport.grpc_transport import add_kv_transfer_service, channel_options
    from kvferry.transport.negotiation import start_receiver_transports
    from kvferry.transport.receiver import KVReceiver

    torch.set_num_threads(1)
    fp = KVFingerprint.from_model(model_config(args), DTYPES[args.dtype], args.block_size)
    receiver = KVReceiver(kv_caches(args, 0.0), fp, receiver_id="bench-decode")
    start_receiver_transports(receiver, "auto", kv_checksum=args.kv_checksum)
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
    for _ in range((args.repeats + 1) * len(TRANSPORTS) + 1):  # bounded: one reservation per transfer
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
class KVTrials:
    """kvferry's data planes, one sender each (``--kv-transport`` forced), into one receiver process."""

    def __init__(self, args, src: list[torch.Tensor], ctx):
        from kvferry.transport.negotiation import NegotiatedKVSender

        self.args, self.src = args, src
        self.port_queue, self.request_queue = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(
            target=grpc_receiver_main, args=(args, self.port_queue, self.request_queue), daemon=True
        )
        self.proc.start()
        port, instance_id = self.port_queue.get(timeout=60)
        fp = KVFingerprint.from_model(model_config(args), DTYPES[args.dtype], args.block_size)
        self.senders = {
            name: NegotiatedKVSender(
                fp, sender_id="bench-prefill", kv_transport=name.removesuffix("-slots"), chunk_bytes=args.chunk_bytes
            )
            for name in args.transports
        }
        if "shm-slots" in self.senders:  # the slots even though the cache is shareable
            self.senders["shm-slots"].planes["shm"] = ShmSenderPlane(args.chunk_bytes, one_copy=False)
        self.target = KVTarget(f"127.0.0.1:{port}", instance_id, timeout_s=60.0)
        self.src_blocks = list(range(num_blocks(args)))
        self.count = 0

    def run(self, transport: str) -> float:
        request_id = f"bench-{self.count}"
        self.count += 1
        self.request_queue.put(request_id)
        assert self.port_queue.get(timeout=60) == "ready"
        t0 = time.perf_counter()
        handle = self.senders[transport].open(self.target, request_id, len(self.src_blocks))
        for layer_idx, layer in enumerate(self.src):
            handle.send_layer(layer_idx, layer, self.src_blocks)
        handle.finish(FirstToken(0))
        state = handle.wait(60.0)
        elapsed = time.perf_counter() - t0
        if state is not TransferState.DONE:
            raise RuntimeError(f"{transport} transfer failed: {handle.error}")
        if handle.transport != transport.removesuffix("-slots"):
            raise RuntimeError(f"asked for {transport}, got {handle.transport}")
        return elapsed

    def run_sink(self, chunks: list[bytes]) -> float:
        """The same bytes in the same number of messages to a receiver that only counts them."""
        push = self.senders["grpc"].grpc.channel(self.target.address).stream_unary(f"/{SINK_SERVICE}/Push")
        t0 = time.perf_counter()
        push(iter(chunks), timeout=60.0)
        return time.perf_counter() - t0

    def close(self) -> None:
        for sender in self.senders.values():
            sender.close()
        self.request_queue.put(None)
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()


def memcpy_trial(payload: torch.Tensor, dst: torch.Tensor) -> float:
    t0 = time.perf_counter()
    dst.copy_(payload)
    return time.perf_counter() - t0


def cpu_description() -> str:
    """Model name and the flags that pick kvferry's kernels (lscpu's, from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return "unknown CPU"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "sse4_2") if f in flags]
    import os

    return f"{fields.get('model name', 'unknown CPU')}, {os.cpu_count()} cores, flags: {' '.join(shown)}"


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
    parser.add_argument("--transports", default=",".join(TRANSPORTS), type=lambda s: tuple(s.split(",")),
                        help=f"comma-separated subset of {','.join(TRANSPORTS)}")
    parser.add_argument("--kv-checksum", default="auto", choices=KV_CHECKSUM_CHOICES,
                        help="the receiver's setting: always verifies shm too (auto: every plane but shm)")
    parser.add_argument("--quick", action="store_true", help="64 tokens, 4 layers, 2 repeats: a smoke run")
    args = parser.parse_args(argv)
    if unknown := set(args.transports) - set(TRANSPORTS):
        parser.error(f"--transports: unknown {', '.join(sorted(unknown))}")
    if args.quick:
        args.tokens, args.num_layers, args.repeats = 64, 4, 2
    torch.set_num_threads(1)

    src = kv_caches(args, None)
    blocks = list(range(num_blocks(args)))
    packed = torch.cat([gather_blocks(layer, blocks).view(torch.uint8).reshape(-1) for layer in src])
    payload = packed.numpy().tobytes()
    nbytes = len(payload)
    print(f"machine: {cpu_description()}")
    print(
        f"payload: {args.tokens} tokens x {args.num_layers} layers, {args.dtype}, block {args.block_size}, "
        f"{args.num_kv_heads} kv heads x {args.head_dim} = {nbytes / 1e6:.1f} MB; "
        f"chunks of {args.chunk_bytes >> 10} KiB, gRPC window {args.window_bytes >> 20} MiB; median of {args.repeats}"
    )
    # Every receiver stays up and the trials alternate, so load from other processes hits all alike.
    ctx = mp.get_context("spawn")
    tcp_trial, kv_trials = TcpTrial(args, payload, ctx), KVTrials(args, src, ctx)
    step = args.chunk_bytes
    chunks = [payload[i : i + step] for i in range(0, nbytes, step)]
    dst = torch.empty_like(packed)
    sink = ("gRPC bytes only",) if "grpc" in args.transports else ()
    times: dict[str, list[float]] = {name: [] for name in ("memcpy", "raw TCP", *sink, *args.transports)}
    try:
        for i in range(args.repeats + 1):  # the first round warms up (connections, allocations, page faults)
            round_times = {"memcpy": memcpy_trial(packed, dst), "raw TCP": tcp_trial.run()}
            for name in args.transports:
                round_times[name] = kv_trials.run(name)
            if "grpc" in args.transports:
                round_times["gRPC bytes only"] = kv_trials.run_sink(chunks)
            if i:
                for name, t in round_times.items():
                    times[name].append(t)
    finally:
        tcp_trial.close()
        kv_trials.close()
    median = {name: statistics.median(t) for name, t in times.items()}
    notes = {
        "memcpy": "one copy_ of the packed bytes, one thread",
        "raw TCP": "loopback sendall -> recv_into, one-byte ack",
        "gRPC bytes only": "same messages, receiver only counts them: gRPC's own ceiling",
        "shm": "one copy: the sender's cache (memfd, mapped read-only) -> reserved blocks, ack",
        "shm-slots": "the fallback: cache rows -> memfd slot -> reserved blocks, ack",
        "tcp": "cache rows -> sendmsg -> recv_into -> reserved blocks, checksums, ack",
        "gloo": "cache rows -> staging buffer -> Gloo send/recv (the pair's group) -> reserved blocks, checksums, ack",
        "grpc": "cache rows -> PushKV -> reserved blocks, checksums, ack",
    }
    for name, t in median.items():
        print(f"{name:16s}: {t * 1e3:8.2f} ms  {nbytes / t / 1e9:6.2f} GB/s  ({notes[name]})")
    for name, (baseline, target) in TARGETS.items():
        if name not in median:
            continue
        ratio = median[baseline] / median[name]
        print(f"ratio {name} / {baseline}: {ratio:.2f}  (target >= {target:.2f}: {'met' if ratio >= target else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
