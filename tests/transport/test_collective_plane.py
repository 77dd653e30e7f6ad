"""The collective data plane's own guarantees (the shared ones run in test_data_planes.py with gloo among
the transports): one group per pair shared by concurrent transfers, strict ordering checked by sequence
numbers and stamps, a broken pair rebuilt under a new epoch, deadlines against a stuck peer on both
ends, and the NCCL receiver's device-rows write checked on the CPU."""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time

import pytest
import torch

from kvferry.transport.base import FirstToken, KVTarget, KVTrailer, KVTransferHeader, TransferErrorCode, TransferState
from kvferry.transport.integrity import CHECKSUM_ALGORITHM, LayerChecksums
from kvferry.transport.receiver import KVReceiver

from kv_helpers import NUM_LAYERS, ReceiverServer, fingerprint, kv_caches, same_bits, sender
from test_peer_killed import kill, read_line, spawn

TIMEOUT = 10.0


@pytest.fixture
def server():
    with ReceiverServer("gloo") as s:
        yield s


def plane(server: ReceiverServer):
    return next(p for p in server.receiver.data_planes if p.transport == "gloo")


def send_one(s, server, request_id, src, src_blocks, dst_blocks, timeout_s=TIMEOUT):
    server.receiver.expect(request_id, dst_blocks)
    h = s.send(server.target(timeout_s), request_id, src, src_blocks, FirstToken(1))
    h.wait(timeout_s + 5)
    return h


def test_concurrent_transfers_from_two_prefill_workers_share_one_group_per_pair(server):
    senders = [sender("gloo", chunk_bytes=128), sender("gloo", chunk_bytes=128)]
    sources = [kv_caches(seed=20 + i) for i in range(6)]
    handles = []
    try:
        for i in range(6):  # three transfers in flight on each pair, layers interleaved
            server.receiver.expect(f"p{i}", [15 - i, i])
            handles.append(senders[i % 2].open(server.target(TIMEOUT), f"p{i}", 2))
        for layer_idx in range(NUM_LAYERS):
            for i, h in enumerate(handles):
                h.send_layer(layer_idx, sources[i][layer_idx], [i, 8 + i])
        for h in handles:
            h.finish(FirstToken(0))
        for h in handles:
            assert h.wait(TIMEOUT) is TransferState.DONE, h.error
    finally:
        for s in senders:
            s.close()
    for i in range(6):
        for s_layer, d_layer in zip(sources[i], server.receiver.kv_caches):
            assert same_bits(s_layer[:, [i, 8 + i]], d_layer[:, [15 - i, i]]), f"request p{i}"
    assert plane(server).epochs_started == 2  # one group per prefill worker, not one per transfer


@pytest.mark.parametrize("tamper", ["sequence", "stamp"])
def test_a_message_out_of_order_breaks_the_pair_and_the_next_transfer_rebuilds_it(server, tamper, caplog):
    src = kv_caches(seed=6)
    s = sender("gloo")
    try:
        assert send_one(s, server, "first", src, [0], [1]).poll() is TransferState.DONE
        pair = s.planes["gloo"]._pairs[server.offer("gloo").address]
        assert pair.epoch == 1
        if tamper == "sequence":
            pair._seq += 3  # the DATA frame's number skips ahead of the receiver's count
        else:
            pair.epoch = 99  # frames stay in step; the message's stamp does not match the group
        h = send_one(s, server, "tampered", src, [2], [3])
        assert h.poll() is TransferState.FAILED and h.error.code is TransferErrorCode.INVALID, h.error
        assert ("expected #" in h.error.message) if tamper == "sequence" else ("out of order" in h.error.message)
        (_, state, _, error), = server.ends.of("tampered")  # the receiver failed it too: blocks free
        assert state is TransferState.FAILED
        with caplog.at_level(logging.INFO, logger="kvferry.transport.collective_sender"):
            h = send_one(s, server, "after", src, [4, 5], [6, 7])
        assert h.poll() is TransferState.DONE, h.error
    finally:
        s.close()
    assert all(same_bits(a[:, [4, 5]], b[:, [6, 7]]) for a, b in zip(src, server.receiver.kv_caches))
    assert plane(server).epochs_started == 2
    assert any("rebuilt as epoch 2" in r.getMessage() for r in caplog.records)


