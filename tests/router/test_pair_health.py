"""The circuit breaker per (prefill, decode) pair (router/pair_health.py), on a clock the test moves, and
how the registry's picks follow it: after the limit of KV-transfer failures in a row a pair gets no
prompts for a cool-down that doubles each time it fails again, and one success forgets it all."""

from __future__ import annotations

import pytest

from kvferry.common.fingerprint import KVFingerprint
from kvferry.common.worker import WorkerRole, WorkerStats
from kvferry.router.pair_health import PairHealth, PairHealthConfig, transfer_failure_reason
from kvferry.router.registry import RegistryConfig, WorkerRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_limit_excludes_a_pair_for_a_cool_down_that_doubles_up_to_its_cap():
    clock = Clock()
    pairs = PairHealth(PairHealthConfig(failure_limit=2, cooldown_s=5, max_cooldown_s=12), clock)
    assert not pairs.record_failure("p1", "prefill-1", "d1", "decode-1", "unavailable")
    assert not pairs.excluded("p1", "d1")  # one failure is not yet a pattern
    assert pairs.record_failure("p1", "prefill-1", "d1", "decode-1", "unavailable")
    assert pairs.excluded("p1", "d1") and not pairs.excluded("p1", "d2") and not pairs.excluded("p2", "d1")
    assert pairs.cooldown_s("p1", "d1") == 5
    # A request placed before the exclusion fails meanwhile: counted, the cool-down stays as it was.
    assert not pairs.record_failure("p1", "prefill-1", "d1", "decode-1", "deadline")
    assert pairs.cooldown_s("p1", "d1") == 5
    [excluded] = pairs.excluded_pairs()
    assert (excluded.prefill, excluded.decode, excluded.reason, excluded.failures) == (
        "prefill-1", "decode-1", "deadline", 3)
    clock.now += 5
    assert not pairs.excluded("p1", "d1") and not pairs.excluded_pairs()  # tried again
    assert pairs.record_failure("p1", "prefill-1", "d1", "decode-1", "unavailable")  # one failure is enough now
    assert pairs.cooldown_s("p1", "d1") == 10
    clock.now += 10
    assert pairs.record_failure("p1", "prefill-1", "d1", "decode-1", "unavailable")
    assert pairs.cooldown_s("p1", "d1") == 12  # capped
    assert pairs.failures_total == {("prefill-1", "decode-1", "unavailable"): 4, ("prefill-1", "decode-1", "deadline"): 1}


def test_one_success_resets_the_pair():
    clock = Clock()
    pairs = PairHealth(PairHealthConfig(failure_limit=2, cooldown_s=5), clock)
    for _ in range(2):
        pairs.record_failure("p1", "prefill-1", "d1", "decode-1", "unavailable")
    clock.now += 5
    pairs.record_success("p1", "d1")
    assert not pairs.record_failure("p1", "prefill-1", "d1", "decode-1", "unavailable")  # counting from zero
    assert pairs.record_failure("p1", "prefill-1", "d1", "decode-1", "unavailable")
    assert pairs.cooldown_s("p1", "d1") == 5  # the first cool-down again, not a doubled one


def test_a_limit_of_zero_never_excludes():
    pairs = PairHealth(PairHealthConfig(failure_limit=0), Clock())
    for _ in range(5):
        assert not pairs.record_failure("p1", "prefill-1", "d1", "decode-1", "unavailable")
    assert not pairs.excluded("p1", "d1")
    assert pairs.failures_total[("prefill-1", "decode-1", "unavailable")] == 5


def test_bad_settings_are_refused():
    for bad in ({"failure_limit": -1}, {"cooldown_s": 0}, {"cooldown_s": 90, "max_cooldown_s": 60}):
        with pytest.raises(ValueError):
            PairHealthConfig(**bad)


@pytest.mark.parametrize("message, reason", [
    ("unavailable: KV handshake with 127.0.0.2:5: UNAVAILABLE: failed to connect", "unavailable"),  # a Prefill's details
    ("incompatible: KV fingerprint mismatch with 10.0.0.2:5: dtype: float32 != bfloat16", "incompatible"),
    ("deadline: no acknowledgement within 30s", "deadline"),
    ("KV transfer failed: corrupt: layer 3 checksum differs", "corrupt"),  # a decode worker's error event
    ("aborted: sender aborted: the caller went away", None),  # either side gave up: not the link
    ("not_found: no reservation for r1", None),  # the lease ran out, not the link
    ("Socket closed", None),  # the prefill worker itself went away: a lost worker, not a pair
    ("KV push to 127.0.0.1:1 failed: connection refused", None),  # no transport code: not counted
])
def test_the_reason_is_read_from_the_transports_code(message, reason):
    assert transfer_failure_reason(message) == reason


def registry_with(clock: Clock) -> WorkerRegistry:
    registry = WorkerRegistry(RegistryConfig(pairs=PairHealthConfig(failure_limit=1, cooldown_s=5)), clock=clock)
    fingerprint = KVFingerprint(model_name="m", dtype="float32", block_size=16, num_layers=2, num_kv_heads=1,
                                head_dim=8)
    stats = WorkerStats(total_kv_blocks=64, free_kv_blocks=64)
    for role, port in ((WorkerRole.DECODE, 1), (WorkerRole.DECODE, 2), (WorkerRole.PREFILL, 3), (WorkerRole.PREFILL, 4)):
        registry.register(role, f"127.0.0.1:{port}", fingerprint, stats, name=f"{role.name.lower()}-{port}")
    return registry


def test_the_registry_picks_only_prefill_workers_whose_kv_reaches_the_decode_worker():
    clock = Clock()
    registry = registry_with(clock)
    d1, d2, p3, p4 = registry.workers.values()
    pairs = registry.pairs
    pairs.record_failure(p3.worker_id, p3.name, d1.worker_id, d1.name, "unavailable")
    assert registry.pick_prefill(decode=d1) is p4
    assert registry.pick_prefill(decode=d2) is p3  # p3 -> d2 is fine
    pairs.record_failure(p4.worker_id, p4.name, d1.worker_id, d1.name, "unavailable")
    assert registry.pick_prefill(decode=d1) is None and registry.reachable_prefill(d1) == []
    assert registry.reachable_prefill(None) == [p3, p4]  # each still serves other decode workers
    clock.now += 5
    assert registry.pick_prefill(decode=d1) is p3  # the cool-down is over: tried again
    registry.deregister(d1.worker_id, draining=False)
    assert not pairs._pairs  # a worker that left takes its pairs with it
