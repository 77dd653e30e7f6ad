"""Every network data plane (tcp, shm, grpc) through the negotiating sender against a receiver behind a
real gRPC server: exact bits into scattered blocks, concurrent transfers, refusals, cancellation,
corruption on the wire, negotiation and its refusals, deadlines, pooling and the exported figures."""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time

import pytest
import torch

from kvferry.engine.config import ConfigError
from kvferry.transport.base import FirstToken, KVTarget, TransferErrorCode, TransferState
from kvferry.transport.grpc_transport import GrpcKVSender
from kvferry.transport.host import boot_id
from kvferry.transport.metrics import TransportCollector
from kvferry.transport import negotiation
from kvferry.transport.negotiation import NegotiatedKVSender, transports_for
from kvferry.transport.receiver import ReceiveSession

from kv_helpers import (
    NETWORK_TRANSPORTS,
    NUM_BLOCKS,
    NUM_LAYERS,
    ReceiverServer,
    bit_pattern_caches,
    fingerprint,
    kv_caches,
    same_bits,
    sender,
)

TIMEOUT = 10.0


@pytest.fixture
def server():
    with ReceiverServer("auto") as s:
        yield s


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 200])  # one chunk per layer; many, cut at rows
@pytest.mark.parametrize("transport", NETWORK_TRANSPORTS)
def test_round_trip_is_bit_exact_into_scattered_blocks(server, transport, chunk_bytes):
    src = bit_pattern_caches()
    src_blocks, dst_blocks = [1, 4, 5, 6, 15], [14, 2, 11, 0, 5]  # 4, 5, 6: one run of rows
    s = sender(transport, chunk_bytes=chunk_bytes)
    try:
        for i in range(2):  # the second one reuses the pooled connection
            request_id = f"{transport}-{i}"
            server.receiver.expect(request_id, dst_blocks)
            h = s.send(server.target(TIMEOUT), request_id, src, src_blocks, FirstToken(7))
            assert h.wait(TIMEOUT) is TransferState.DONE, h.error
            assert h.transport == transport
            for s_layer, d_layer in zip(src, server.receiver.kv_caches):
                assert same_bits(s_layer[:, src_blocks], d_layer[:, dst_blocks])
            untouched = [b for b in range(NUM_BLOCKS) if b not in dst_blocks]
            assert all(torch.all(layer[:, untouched].view(torch.int16) == 0) for layer in server.receiver.kv_caches)
            assert server.ends.of(request_id)[0][1:3] == (TransferState.DONE, FirstToken(7))
            assert h.bytes_sent == NUM_LAYERS * fingerprint().layer_nbytes(len(src_blocks))
            for layer in server.receiver.kv_caches:
                layer.zero_()
    finally:
        s.close()
    if transport != "grpc":
        plane = next(p for p in server.receiver.data_planes if p.transport == transport)
        assert plane.connections_total == 1  # pooled: both transfers (and the probe) on one connection


@pytest.mark.parametrize("transport", NETWORK_TRANSPORTS)
def test_concurrent_transfers_stay_ordered_and_apart(server, transport):
    """Five requests in flight at once, their layers interleaved as an engine step that finishes them
    all produces them, many chunks per layer: each lands whole in its own blocks."""
    n = 5
    sources = [kv_caches(seed=10 + i) for i in range(n)]
    src_blocks = [[i, (i + 7) % NUM_BLOCKS] for i in range(n)]
    dst_blocks = [[15 - 2 * i, 14 - 2 * i] for i in range(n)]
    s = sender(transport, chunk_bytes=150)
    try:
        handles = []
        for i in range(n):
            server.receiver.expect(f"c{i}", dst_blocks[i])
            handles.append(s.open(server.target(TIMEOUT), f"c{i}", 2))
        for layer_idx in range(NUM_LAYERS):
            for i, h in enumerate(handles):
                h.send_layer(layer_idx, sources[i][layer_idx], src_blocks[i])
        for i, h in enumerate(handles):
            h.finish(FirstToken(i))
        for h in handles:
            assert h.wait(TIMEOUT) is TransferState.DONE, h.error
    finally:
        s.close()
    for i in range(n):
        for s_layer, d_layer in zip(sources[i], server.receiver.kv_caches):
            assert torch.equal(s_layer[:, src_blocks[i]], d_layer[:, dst_blocks[i]]), f"request c{i}"
        assert server.ends.of(f"c{i}")[0][2] == FirstToken(i)


