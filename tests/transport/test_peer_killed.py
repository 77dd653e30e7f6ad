"""kill -9 of either peer in the middle of a transfer, with each data plane: the survivor fails that
transfer within seconds (never at the 30-60 s deadlines), its worker frees every block, and nothing is
left behind (no segment in /dev/shm, no shared-memory mapping in the survivor)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kvferry.engine.kv_memory import KV_CACHE_MEMFD
from kvferry.engine.sampling import SamplingParams
from kvferry.transport.base import KVTarget, TransferError, TransferErrorCode
from kvferry.transport.negotiation import NegotiatedKVSender
from kvferry.transport.shm_transport import MEMFD_NAME

from waiting import wait_until

PEER = os.path.join(os.path.dirname(__file__), "kv_peer_process.py")
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
TRANSPORTS = ["tcp", "shm", "gloo", "grpc"]


def dev_shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def maps_slots(pid: int | str = "self") -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return MEMFD_NAME in f.read()


def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, PEER, *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def read_line(proc: subprocess.Popen, timeout_s: float = 60.0) -> str:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    assert sel.select(timeout_s), "the peer process did not answer in time"
    return proc.stdout.readline().strip()


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def maps_peer_cache() -> bool:
    """A read-only mapping of another process's KV cache (shm's one copy)."""
    with open("/proc/self/maps") as f:
        return any(KV_CACHE_MEMFD in line and line.split()[1] == "r--s" for line in f)


@pytest.mark.parametrize("transport", [*TRANSPORTS, "shm+memfd"])
def test_sender_killed_mid_transfer_fails_the_reservation_fast_and_frees_its_blocks(decode_worker_factory, transport):
    decode = decode_worker_factory("auto")
    engine = decode.engine
    shm_before = dev_shm()
    prompt = list(range(2000, 2041))  # 3 blocks
    reservation = decode.reserve("victim", prompt, GREEDY)
    events = decode.subscribe("victim")
    address = "127.0.0.1:0"
    from kvferry.decode_worker.service import create_decode_server

    server, _, port = create_decode_server(decode, "127.0.0.1", 0)
    server.start()
    address = f"127.0.0.1:{port}"
    fp = json.dumps(dataclasses.asdict(decode.fingerprint))
    blocks = ",".join(str(b) for b in [7, 3, 5])  # the sender's own (scattered) source blocks
    peer = spawn("sender", fp, transport, address, decode.instance_id, "victim", blocks, "10")
    try:
        assert read_line(peer) == "sent"
        assert wait_until(lambda: peer.poll() is None and decode.receiver.poll("victim") is not None)
        assert engine.block_manager.num_used_blocks == len(reservation.block_ids)
        if transport == "shm":
            assert maps_slots()  # the receiver maps the connection's slots while the transfer lives
        t0 = time.monotonic()
        kill(peer)
        last = events.get(timeout=10.0)
        elapsed = time.monotonic() - t0
    finally:
        kill(peer)
        server.stop(grace=None)
    assert last.finish_reason == "error" and "KV transfer failed" in last.error, last
    assert elapsed < 5.0, elapsed  # seen at once (EOF / reset), not after the 30 s lease
    assert wait_until(lambda: engine.block_manager.num_used_blocks == 0)
    assert decode.counters.transfers_failed_total == 1
    assert dev_shm() == shm_before
    assert wait_until(lambda: not maps_slots())
    assert wait_until(lambda: not maps_peer_cache())  # the dead sender's cache is unmapped here


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_receiver_killed_mid_transfer_fails_the_prefill_fast_and_frees_its_blocks(prefill_worker_factory, transport,
                                                                                   transport_prefill_engine):
    from kvferry.transport.base import KVFingerprint

    engine = transport_prefill_engine
    fp = KVFingerprint.from_model(engine.model_config, engine.dtype, engine.config.cache.block_size)
    shm_before = dev_shm()
    peer = spawn("receiver", json.dumps(dataclasses.asdict(fp)), "8", "warm:6", "victim:0,1,2")
    try:
        info = json.loads(read_line(peer))
        tx = NegotiatedKVSender(fp, sender_id="prefill-0", kv_transport=transport)
        prefill = prefill_worker_factory(tx)
        target = KVTarget(info["address"], info["instance_id"], timeout_s=60.0)
        warm = prefill.prefill("warm", list(range(3000, 3010)), GREEDY, target)  # negotiates, pools a connection
        assert warm.result(timeout=60).first_token_id >= 0
        if transport == "shm":  # the engine's cache is in a memfd: the receiver copied from it
            assert tx.planes["shm"].chunks["one_copy"] > 0 and tx.planes["shm"].chunks["slots"] == 0
        peer.send_signal(signal.SIGSTOP)  # the decode side hangs with the transfer in flight...
        victim = prefill.prefill("victim", list(range(3100, 3141)), GREEDY, target)
        assert wait_until(lambda: prefill.stats().running_requests == 1, timeout_s=30.0)  # KV computed, sending
        time.sleep(0.2)
        assert not victim.done()
        t0 = time.monotonic()
        kill(peer)  # ...and dies
        with pytest.raises(TransferError) as info_:
            victim.result(timeout=10.0)
        elapsed = time.monotonic() - t0
    finally:
        kill(peer)
    assert info_.value.code is TransferErrorCode.UNAVAILABLE, info_.value
    assert elapsed < 5.0, elapsed  # at once, not at the 60 s deadline
    assert wait_until(lambda: engine.block_manager.num_used_blocks == 0)
    assert dev_shm() == shm_before
    assert not maps_slots()  # the failed connection was closed and unmapped
