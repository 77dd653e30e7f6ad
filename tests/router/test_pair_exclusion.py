"""A prefill worker whose KV cannot reach one decode worker: real workers (the default model) behind
their gRPC servers, and a real router. The second decode worker advertises a KV address on a host it
does not listen on (127.0.0.2, its server is bound to 127.0.0.1), as a worker behind a firewall or
with a wrong advertised host does: the router reaches it, the prefill worker's handshake is refused.

After ``--pair-failure-limit`` failures in a row the router places no more prompts on that pair (every
request still completes), reports it in ``/health`` and the metrics, and tries it again after the
cool-down; a decode worker no prefill worker can reach prefills prompts itself where the policy allows.
"""

from __future__ import annotations

import httpx
import pytest

from kvferry.router.pair_health import PairHealthConfig
from kvferry.router.placement import DisaggregationPolicy
from kvferry.router.registry import RegistryConfig
from real_workers import start_decode, start_prefill
from waiting import wait_until

COOLDOWN_S = 10.0
UNREACHABLE = 'kvferry_router_pair_failures_total{decode="decode-2",prefill="prefill-1",reason="unavailable"}'


@pytest.fixture(scope="module")
def workers(model_path):
    started = [start_decode(), start_decode(advertise_host="127.0.0.2", worker_id="decode-unreachable"),
               start_prefill()]
    yield started
    for w in started:
        w.stop()


@pytest.fixture
def cluster(workers, start_router, request):
    limit, cooldown_s, policy = request.param
    router = start_router(
        registry=RegistryConfig(heartbeat_interval_s=0.2, lease_s=2.0,
                                pairs=PairHealthConfig(limit, cooldown_s, 4 * cooldown_s)),
        placement=policy,
    )
    good, broken, prefill = workers
    registrations = [good.register(router.grpc_address, name="decode-1"),
                     broken.register(router.grpc_address, name="decode-2"),
                     prefill.register(router.grpc_address, name="prefill-1")]
    yield router, workers
    for registration in registrations:
        registration.stop()
    for w in workers:
        assert wait_until(lambda: w.worker.engine.block_manager.num_used_blocks == 0, timeout_s=20)


def metric(router, name: str) -> float:
    for line in httpx.get(router.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def complete(router, prompt: str) -> None:
    r = httpx.post(router.url + "/v1/completions", timeout=120,
                   json={"prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


def excluded(router) -> list[dict]:
    return httpx.get(router.url + "/health", timeout=10).json()["excluded_pairs"]


def send_until(router, condition, limit: int, prompt: str = "The capital of France is") -> int:
    """Requests one after another until ``condition()``; how many it took (at most ``limit``)."""
    for sent in range(1, limit + 1):
        complete(router, f"{prompt} ({sent})")
        if condition():
            return sent
    raise AssertionError(f"not after {limit} requests")


@pytest.mark.parametrize("cluster", [(2, COOLDOWN_S, DisaggregationPolicy(mode="never"))], indirect=True)
def test_a_pair_that_keeps_failing_gets_no_prompts_until_its_cool_down_ends(cluster):
    router, (good, broken, prefill) = cluster
    # Requests alternate between the decode workers; each on the broken pair fails its transfer and is
    # prefilled again by its decode worker (a moved request may), so every one completes.
    send_until(router, lambda: metric(router, UNREACHABLE) == 2, limit=10)
    [pair] = excluded(router)
    assert (pair["prefill"], pair["decode"], pair["reason"], pair["failures"]) == ("prefill-1", "decode-2",
                                                                                  "unavailable", 2)
    assert metric(router, "kvferry_router_pairs_excluded") == 1
    transfers = good.worker.stats().kv_transfers_total
    for i in range(3):  # the policy allows no local prefill: the prompts go to the decode worker it reaches
        complete(router, f"Once upon a time ({i})")
    assert excluded(router), "the cool-down ended before the check: this machine is too slow for the test"
    assert metric(router, UNREACHABLE) == 2  # none was placed on the broken pair meanwhile
    assert good.worker.stats().kv_transfers_total == transfers + 3
    assert broken.worker.stats().kv_transfers_total == 0

    assert wait_until(lambda: not excluded(router), timeout_s=COOLDOWN_S + 5)
    assert metric(router, "kvferry_router_pairs_excluded") == 0
    send_until(router, lambda: metric(router, UNREACHABLE) == 3, limit=6)  # tried again, and it fails again
    [pair] = excluded(router)
    assert pair["seconds_left"] > COOLDOWN_S  # excluded again at once, for twice as long


@pytest.mark.parametrize("cluster", [(1, 60.0, DisaggregationPolicy(mode="auto", local_prefill_max_tokens=16))],
                         indirect=True)
def test_a_decode_worker_no_prefill_worker_reaches_prefills_itself_where_the_policy_allows(cluster):
    router, (good, broken, prefill) = cluster
    long_prompt = " ".join(["The history of the printing press is long and complex."] * 4)  # > 16 tokens
    send_until(router, lambda: metric(router, UNREACHABLE) == 1, limit=6, prompt=long_prompt)
    decisions = 'kvferry_router_prefill_decisions_total{decision="local",reason="prefill_unreachable"}'
    send_until(router, lambda: metric(router, decisions) >= 1, limit=4, prompt=long_prompt)
    assert metric(router, UNREACHABLE) == 1  # the pair was not tried again within its cool-down
    assert broken.worker.stats().kv_transfers_total == 0
