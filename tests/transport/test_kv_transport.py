"""KV transport round trips (in-process and gRPC on loopback), handshake, deadlines and cancellation."""

from __future__ import annotations

import socket
import threading
import time
from concurrent import futures

import grpc
import pytest
import torch

from kvferry.engine.sampling import TokenLogprobs
from kvferry.transport.base import (
    FirstToken,
    KVFingerprint,
    KVTarget,
    TransferErrorCode,
    TransferState,
    gather_blocks,
)
from kvferry.transport.grpc_transport import GrpcKVSender, add_kv_transfer_service, channel_options
from kvferry.transport.inprocess import InProcessKVSender
from kvferry.transport.receiver import KVReceiver

from kv_helpers import BLOCK_SIZE, HEAD_DIM, NUM_BLOCKS, NUM_KV_HEADS, NUM_LAYERS, Ends, fingerprint, kv_caches

@pytest.fixture
def grpc_receiver():
    """A KVReceiver behind a real gRPC server on loopback; yields (receiver, address, ends)."""
    ends = Ends()
    receiver = KVReceiver(kv_caches(fill=0.0), fingerprint(), receiver_id="decode-0", on_transfer_end=ends)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=channel_options(64 << 20))
    add_kv_transfer_service(server, receiver)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver, f"127.0.0.1:{port}", ends
    server.stop(grace=None)


def send_all(sender, target, request_id, src, src_blocks, first_token):
    return sender.send(target, request_id, src, src_blocks, first_token)


def assert_blocks_equal(src, src_blocks, dst, dst_blocks):
    for s, d in zip(src, dst):
        assert torch.equal(s[:, src_blocks], d[:, dst_blocks])


def test_in_process_round_trip_reproduces_kv_exactly():
    src = kv_caches(seed=1)
    ends = Ends()
    dst = kv_caches(fill=0.0)
    receiver = KVReceiver(dst, fingerprint(), on_transfer_end=ends)
    sender = InProcessKVSender({"decode-0": receiver}, fingerprint())
    src_blocks, dst_blocks = [5, 2, 9], [0, 7, 3]
    receiver.expect("r1", dst_blocks)
    first = FirstToken(42, TokenLogprobs(42, -0.5, {42: -0.5, 7: -1.25}))
    handle = send_all(sender, KVTarget("decode-0"), "r1", src, src_blocks, first)
    assert handle.poll() is TransferState.DONE, handle.error
    assert_blocks_equal(src, src_blocks, dst, dst_blocks)
    untouched = [b for b in range(NUM_BLOCKS) if b not in dst_blocks]
    assert all(torch.all(layer[:, untouched] == 0) for layer in dst)
    assert ends.events == [("r1", TransferState.DONE, first, None)]
    assert receiver.poll("r1") is None  # the transfer is over: the engine owns the blocks


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 1000])  # one chunk per layer; many chunks per layer
def test_grpc_round_trip_reproduces_kv_exactly(grpc_receiver, chunk_bytes):
    receiver, address, ends = grpc_receiver
    src = kv_caches(seed=2)
    src_blocks, dst_blocks = [1, 4, 5, 6, 15], [14, 2, 11, 0, 5]  # 4, 5, 6: one run of rows
    receiver.expect("r2", dst_blocks)
    sender = GrpcKVSender(fingerprint(), sender_id="prefill-0", chunk_bytes=chunk_bytes)
    try:
        target = KVTarget(address, receiver.instance_id, timeout_s=10.0)
        first = FirstToken(7, TokenLogprobs(7, -0.25, {7: -0.25, 3: -2.0}))
        handle = send_all(sender, target, "r2", src, src_blocks, first)
        assert handle.wait(10.0) is TransferState.DONE, handle.error
    finally:
        sender.close()
    assert_blocks_equal(src, src_blocks, receiver.kv_caches, dst_blocks)
    assert ends.events[0][:3] == ("r2", TransferState.DONE, first)
    assert handle.bytes_sent == NUM_LAYERS * fingerprint().layer_nbytes(len(src_blocks))