@pytest.mark.parametrize("transport", NETWORK_TRANSPORTS)
def test_no_reservation_or_a_restarted_receiver_is_refused(server, transport):
    s = sender(transport)
    src = kv_caches(seed=3)
    try:
        h = s.send(server.target(TIMEOUT), "nobody", src, [0], FirstToken(1))
        assert h.wait(TIMEOUT) is TransferState.FAILED and h.error.code is TransferErrorCode.NOT_FOUND, h.error
        server.receiver.expect("stale", [3])
        stale = KVTarget(server.address, "an-old-instance", timeout_s=TIMEOUT)
        h = s.send(stale, "stale", src, [0], FirstToken(1))
        assert h.wait(TIMEOUT) is TransferState.FAILED and h.error.code is TransferErrorCode.INCOMPATIBLE
        assert "restarted" in h.error.message
        server.receiver.expect("after", [2])  # the sender recovers: the next transfer goes through
        h = s.send(server.target(TIMEOUT), "after", src, [0], FirstToken(1))
        assert h.wait(TIMEOUT) is TransferState.DONE, h.error
    finally:
        s.close()


@pytest.mark.parametrize("transport", NETWORK_TRANSPORTS)
def test_receiver_cancel_mid_transfer_fails_the_sender_fast_and_stops_writes(server, transport):
    server.receiver.expect("cx", [2, 3])
    s = sender(transport, chunk_bytes=64)
    src = kv_caches(seed=4)
    try:
        h = s.open(server.target(TIMEOUT), "cx", 2)
        h.send_layer(0, src[0], [0, 1])
        deadline = time.monotonic() + TIMEOUT
        while server.receiver.poll("cx") is not None and time.monotonic() < deadline:
            res = server.receiver._reservations.get("cx")
            if res is not None and 0 in res.layers_done:
                break
            time.sleep(0.005)
        assert server.receiver.cancel("cx")
        snapshot = [layer.clone() for layer in server.receiver.kv_caches]
        t0 = time.monotonic()
        h.send_layer(1, src[1], [0, 1])
        h.send_layer(2, src[2], [0, 1])
        h.finish(FirstToken(3))
        assert h.wait(TIMEOUT) is TransferState.FAILED
        assert time.monotonic() - t0 < 3.0  # the receiver's refusal, not the deadline
    finally:
        s.close()
    assert h.error.code is TransferErrorCode.ABORTED, h.error
    assert all(torch.equal(a, b) for a, b in zip(snapshot, server.receiver.kv_caches))
    assert server.ends.events == []  # a cancel by the receiver's owner is not reported back to it


class FlippingProxy:
    """A TCP proxy that flips one bit in the first run of 64 ``marker`` bytes it forwards towards the
    receiver (corruption on the wire, past the framing); with ``marker`` None, the byte 4096 bytes into
    the stream (inside the first chunk of a large enough payload)."""

    def __init__(self, upstream: tuple[str, int], marker: int | None):
        self.upstream, self.marker = upstream, marker
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.flipped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, up, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, client, False), daemon=True).start()

    def _pump(self, src, dst, towards_receiver):
        seen = 0
        try:
            while data := src.recv(1 << 16):
                if towards_receiver and not self.flipped.is_set():
                    if self.marker is None:
                        at = 4096 - seen if seen <= 4096 < seen + len(data) else -1
                    else:
                        at = bytes(data).find(bytes([self.marker]) * 64) + 32 if bytes([self.marker]) * 64 in data else -1
                    if at >= 0:
                        data = bytearray(data)
                        data[at] ^= 0x01
                        self.flipped.set()
                seen += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.listener.close()


