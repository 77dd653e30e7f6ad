"""shm's one copy: a sender whose cache lives in a memfd (engine/kv_memory.py) names its rows, and the
receiver copies them straight from a read-only mapping of that cache into its blocks. Bits exact
(NaN payloads) into scattered blocks, concurrent transfers, checksums when asked for, the slots as the
fallback (a cache not in a memfd, a receiver that declines), the mapping read-only, and a transfer the
sender gave up mid-copy never committed (the guard)."""

from __future__ import annotations

import mmap
import os
from contextlib import closing

import pytest
import torch

from kvferry.engine.kv_memory import KV_CACHE_MEMFD, shared_zeros
from kvferry.transport.base import FirstToken, TransferErrorCode, TransferState
from kvferry.transport.shm_cache import find_shared_cache
from kvferry.transport.shm_transport import ShmSenderPlane

from kv_helpers import NUM_BLOCKS, NUM_LAYERS, ReceiverServer, bit_pattern_caches, same_bits, sender

TIMEOUT = 10.0


def memfd_caches(num_blocks: int = NUM_BLOCKS, seed: int = 5) -> list[torch.Tensor]:
    """The bit patterns of kv_helpers (NaN payloads among them), in a memfd as an engine allocates them."""
    src = bit_pattern_caches(seed=seed, num_blocks=num_blocks)
    shared = shared_zeros([tuple(c.shape) for c in src], src[0].dtype)
    for s, c in zip(shared, src):
        s.copy_(c)
    return shared


def shm_chunks(s) -> dict[str, int]:
    return s.planes["shm"].chunks


def receiver_maps(perms: str) -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if KV_CACHE_MEMFD in line and line.split()[1] == perms]


@pytest.fixture(params=["auto", "always"])
def server(request):
    with ReceiverServer("shm", kv_checksum=request.param) as s:
        yield s


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 300])  # one chunk per layer; many, cut at rows
def test_one_copy_is_bit_exact_into_scattered_blocks(server, chunk_bytes):
    src = memfd_caches()
    src_blocks, dst_blocks = [1, 4, 5, 6, 15], [14, 2, 11, 0, 5]
    s = sender("shm", chunk_bytes=chunk_bytes)
    try:
        for i in range(2):  # the second reuses the connection and its shared cache
            server.receiver.expect(f"r{i}", dst_blocks)
            h = s.send(server.target(TIMEOUT), f"r{i}", src, src_blocks, FirstToken(3))
            assert h.wait(TIMEOUT) is TransferState.DONE, h.error
            for s_layer, d_layer in zip(src, server.receiver.kv_caches):
                assert same_bits(s_layer[:, src_blocks], d_layer[:, dst_blocks])
            untouched = [b for b in range(NUM_BLOCKS) if b not in dst_blocks]
            assert all(torch.all(layer[:, untouched].view(torch.int16) == 0) for layer in server.receiver.kv_caches)
            for layer in server.receiver.kv_caches:
                layer.zero_()
        assert shm_chunks(s)["slots"] == 0 and shm_chunks(s)["one_copy"] >= 2 * NUM_LAYERS
        # The receiver's mapping of the sender's cache is read-only (and shared): r--s, never rw.
        assert receiver_maps("r--s"), "no read-only mapping of the sender's cache"
    finally:
        s.close()
    assert server.receiver.checksum_failures_total == 0


def test_concurrent_one_copy_transfers_stay_apart(server):
    src = memfd_caches(num_blocks=32)
    s = sender("shm", chunk_bytes=300)
    try:
        handles, expected = [], {}
        for i in range(5):
            src_blocks, dst_blocks = [3 * i, 3 * i + 2], [i, 15 - i]
            server.receiver.expect(f"c{i}", dst_blocks)
            handles.append(s.open(server.target(TIMEOUT), f"c{i}", 2))
            expected[i] = (src_blocks, dst_blocks)
        for layer_idx in range(NUM_LAYERS):  # interleaved, as an engine step that finishes them all
            for i, h in enumerate(handles):
                h.send_layer(layer_idx, src[layer_idx], expected[i][0])
        for h in handles:
            h.finish(FirstToken(1))
        assert all(h.wait(TIMEOUT) is TransferState.DONE for h in handles), [h.error for h in handles]
        for src_blocks, dst_blocks in expected.values():
            for s_layer, d_layer in zip(src, server.receiver.kv_caches):
                assert same_bits(s_layer[:, src_blocks], d_layer[:, dst_blocks])
        assert shm_chunks(s)["slots"] == 0
    finally:
        s.close()