def test_grpc_round_trip_keeps_every_bit_pattern(grpc_receiver):
    # The receiver moves rows as 8-byte words: NaN payloads, infinities, -0 and subnormals in bf16
    # (and words that read as float64 NaNs) must arrive bit for bit.
    receiver, address, _ = grpc_receiver
    g = torch.Generator().manual_seed(5)
    shape = (2, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    src = [torch.randint(-(2**15), 2**15, shape, generator=g, dtype=torch.int16).view(torch.bfloat16)
           for _ in range(NUM_LAYERS)]
    src[0].view(torch.int16)[0, 0, 0, 0, :4] = torch.tensor([0x7FC1, 0xFF81 - 0x10000, 0x7FF8, 0x7FF0], dtype=torch.int16)
    receiver.expect("bits", [3, 8])
    sender = GrpcKVSender(fingerprint(), chunk_bytes=1 << 20)
    try:
        handle = send_all(sender, KVTarget(address, receiver.instance_id, timeout_s=10.0), "bits", src, [0, 9],
                          FirstToken(1))
        assert handle.wait(10.0) is TransferState.DONE, handle.error
    finally:
        sender.close()
    for s, d in zip(src, receiver.kv_caches):
        assert torch.equal(s[:, [0, 9]].view(torch.int16), d[:, [3, 8]].view(torch.int16))


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(dtype=torch.float32), "dtype"),
        (dict(num_kv_heads=1, num_heads=4), "num_kv_heads"),
        (dict(name="other-model"), "model_name"),
    ],
)
def test_fingerprint_mismatch_fails_at_handshake_naming_the_field(grpc_receiver, overrides, field):
    receiver, address, ends = grpc_receiver
    dtype = overrides.pop("dtype", torch.bfloat16)
    fp = fingerprint(dtype, **overrides)
    receiver.expect("r3", [0, 1])
    sender = GrpcKVSender(fp)
    try:
        handle = sender.open(KVTarget(address, timeout_s=5.0), "r3", 2)
        assert handle.wait(5.0) is TransferState.FAILED
    finally:
        sender.close()
    assert handle.error.code is TransferErrorCode.INCOMPATIBLE
    assert f"{field}: sender" in handle.error.message, handle.error.message
    # In process too, same message.
    inproc = InProcessKVSender({"d": receiver}, fp).open(KVTarget("d"), "r3", 2)
    assert inproc.poll() is TransferState.FAILED and f"{field}: sender" in inproc.error.message
    assert receiver.poll("r3") is TransferState.PENDING  # the reservation is untouched


def test_push_without_reservation_or_to_restarted_receiver_is_refused(grpc_receiver):
    receiver, address, _ = grpc_receiver
    sender = GrpcKVSender(fingerprint())
    src = kv_caches(seed=3)
    try:
        h = send_all(sender, KVTarget(address, timeout_s=5.0), "nobody", src, [0], FirstToken(1))
        assert h.wait(5.0) is TransferState.FAILED and h.error.code is TransferErrorCode.NOT_FOUND
        receiver.expect("r4", [3])
        h = send_all(sender, KVTarget(address, "stale-instance", timeout_s=5.0), "r4", src, [0], FirstToken(1))
        assert h.wait(5.0) is TransferState.FAILED and h.error.code is TransferErrorCode.INCOMPATIBLE
        assert "restarted" in h.error.message
    finally:
        sender.close()


def test_transfer_to_dead_peer_fails_fast():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sender = GrpcKVSender(fingerprint())
    t0 = time.monotonic()
    try:
        h = sender.open(KVTarget(f"127.0.0.1:{port}", timeout_s=20.0), "r5", 1)
        assert h.wait(20.0) is TransferState.FAILED
    finally:
        sender.close()
    assert h.error.code is TransferErrorCode.UNAVAILABLE, h.error
    assert time.monotonic() - t0 < 5.0  # refused at connect, not at the deadline