@pytest.mark.parametrize("transport", ["tcp", "grpc"])
def test_a_bit_flipped_on_the_wire_fails_the_transfer_as_corrupt(server, transport):
    marker = 0x3C
    src = [torch.full_like(layer, 0).view(torch.uint8).fill_(marker).view(torch.bfloat16) for layer in kv_caches()]
    if transport == "tcp":
        host, port = server.offer("tcp").address.split(":")
        proxy = FlippingProxy((host, int(port)), marker)
        tcp = dataclasses.replace(server.offer("tcp"), address=proxy.address)
        server.receiver.set_offers([tcp], list(server.receiver.data_planes))
        address = server.address
    else:
        proxy = FlippingProxy(("127.0.0.1", server.port), marker)
        address = proxy.address
    server.receiver.expect("flip", [5, 6])
    s = sender(transport)
    try:
        h = s.send(KVTarget(address, server.receiver.instance_id, TIMEOUT), "flip", src, [0, 1], FirstToken(1))
        assert h.wait(TIMEOUT) is TransferState.FAILED
    finally:
        s.close()
        proxy.close()
    assert proxy.flipped.is_set()
    assert h.error.code is TransferErrorCode.CORRUPT, h.error
    assert "checksum mismatch in layer(s) [0]" in h.error.message
    (_, state, first, error), = server.ends.of("flip")
    assert state is TransferState.FAILED and first is None and error.code is TransferErrorCode.CORRUPT
    assert server.receiver.checksum_failures_total == 1


class _FlipAfterHashing:
    """Hashes a chunk's bytes, then changes one: what a sender writing its slot late would do."""

    def __init__(self, checksums):
        self.checksums = checksums

    def update(self, layer_idx, data) -> None:
        self.checksums.update(layer_idx, data)
        data[0] ^= 0xFF  # the filled slot itself (a numpy view of the shared memory)


@pytest.mark.parametrize("kv_checksum", ["auto", "always"])
def test_shm_checksums_only_with_kv_checksum_always(kv_checksum, monkeypatch):
    """shm's bytes never leave this host's memory, so by default neither end hashes them (the trailer
    says none) and a slot changed after it was filled goes unseen; ``--kv-checksum always`` hashes on
    both ends and the same change fails the transfer as CORRUPT."""
    from kvferry.transport import shm_transport
    from kvferry.transport.integrity import NO_CHECKSUM

    send_chunk = shm_transport._send_chunk
    trailers = []

    def flipping(conn, chunk, deadline, checksums):
        send_chunk(conn, chunk, deadline, None if checksums is None else _FlipAfterHashing(checksums))

    monkeypatch.setattr(shm_transport, "_send_chunk", flipping)
    server = ReceiverServer("shm", kv_checksum=kv_checksum)
    real_finish = ReceiveSession.finish

    def finish(session, trailer):  # records what the receiver was told
        trailers.append(trailer)
        real_finish(session, trailer)

    monkeypatch.setattr(ReceiveSession, "finish", finish)
    src = bit_pattern_caches()
    server.receiver.expect("slot", [3, 9])
    s = sender("shm")
    try:
        h = s.send(server.target(TIMEOUT), "slot", src, [1, 2], FirstToken(1))
        state = h.wait(TIMEOUT)
    finally:
        s.close()
        server.close()
    if kv_checksum == "auto":
        assert state is TransferState.DONE, h.error
        assert trailers[0].checksum_algorithm == NO_CHECKSUM and trailers[0].layer_checksums == ()
        assert h.checksums is None  # nothing hashed on the sender either
    else:
        assert state is TransferState.FAILED and h.error.code is TransferErrorCode.CORRUPT, h.error
        assert f"checksum mismatch in layer(s) {list(range(NUM_LAYERS))}" in h.error.message  # every layer flipped
        assert server.receiver.checksum_failures_total == 1