def send_blocks_0_and_7_into_2_and_9(s, server, request_id: str, src) -> None:
    """Blocks 0 and 7 of ``src`` into the receiver's blocks 2 and 9, checked bit for bit."""
    server.receiver.expect(request_id, [2, 9])
    h = s.send(server.target(TIMEOUT), request_id, src, [0, 7], FirstToken(1))
    assert h.wait(TIMEOUT) is TransferState.DONE, h.error
    for s_layer, d_layer in zip(src, server.receiver.kv_caches):
        assert same_bits(s_layer[:, [0, 7]], d_layer[:, [2, 9]])


def test_cache_not_in_a_memfd_goes_through_the_slots():
    src = bit_pattern_caches()  # torch tensors: not shareable
    assert find_shared_cache(src[0]) is None and find_shared_cache(memfd_caches()[0]) is not None
    with ReceiverServer("shm") as server, closing(sender("shm")) as s:
        send_blocks_0_and_7_into_2_and_9(s, server, "plain", src)
        assert shm_chunks(s) == {"one_copy": 0, "slots": NUM_LAYERS}


def test_sender_without_one_copy_negotiates_the_slots():
    with ReceiverServer("shm") as server, closing(sender("shm")) as s:
        s.planes["shm"] = plane = ShmSenderPlane(s.chunk_bytes, one_copy=False)
        send_blocks_0_and_7_into_2_and_9(s, server, "old", memfd_caches())
        assert plane.chunks == {"one_copy": 0, "slots": NUM_LAYERS}


def test_receiver_mapping_cannot_write_the_senders_cache():
    server = ReceiverServer("shm")
    src = memfd_caches()
    shared = find_shared_cache(src[0])
    try:
        ro = mmap.mmap(shared.fd, shared.size, access=mmap.ACCESS_READ)  # what the receiver maps
        with pytest.raises(TypeError):
            ro[0] = 1
        ro.close()
        with pytest.raises(PermissionError):  # the descriptor it gets is read-only: no writable mapping
            mmap.mmap(shared.fd, shared.size)
        assert os.readlink(f"/proc/self/fd/{shared.fd}").startswith(f"/memfd:{KV_CACHE_MEMFD}")
    finally:
        shared.close()
        server.close()


def hold_payloads(server: ReceiverServer, method: str, when=lambda *args: True):
    """Make the receiver slow: ``method`` of each shm connection payload waits, whenever ``when`` of its
    arguments is true, until ``release`` is set (``in_copy`` says it is waiting)."""
    import threading

    plane = next(p for p in server.receiver.data_planes if p.transport == "shm")
    in_copy, release = threading.Event(), threading.Event()
    make_payload = plane._make_payload

    def slow_payload():
        payload = make_payload()
        original = getattr(payload, method)

        def held(*args):
            if when(*args):
                in_copy.set()
                release.wait(TIMEOUT)
            return original(*args)

        setattr(payload, method, held)
        return payload

    plane._make_payload = slow_payload
    return in_copy, release


def test_a_transfer_the_sender_gave_up_mid_copy_is_not_committed():
    """The receiver is slow (held back here after its copies, before the KV counts as received); the
    sender aborts meanwhile, after which the prefill worker may reuse the blocks it was reading: the
    guard check fails the transfer instead of committing what it copied."""
    import threading

    server = ReceiverServer("shm")
    src = memfd_caches()
    s = sender("shm")
    in_copy, release = hold_payloads(server, "before_finish")
    try:
        server.receiver.expect("slow", [2, 9])
        h = s.send(server.target(TIMEOUT), "slow", src, [0, 7], FirstToken(1))
        assert in_copy.wait(TIMEOUT)
        h.abort("router gave up")  # after this returns the sender may free the blocks
        assert h.poll() is TransferState.FAILED
        release.set()
        state, error = None, None
        for _ in range(100):
            ends = server.ends.of("slow")
            if ends:
                state, error = ends[0][1], ends[0][3]
                break
            threading.Event().wait(0.05)
        assert state is TransferState.FAILED, ends
        assert error.code is TransferErrorCode.ABORTED and "gave the transfer up" in error.message, error
        assert server.receiver.num_pending == 0
    finally:
        s.close()
        server.close()


