"""The worker registry: membership, leases, fingerprint checks and the picking policy."""

import pytest

from kvferry.common.fingerprint import KVFingerprint
from kvferry.common.worker import WorkerRole, WorkerStats
from kvferry.router.registry import (
    RegistrationError,
    RegistryConfig,
    WorkerRegistry,
)

FP = KVFingerprint(model_name="m", dtype="bfloat16", block_size=16, num_layers=30, num_kv_heads=3, head_dim=64,
                 vocab_size=49152, max_model_len=8192, protocol_version=1)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_registry() -> tuple[WorkerRegistry, Clock]:
    clock = Clock()
    return WorkerRegistry(RegistryConfig(heartbeat_interval_s=0.5, lease_s=3.0), clock=clock), clock


def cap(total=100, free=100, running=0, queued=0, max_running=8) -> WorkerStats:
    return WorkerStats(total_kv_blocks=total, free_kv_blocks=free, running_requests=running,
                    queued_prefill_tokens=queued, max_running_requests=max_running)


def test_register_heartbeat_and_expiry():
    reg, clock = make_registry()
    d = reg.register(WorkerRole.DECODE, "127.0.0.1:7001", FP, cap())
    p = reg.register(WorkerRole.PREFILL, "127.0.0.1:7002", FP, cap())
    clock.now += 2.0
    assert reg.heartbeat(d.worker_id, cap(free=50))
    clock.now += 2.0  # prefill: 4 s silent > 3 s lease; decode: 2 s
    assert [w.worker_id for w in reg.expire()] == [p.worker_id]
    assert list(reg.workers) == [d.worker_id]
    assert reg.workers[d.worker_id].capacity.free_kv_blocks == 50
    assert not reg.heartbeat(p.worker_id, cap())  # unknown now: it must re-register
    p2 = reg.register(WorkerRole.PREFILL, "127.0.0.1:7002", FP, cap())  # joins at run time
    assert p2.worker_id != p.worker_id and reg.pick_prefill() is p2


def test_a_wedged_engine_gets_no_new_work_and_is_reported_once():
    reg, _ = make_registry()
    d1 = reg.register(WorkerRole.DECODE, "127.0.0.1:7001", FP, cap())
    d2 = reg.register(WorkerRole.DECODE, "127.0.0.1:7003", FP, cap(free=10))
    wedged = WorkerStats(**{**cap().__dict__, "engine_busy_ms": 31_000})  # past the 30 s default
    assert reg.heartbeat(d1.worker_id, wedged) and reg.heartbeat(d1.worker_id, wedged)
    assert reg.take_newly_stalled() == [d1] and reg.take_newly_stalled() == []
    assert reg.live(WorkerRole.DECODE) == [d2] and reg.pick_decode(1) is d2  # d1 had more room
    reg.heartbeat(d1.worker_id, cap())  # its step ended: it takes work again
    assert reg.pick_decode(1) is d1


def test_an_expired_worker_is_listed_as_lost_until_one_of_its_name_registers():
    reg, clock = make_registry()
    reg.register(WorkerRole.DECODE, "127.0.0.1:7001", FP, cap(), name="decode-1")
    clock.now += 4.0
    reg.expire()
    assert [(w.name, w.times_lost) for w in reg.lost.values()] == [("decode-1", 1)]
    reg.register(WorkerRole.DECODE, "127.0.0.1:7005", FP, cap(), name="decode-1")  # restarted on a new port
    assert reg.lost == {}
    clock.now += 4.0
    reg.expire()
    assert reg.lost["decode-1"].times_lost == 2


def test_reregistering_the_same_address_replaces_the_stale_entry():
    reg, _ = make_registry()
    old = reg.register(WorkerRole.DECODE, "127.0.0.1:7001", FP, cap())
    new = reg.register(WorkerRole.DECODE, "127.0.0.1:7001", FP, cap())
    assert list(reg.workers) == [new.worker_id] and old.worker_id != new.worker_id


def test_fingerprint_mismatch_names_every_field():
    reg, _ = make_registry()
    reg.register(WorkerRole.DECODE, "127.0.0.1:7001", FP, cap())
    other = KVFingerprint(**{**FP.__dict__, "dtype": "float32", "block_size": 32, "max_model_len": 2048})
    with pytest.raises(RegistrationError) as err:
        reg.register(WorkerRole.PREFILL, "127.0.0.1:7002", other, cap())
    message = str(err.value)
    assert "dtype: cluster 'bfloat16', worker 'float32'" in message
    assert "block_size: cluster 16, worker 32" in message
    assert "max_model_len" not in message  # tolerated: the router serves the smallest context
    assert len(reg.workers) == 1


def test_bad_address_is_refused():
    reg, _ = make_registry()
    with pytest.raises(RegistrationError, match="host:port"):
        reg.register(WorkerRole.DECODE, "nowhere", FP, cap())