def test_forced_transports_that_cannot_work_are_refused_naming_why():
    only_grpc, only_tcp = ReceiverServer("grpc"), ReceiverServer("tcp")
    src = kv_caches(seed=1)
    try:
        for forced, srv, accepted in [("tcp", only_grpc, "grpc"), ("shm", only_tcp, "tcp"), ("grpc", only_tcp, "tcp"),
                                      ("gloo", only_tcp, "tcp")]:
            srv.receiver.expect(f"forced-{forced}", [0])
            s = sender(forced)
            try:
                h = s.send(srv.target(TIMEOUT), f"forced-{forced}", src, [0], FirstToken(1))
                assert h.wait(TIMEOUT) is TransferState.FAILED
            finally:
                s.close()
            assert h.error.code is TransferErrorCode.INCOMPATIBLE, h.error
            assert f"--kv-transport {forced}: {forced}: not offered (the receiver accepts {accepted})" in h.error.message
            assert srv.receiver.poll(f"forced-{forced}") is TransferState.PENDING  # refused before any byte
        # A sender that skips negotiation (plain gRPC) is refused by the receiver itself.
        plain = GrpcKVSender(fingerprint())
        try:
            h = plain.send(only_tcp.target(TIMEOUT), "forced-grpc", src, [0], FirstToken(1))
            assert h.wait(TIMEOUT) is TransferState.FAILED
        finally:
            plain.close()
        assert h.error.code is TransferErrorCode.INCOMPATIBLE and "accepts KV over tcp, not grpc" in h.error.message
    finally:
        only_grpc.close()
        only_tcp.close()
    with pytest.raises(ConfigError, match="choose one of"):
        sender("rdma")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_nccl_is_refused_at_start_without_cuda():
    for start in (lambda: sender("nccl"), lambda: ReceiverServer("nccl"),
                  lambda: NegotiatedKVSender(fingerprint(), kv_transport="nccl", kv_device="cpu")):
        with pytest.raises(ConfigError, match="--kv-transport nccl: NCCL needs CUDA"):
            start()
    assert "nccl" not in transports_for("auto")  # auto leaves it out instead of failing
    assert transports_for("auto") == ("shm", "tcp", "gloo", "grpc")


def test_shm_is_refused_across_hosts_and_auto_takes_tcp_there(server, caplog):
    shm = dataclasses.replace(server.offer("shm"), boot_id="another-host")
    server.receiver.set_offers([shm, server.offer("tcp"), server.offer("grpc")], list(server.receiver.data_planes))
    src = kv_caches(seed=2)
    server.receiver.expect("across-shm", [0])
    server.receiver.expect("across-auto", [1])
    forced, auto = sender("shm"), sender("auto")
    try:
        h = forced.send(server.target(TIMEOUT), "across-shm", src, [0], FirstToken(1))
        assert h.wait(TIMEOUT) is TransferState.FAILED
        assert h.error.code is TransferErrorCode.INCOMPATIBLE and "shm: another host" in h.error.message
        with caplog.at_level(logging.INFO, logger="kvferry.transport.negotiation"):
            h = auto.send(server.target(TIMEOUT), "across-auto", src, [0], FirstToken(1))
            assert h.wait(TIMEOUT) is TransferState.DONE, h.error
    finally:
        forced.close()
        auto.close()
    assert h.transport == "tcp"
    chosen = [r for r in caplog.records if "goes over tcp" in r.getMessage()]
    assert chosen and chosen[0].levelno == logging.INFO  # across hosts tcp is the right choice, no warning
    assert "shm: another host" in chosen[0].getMessage()


