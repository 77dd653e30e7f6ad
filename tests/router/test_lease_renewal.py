"""A decode reservation outlives a prefill backlog: while a prompt waits behind others on a real prefill
worker, the router renews its lease, so with a lease far shorter than the backlog nothing expires and
nothing is retried; and once renewals stop (the request is gone) the blocks still come back."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from kvferry.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from real_workers import registered, start_decode_and_prefill
from waiting import wait_until

LEASE_S = 1.0


@pytest.fixture
def cluster(model_path, start_router):
    from kvferry.decode_worker.worker import DecodeWorkerConfig

    router = start_router()
    # Chunks of 128 tokens: three prompts of ~600 take a dozen prefill steps, seconds on this box.
    config = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=256),
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=128, max_model_len=2048))
    decode, prefill = start_decode_and_prefill(config, DecodeWorkerConfig(lease_s=LEASE_S))
    with decode, prefill, registered(router.grpc_address, decode, prefill):
        yield router, prefill.worker, decode.worker


def test_a_prompt_queued_longer_than_the_lease_keeps_its_reservation(cluster):
    router, prefill, decode = cluster
    prompts = [list(range(1000 + 700 * i, 1600 + 700 * i)) for i in range(3)]

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=router.url, timeout=120) as client:
            return await asyncio.gather(*(
                client.post("/v1/completions", json={"prompt": p, "max_tokens": 2, "temperature": 0}) for p in prompts
            ))

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 3, [r.text for r in responses]
    stats = decode.stats()
    assert stats.leases_expired_total == 0
    assert stats.kv_transfers_total == 3  # each prompt's KV came from the prefill worker, none retried
    metrics = httpx.get(router.url + "/metrics").text
    assert 'kvferry_router_migrations_total{cause="prefill_worker"} 0.0' in metrics
    assert wait_until(lambda: decode.engine.block_manager.num_used_blocks == 0)