def test_pick_decode_by_free_capacity_and_load():
    reg, _ = make_registry()
    a = reg.register(WorkerRole.DECODE, "127.0.0.1:7001", FP, cap(free=90, running=0))
    b = reg.register(WorkerRole.DECODE, "127.0.0.1:7002", FP, cap(free=40, running=0))
    assert reg.pick_decode(10) is a
    # Load counts too: a full batch on a outweighs its extra free blocks.
    reg.heartbeat(a.worker_id, cap(free=90, running=8))
    assert reg.pick_decode(10) is b
    # Room is a hard limit: only a fits 50 blocks.
    assert reg.pick_decode(50) is a
    assert reg.pick_decode(91) is None
    assert reg.pick_decode(10, exclude=frozenset({b.worker_id})) is a


def test_router_side_accounting_spreads_a_burst_between_heartbeats():
    reg, _ = make_registry()
    a = reg.register(WorkerRole.DECODE, "127.0.0.1:7001", FP, cap(free=100))
    b = reg.register(WorkerRole.DECODE, "127.0.0.1:7002", FP, cap(free=100))
    picks = []
    for _ in range(6):
        w = reg.pick_decode(5)
        reg.on_reserved(w, 5)
        picks.append(w.worker_id)
    assert picks.count(a.worker_id) == 3 and picks.count(b.worker_id) == 3
    reg.on_refused(a)  # a said "no room": skipped until its next heartbeat
    assert reg.pick_decode(1) is b
    reg.heartbeat(a.worker_id, cap(free=100))
    assert a.free_blocks_estimate == 100 and reg.pick_decode(1) is not None


def test_a_refusing_worker_is_tried_again_once_one_of_its_requests_ends():
    # A worker that said "batch full" gets a sequence back when one of its requests ends; the queue
    # must not wait for its next heartbeat to use it.
    reg, _ = make_registry()
    a = reg.register(WorkerRole.DECODE, "127.0.0.1:7001", FP, cap(free=100))
    ticket = reg.on_reserved(a, 1)
    reg.heartbeat(a.worker_id, cap(free=99))  # the running request is in the worker's own figure now
    reg.on_refused(a)
    assert reg.pick_decode(1) is None
    reg.on_released(a, 1, ticket)
    assert reg.pick_decode(1) is a


def test_short_requests_alternate_though_one_worker_just_reported():
    # Serial requests that end before the next heartbeat: a's heartbeat must not make b look fuller
    # than it is, or every request would go to a.
    reg, _ = make_registry()
    a = reg.register(WorkerRole.DECODE, "127.0.0.1:7001", FP, cap(free=8, total=8))
    b = reg.register(WorkerRole.DECODE, "127.0.0.1:7002", FP, cap(free=8, total=8))
    picks = []
    for _ in range(6):
        w = reg.pick_decode(1)
        ticket = reg.on_reserved(w, 1)
        picks.append(w.worker_id)
        reg.on_released(w, 1, ticket)
        reg.heartbeat(a.worker_id, cap(free=8, total=8))
    assert picks.count(a.worker_id) == 3 and picks.count(b.worker_id) == 3
    # A reservation from before a heartbeat is in the worker's own figure: released, it waits for the next.
    ticket = reg.on_reserved(b, 2)
    reg.heartbeat(b.worker_id, cap(free=6, total=8))
    reg.on_released(b, 2, ticket)
    assert b.free_blocks_estimate == 6


def test_pick_prefill_by_queued_tokens():
    reg, _ = make_registry()
    p1 = reg.register(WorkerRole.PREFILL, "127.0.0.1:7001", FP, cap(queued=500))
    p2 = reg.register(WorkerRole.PREFILL, "127.0.0.1:7002", FP, cap(queued=100))
    assert reg.pick_prefill() is p2
    reg.on_prefill_sent(p2, 1000)  # the router's own sends count before the next heartbeat
    assert reg.pick_prefill() is p1


def test_draining_workers_get_no_new_requests():
    reg, _ = make_registry()
    d = reg.register(WorkerRole.DECODE, "127.0.0.1:7001", FP, cap())
    assert reg.deregister(d.worker_id, draining=True)
    assert reg.pick_decode(1) is None and d.worker_id in reg.workers
    assert reg.deregister(d.worker_id, draining=False) and not reg.workers


def test_max_model_len_is_the_smallest_workers():
    reg, _ = make_registry()
    assert reg.max_model_len is None
    reg.register(WorkerRole.DECODE, "127.0.0.1:7001", FP, cap())
    reg.register(WorkerRole.PREFILL, "127.0.0.1:7002", KVFingerprint(**{**FP.__dict__, "max_model_len": 2048}), cap())
    assert reg.max_model_len == 2048