def test_auto_takes_shm_on_one_host_and_warns_when_it_falls_back(server, caplog):
    assert server.offer("shm").boot_id == boot_id()
    src = kv_caches(seed=2)
    server.receiver.expect("one-host", [0])
    s = sender("auto")
    try:
        h = s.send(server.target(TIMEOUT), "one-host", src, [0], FirstToken(1))
        assert h.wait(TIMEOUT) is TransferState.DONE and h.transport == "shm", h.error
    finally:
        s.close()
    # The shm socket gone (its plane closed): auto goes on over tcp, with a warning naming why.
    next(p for p in server.receiver.data_planes if p.transport == "shm").close()
    server.receiver.expect("fallback", [1])
    s = sender("auto")
    try:
        with caplog.at_level(logging.INFO, logger="kvferry.transport.negotiation"):
            h = s.send(server.target(TIMEOUT), "fallback", src, [0], FirstToken(1))
            assert h.wait(TIMEOUT) is TransferState.DONE, h.error
    finally:
        s.close()
    assert h.transport == "tcp"
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "goes over tcp" in r.getMessage()]
    assert warned and "shm: shm KV connection" in warned[0].getMessage()


def test_silent_tcp_peer_fails_within_the_deadline(server):
    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never answers the hello
    silent = dataclasses.replace(server.offer("tcp"), address=f"127.0.0.1:{listener.getsockname()[1]}")
    server.receiver.set_offers([silent], list(server.receiver.data_planes))
    server.receiver.expect("silent", [0])
    s = sender("tcp")
    t0 = time.monotonic()
    try:
        h = s.send(server.target(1.5), "silent", kv_caches(), [0], FirstToken(1))
        assert h.wait(6.0) is TransferState.FAILED
    finally:
        s.close()
        listener.close()
    assert h.error.code is TransferErrorCode.DEADLINE, h.error
    assert time.monotonic() - t0 < 4.0  # the 1.5 s deadline plus slack on a loaded machine


def test_a_blocked_plane_leaves_time_for_the_fallback(server, monkeypatch):
    """A tcp port whose packets a firewall drops (here: a listener that never answers the hello) costs
    auto one probe timeout, not the transfer's whole deadline: gRPC still carries the KV in time."""
    monkeypatch.setattr(negotiation, "PROBE_TIMEOUT_S", 1.0)
    listener = socket.create_server(("127.0.0.1", 0))
    silent = dataclasses.replace(server.offer("tcp"), address=f"127.0.0.1:{listener.getsockname()[1]}")
    server.receiver.set_offers([silent, server.offer("grpc")], list(server.receiver.data_planes))
    server.receiver.expect("blocked", [0])
    s = sender("auto")
    t0 = time.monotonic()
    try:
        h = s.send(server.target(30.0), "blocked", kv_caches(), [0], FirstToken(1))
        assert h.wait(20.0) is TransferState.DONE, h.error
    finally:
        s.close()
        listener.close()
    assert h.transport == "grpc"
    assert time.monotonic() - t0 < 15.0  # one 1 s probe, then the transfer; not the 30 s deadline


def test_transport_and_throughput_are_exported_per_pair(server):
    s = sender("tcp")
    try:
        server.receiver.expect("m1", [3, 4])
        h = s.send(server.target(TIMEOUT), "m1", kv_caches(seed=9), [0, 1], FirstToken(1))
        assert h.wait(TIMEOUT) is TransferState.DONE, h.error
        for stats, role, peer in ((s.stats, "sender", "decode-0"), (server.receiver.pair_stats, "receiver", "prefill-0")):
            families = {f.name: f for f in TransportCollector(stats, role).collect()}
            info = families["kvferry_kv_transport_info"].samples
            assert [(x.labels["peer"], x.labels["transport"], x.value) for x in info] == [(peer, "tcp", 1.0)]
            moved = families["kvferry_kv_transfer_bytes"].samples
            assert [x.value for x in moved if x.name.endswith("_total")] == [float(h.bytes_sent)]
            throughput = families["kvferry_kv_transfer_throughput_bytes_per_second"].samples
            assert throughput[0].labels["transport"] == "tcp" and throughput[0].value > 0
    finally:
        s.close()
