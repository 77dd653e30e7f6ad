"""10,000 requests through a real router and real prefill and decode workers (the default model, on
loopback), a third of them finished, a third dropped by the client mid-stream and a third cancelled at
a random moment (before placement, mid-Reserve, mid-prefill, mid-stream): afterwards no KV block is in
use on either worker, neither engine holds a request, and the router has nothing in flight."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import time

import httpx
import pytest

from kvferry.engine.config import SchedulerConfig
from kvferry.router.admission import AdmissionConfig
from kvferry.router.placement import DisaggregationPolicy
from real_workers import small_engine_config, start_decode_and_prefill
from waiting import wait_until

# 10,000 requests took ~310 s on one 2-core host and ran past the suite's 600 s default on a host
# ~2.2x slower: its own bound, still finite (pytest-timeout's signal, landing mid-interpreter on
# the default, also broke the next test's imports).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

NUM_REQUESTS = int(os.environ.get("KVFERRY_STORM_REQUESTS", "10000"))
CONCURRENCY = 32
# As many sequences as clients: the storm is about leaks at every moment of a request, and a decode
# batch as wide as the clients runs it ~2x faster than the shared test config's 8 sequences (1,500
# requests: 65 s against 125 s on a 2-core Xeon). Waiting in the router's queue is covered by
# test_admission.py and test_router_api.py (a full decode worker queues, then a clear 503); a cancel
# still lands before placement, mid-Reserve, mid-prefill or mid-stream.
MAX_NUM_SEQS = 32
DEADLINE_S = 1500.0  # the load loop's own bound, inside the test's timeout


@pytest.fixture(scope="module")
def workers():
    config = dataclasses.replace(small_engine_config(), scheduler=SchedulerConfig(
        max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=1024, max_model_len=2048))
    decode, prefill = start_decode_and_prefill(config)
    yield decode, prefill
    prefill.stop()
    decode.stop()


async def one(client: httpx.AsyncClient, rng: random.Random, i: int) -> str:
    prompt = [rng.randrange(100, 40000) for _ in range(rng.choice([2, 5, 12, 24]))]
    body = {"prompt": prompt, "max_tokens": rng.randint(1, 4), "temperature": rng.choice([0, 0.8]),
            "ignore_eos": True}
    kind = ("finish", "drop", "cancel")[i % 3]
    if kind == "finish":
        r = await client.post("/v1/completions", json=body)
        return "ok" if r.status_code == 200 else f"status {r.status_code}: {r.text[:300]}"
    if kind == "drop":  # reads the first event, then closes the connection
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            async for _ in r.aiter_lines():
                break
        return "dropped"
    task = asyncio.ensure_future(client.post("/v1/completions", json=body))
    await asyncio.sleep(rng.uniform(0, 0.05))
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return "cancelled"
    return "ok"


def test_ten_thousand_requests_with_aborts_and_disconnects_leave_nothing_behind(workers, start_router):
    decode, prefill = workers
    # auto: short prompts are prefilled by the decode worker, longer ones by the prefill worker.
    # The default queue timeout (60 s), not the tests' 5 s: a request that does wait (a sequence
    # still held by a request the router has let go of) may wait past 5 s on a slow 2-core host, a
    # 503 counted as a failed request though nothing was lost.
    router = start_router(placement=DisaggregationPolicy(mode="auto", local_prefill_max_tokens=16),
                          admission=AdmissionConfig(max_waiting=64, timeout_s=60.0, poll_s=0.05))
    registrations = [decode.register(router.grpc_address), prefill.register(router.grpc_address)]
    try:
        async def main() -> list[str]:
            rng = random.Random(7)
            limits = httpx.Limits(max_connections=CONCURRENCY * 2)
            async with httpx.AsyncClient(base_url=router.url, timeout=60, limits=limits) as client:
                gate = asyncio.Semaphore(CONCURRENCY)

                async def bounded(i: int) -> str:
                    async with gate:
                        return await one(client, rng, i)

                return await asyncio.wait_for(asyncio.gather(*(bounded(i) for i in range(NUM_REQUESTS))),
                                              DEADLINE_S)

        start = time.monotonic()
        outcomes = asyncio.run(main())
        elapsed = time.monotonic() - start
        assert len(outcomes) == NUM_REQUESTS
        failed = [o for o in outcomes if o.startswith("status")]
        assert not failed, f"{len(failed)} finished requests failed, e.g. {failed[:3]}"
        assert outcomes.count("ok") >= NUM_REQUESTS // 3
        for worker in (decode.worker, prefill.worker):
            engine = worker.engine
            assert wait_until(lambda: engine.block_manager.num_used_blocks == 0 and
                              not engine.has_unfinished_requests(), timeout_s=30), (
                f"{worker.engine.block_manager.num_used_blocks} blocks in use after {elapsed:.0f} s")
            engine.block_manager.check_integrity()
        assert wait_until(lambda: router.service.num_running == 0, timeout_s=10)
    finally:
        for registration in registrations:
            registration.stop()