def test_transfer_to_silent_peer_errors_within_its_deadline():
    """A peer that accepts TCP connections but never speaks: the transfer fails by its deadline."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    sender = GrpcKVSender(fingerprint(), handshake_timeout_s=1.0)
    t0 = time.monotonic()
    try:
        h = sender.open(KVTarget(address, timeout_s=1.5), "r6", 1)
        h.send_layer(0, kv_caches(fill=0.0)[0], [0])
        assert h.wait(5.0) is TransferState.FAILED
    finally:
        sender.close()
        listener.close()
    elapsed = time.monotonic() - t0
    assert h.error.code in (TransferErrorCode.DEADLINE, TransferErrorCode.UNAVAILABLE), h.error
    assert elapsed < 4.0, elapsed  # the 1.5 s deadline plus scheduling slack on a loaded machine


def test_receiver_cancel_mid_transfer_fails_sender_and_stops_writes(grpc_receiver):
    receiver, address, ends = grpc_receiver
    receiver.expect("r7", [2, 3])
    sender = GrpcKVSender(fingerprint(), chunk_bytes=256)
    src = kv_caches(seed=4)
    try:
        h = sender.open(KVTarget(address, timeout_s=5.0), "r7", 2)
        h.send_layer(0, src[0], [0, 1])
        deadline = time.monotonic() + 5.0
        while 0 not in getattr(receiver._reservations.get("r7"), "layers_done", {0}) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert receiver.cancel("r7")
        snapshot = [layer.clone() for layer in receiver.kv_caches]
        h.send_layer(1, src[1], [0, 1])
        h.finish(FirstToken(3))
        assert h.wait(5.0) is TransferState.FAILED
    finally:
        sender.close()
    assert h.error.code is TransferErrorCode.ABORTED, h.error
    assert all(torch.equal(a, b) for a, b in zip(snapshot, receiver.kv_caches))
    assert ends.events == []  # a cancel by the receiver's owner is not reported back to it


def test_sender_abort_fails_the_reservation(grpc_receiver):
    receiver, address, ends = grpc_receiver
    receiver.expect("r8", [1])
    sender = GrpcKVSender(fingerprint(), chunk_bytes=256)
    try:
        h = sender.open(KVTarget(address, timeout_s=5.0), "r8", 1)
        h.send_layer(0, kv_caches(seed=5)[0], [0])
        time.sleep(0.2)
        h.abort("client went away")
        assert h.wait(5.0) is TransferState.FAILED
        assert ends.done.wait(5.0)
    finally:
        sender.close()
    request_id, state, _, error = ends.events[0]
    assert (request_id, state) == ("r8", TransferState.FAILED) and error is not None


def test_receiver_accepts_chunks_cut_anywhere():
    """Chunks that split block rows (another sender's choice) are reassembled exactly."""
    src = kv_caches(seed=6)
    receiver = KVReceiver(kv_caches(fill=0.0), fingerprint())
    receiver.expect("r9", [9, 1, 4])
    fp = fingerprint()
    from kvferry.transport.base import KVTrailer, KVTransferHeader
    from kvferry.transport.integrity import CHECKSUM_ALGORITHM, LayerChecksums

    session = receiver.open(KVTransferHeader("r9", NUM_LAYERS, 3, fp.layer_nbytes(3), fp.digest))
    total = 0
    checksums = LayerChecksums(NUM_LAYERS)
    for layer_idx, layer in enumerate(src):
        data = gather_blocks(layer, [0, 2, 3]).view(torch.uint8).reshape(-1).numpy().tobytes()
        checksums.update(layer_idx, data)
        for offset in range(0, len(data), 100):
            session.write(layer_idx, offset, data[offset : offset + 100])
            total += len(data[offset : offset + 100])
    session.finish(KVTrailer(FirstToken(1), total, tuple(checksums.digests()), CHECKSUM_ALGORITHM))
    assert_blocks_equal(src, [0, 2, 3], receiver.kv_caches, [9, 1, 4])


def test_hand_encoded_chunks_are_standard_protobuf():
    from kvferry.proto import kv_transfer_pb2 as pb
    from kvferry.transport.grpc_transport import KVDataView, decode_chunk, encode_data_chunk

    rows = torch.arange(256, dtype=torch.uint8).repeat(4).view(4, 256)  # 4 rows of bytes 0..255
    rows[2] = 7
    raw = encode_data_chunk(7, 300000, rows, [3, 2, 0])
    msg = pb.KVChunk.FromString(raw)
    payload = bytes(range(256)) + bytes([7] * 256) + bytes(range(256))
    assert (msg.data.layer_idx, msg.data.offset, msg.data.data) == (7, 300000, payload)
    view = decode_chunk(pb.KVChunk(data=pb.KVData(layer_idx=0, offset=5, data=b"abc")).SerializeToString())
    assert isinstance(view, KVDataView) and (view.layer_idx, view.offset, bytes(view.data)) == (0, 5, b"abc")
    trailer = decode_chunk(pb.KVChunk(trailer=pb.KVTrailer(first_token_id=3)).SerializeToString())
    assert trailer.trailer.first_token_id == 3


@pytest.mark.parametrize("verify", [True, False])
def test_a_trailer_without_checksums_is_refused_where_the_receiver_verifies(verify):
    """Only a session opened without verification (shm by default) takes a trailer that says none."""
    from kvferry.transport.base import KVTrailer, KVTransferHeader, TransferError, TransferErrorCode
    from kvferry.transport.integrity import NO_CHECKSUM

    src, fp = kv_caches(seed=7), fingerprint()
    receiver = KVReceiver(kv_caches(fill=0.0), fp)
    receiver.expect("r10", [2])
    session = receiver.open(KVTransferHeader("r10", NUM_LAYERS, 1, fp.layer_nbytes(1), fp.digest), verify_checksums=verify)
    for layer_idx, layer in enumerate(src):
        session.write(layer_idx, 0, gather_blocks(layer, [0]).view(torch.uint8).reshape(-1).numpy().tobytes())
    trailer = KVTrailer(FirstToken(1), NUM_LAYERS * fp.layer_nbytes(1), (), NO_CHECKSUM)
    if verify:
        with pytest.raises(TransferError) as e:
            session.finish(trailer)
        assert e.value.code is TransferErrorCode.INVALID and "'none', expected xxh3_64" in e.value.message
    else:
        session.finish(trailer)
        assert_blocks_equal(src, [0], receiver.kv_caches, [2])


def test_a_handshake_result_survives_the_wire_both_ways():
    from kvferry.transport.base import HandshakeResult, TransportOffer
    from kvferry.transport.grpc_transport import handshake_from_proto, handshake_to_proto

    result = HandshakeResult(
        compatible=False, mismatches=("dtype: bfloat16 != float32",), receiver_fingerprint=fingerprint(),
        receiver_id="decode-0", receiver_instance_id="i-1", max_chunk_bytes=1 << 20,
        transports=(TransportOffer("tcp", address="127.0.0.1:5", ticket="t"),),
    )
    assert handshake_from_proto(handshake_to_proto(result)) == result