def test_engine_caches_are_in_one_memfd_zeroed_and_page_aligned():
    from kvferry.engine.model import allocate_kv_caches
    from kv_helpers import model_config

    caches = allocate_kv_caches(model_config(), num_blocks=5, block_size=16, dtype=torch.bfloat16, device="cpu")
    assert all(c.shape == (2, 5, 16, 2, 8) and c.is_contiguous() for c in caches)
    assert all(c.data_ptr() % mmap.PAGESIZE == 0 for c in caches)
    assert all(torch.all(c.view(torch.int16) == 0) for c in caches)
    shared = find_shared_cache(caches[0])
    try:
        offsets = [shared.offset_of(c) for c in caches]
        assert offsets[0] == 0 and len(set(offsets)) == len(caches) and all(o is not None for o in offsets)
        assert shared.offset_of(torch.zeros(4)) is None
    finally:
        shared.close()


@pytest.mark.parametrize("row_bytes", [64, 96, 6144])
def test_copy_rows_matches_the_reference_from_a_read_only_buffer(row_bytes):
    from kvferry.kernels import cpu_kv_copy

    g = torch.Generator().manual_seed(row_bytes)
    src = torch.randint(0, 256, (12, row_bytes), generator=g, dtype=torch.uint8)
    src_ids, dst_ids = torch.tensor([11, 0, 5, 6, 7, 2]), torch.tensor([3, 9, 0, 1, 2, 8])
    ro = bytes(src.numpy().tobytes())  # read-only, as the receiver's mapping of the sender's cache
    got, ref = torch.zeros(10, row_bytes, dtype=torch.uint8), torch.zeros(10, row_bytes, dtype=torch.uint8)
    cpu_kv_copy.copy_rows(got, dst_ids, ro, src_ids)
    cpu_kv_copy.copy_rows_ref(ref, dst_ids, ro, src_ids)
    assert torch.equal(got, ref) and torch.equal(got[dst_ids], src[src_ids])
    with pytest.raises((RuntimeError, IndexError)):
        cpu_kv_copy.copy_rows(got, torch.tensor([0]), ro, torch.tensor([12]))  # past the source


def test_checksums_always_catch_a_source_block_changed_before_the_receiver_copied_it():
    """kv_checksum='always': hashed over the source blocks on the sender, over the copied blocks here;
    a source block written after the sender hashed it (a bug on the prefill side) is CORRUPT."""
    server = ReceiverServer("shm", kv_checksum="always")
    src = memfd_caches()
    s = sender("shm")
    # Held at the last layer: the sender hashed it before naming it.
    in_copy, release = hold_payloads(server, "_copy_ready", when=lambda conn, frame, *_: frame[1] == NUM_LAYERS - 1)
    try:
        server.receiver.expect("changed", [2, 9])
        h = s.send(server.target(TIMEOUT), "changed", src, [0, 7], FirstToken(1))
        assert in_copy.wait(TIMEOUT)
        src[NUM_LAYERS - 1].view(torch.int16)[1, 7, 0, 0, 0] ^= 1  # one bit of a V block
        release.set()
        assert h.wait(TIMEOUT) is TransferState.FAILED
        assert h.error.code is TransferErrorCode.CORRUPT, h.error
        assert server.receiver.checksum_failures_total == 1 and server.receiver.num_pending == 0
    finally:
        s.close()
        server.close()


def test_decode_worker_takes_kv_checksum_and_serve_passes_it_on():
    import argparse

    from kvferry.decode_worker.main import add_arguments
    from kvferry.router.serve_worker_flags import passed_through

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).kv_checksum == "auto"
    assert parser.parse_args(["--kv-checksum", "always"]).kv_checksum == "always"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-checksum", "never"])
    assert passed_through()["kv_checksum"][1] == ("decode",)  # kvferry serve --kv-checksum reaches decode workers


def test_one_connection_follows_the_senders_cache_as_it_changes():
    """Caches come and go in one process (engines in tests, a restarted engine): a pooled connection
    shares each memfd anew and never reads a freed one through a reused address."""
    server = ReceiverServer("shm")
    s = sender("shm")
    try:
        makers = [memfd_caches, bit_pattern_caches, memfd_caches, memfd_caches]
        for i, make in enumerate(makers):
            src = make(seed=i)  # the previous cache is freed first: its address may come back
            server.receiver.expect(f"c{i}", [3, 8])
            h = s.send(server.target(TIMEOUT), f"c{i}", src, [5, 1], FirstToken(1))
            assert h.wait(TIMEOUT) is TransferState.DONE, h.error
            for s_layer, d_layer in zip(src, server.receiver.kv_caches):
                assert same_bits(s_layer[:, [5, 1]], d_layer[:, [3, 8]]), i
            del src, h
        assert shm_chunks(s) == {"one_copy": 3 * NUM_LAYERS, "slots": NUM_LAYERS}
        plane = next(p for p in server.receiver.data_planes if p.transport == "shm")
        assert plane.connections_total == 1
    finally:
        s.close()
        server.close()