def test_a_stuck_receiver_fails_the_transfer_at_its_deadline_and_the_pair_is_rebuilt(caplog):
    fp = fingerprint()
    peer = spawn("receiver", json.dumps(dataclasses.asdict(fp)), "8", "warm:6", "stuck:0,1", "after:2,3")
    s = sender("gloo", chunk_bytes=256)
    src = kv_caches(seed=8)
    try:
        info = json.loads(read_line(peer))
        h = s.send(KVTarget(info["address"], info["instance_id"], 30.0), "warm", src, [0], FirstToken(1))
        assert h.wait(30.0) is TransferState.DONE, h.error  # the pair is formed
        peer.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        h = s.send(KVTarget(info["address"], info["instance_id"], 2.0), "stuck", src, [0, 1], FirstToken(1))
        assert h.wait(10.0) is TransferState.FAILED
        elapsed = time.monotonic() - t0
        assert h.error.code is TransferErrorCode.DEADLINE, h.error
        assert elapsed < 5.0, elapsed  # its 2 s deadline, not the group's or the pair's own timeouts
        peer.send_signal(signal.SIGCONT)
        with caplog.at_level(logging.INFO, logger="kvferry.transport.collective_sender"):
            h = s.send(KVTarget(info["address"], info["instance_id"], 30.0), "after", src, [2, 3], FirstToken(1))
            assert h.wait(30.0) is TransferState.DONE, h.error
    finally:
        s.close()
        kill(peer)
    assert any("rebuilt as epoch 2" in r.getMessage() for r in caplog.records)


def test_a_stopped_sender_fails_the_reservation_at_the_receivers_deadline(server):
    plane(server).io_timeout_s = 1.5  # the receiver's deadline for the next frame or message
    fp = fingerprint()
    server.receiver.expect("victim", [9, 3])
    peer = spawn("sender", json.dumps(dataclasses.asdict(fp)), "gloo", server.address, server.receiver.instance_id,
                 "victim", "4,5", str(NUM_LAYERS - 1))  # all but the last layer, then SIGSTOP: no trailer
    try:
        assert read_line(peer) == "sent"
        t0 = time.monotonic()
        assert server.ends.done.wait(10.0)
        elapsed = time.monotonic() - t0
    finally:
        kill(peer)
    (_, state, _, error), = server.ends.of("victim")
    assert state is TransferState.FAILED and error.code is TransferErrorCode.DEADLINE, error
    assert elapsed < 5.0, elapsed
    assert server.receiver.num_pending == 0


def test_nccl_receive_path_writes_device_rows_bit_exactly_into_scattered_blocks():
    """The NCCL receiver hands ``write_rows`` its staging rows where they are (the GPU there); on the
    CPU the same method must place them exactly and verify their checksums."""
    ends = []
    fp = fingerprint()
    rx = KVReceiver(kv_caches(fill=0.0), fp, on_transfer_end=lambda *e: ends.append(e))
    src = kv_caches(seed=11)
    src_blocks, dst_blocks = [3, 0, 7], [12, 4, 9]
    rx.expect("rows", dst_blocks)
    header = KVTransferHeader("rows", fp.num_layers, 3, fp.layer_nbytes(3), fp.digest, rx.instance_id)
    session = rx.open(header, transport="inprocess")
    sums = LayerChecksums(fp.num_layers)
    for layer_idx, layer in enumerate(src):
        rows = layer[:, src_blocks].contiguous().view(torch.uint8).view(6, -1)  # the payload's 6 rows
        sums.update(layer_idx, rows.numpy())
        session.write_rows(layer_idx, 0, rows[:4])  # two chunks, cut at a row
        session.write_rows(layer_idx, 4 * rows.shape[1], rows[4:])
    session.finish(KVTrailer(FirstToken(5), 3 * fp.layer_nbytes(3), tuple(sums.digests()), CHECKSUM_ALGORITHM))
    rx.close()
    assert ends[0][1] is TransferState.DONE
    assert all(same_bits(a[:, src_blocks], b[:, dst_blocks]) for a, b in zip(src, rx.kv_caches))


def test_a_process_that_closed_its_pairs_exits_cleanly():
    """torch aborts a process whose group is destroyed while the interpreter finalizes; closing the
    sender and the receiver must finish their groups' teardown first."""
    for _ in range(2):
        peer = spawn("close-and-exit", "gloo")
        try:
            assert read_line(peer) == "closed"
            assert peer.wait(timeout=30) == 0  # not -6 / 134: "terminate called without an active exception"
        finally:
            kill(peer)
