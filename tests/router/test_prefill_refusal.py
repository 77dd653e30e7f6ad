"""A prompt that a full prefill worker refuses (NoRoom: RESOURCE_EXHAUSTED) and a second one takes: the
request's abort, its channel and its loss watch follow the worker that holds the prompt. Real workers
(the default model) and a real router; the first prefill worker refuses as one that is shutting down
does, before the router has heard of it (``drain_wait``), and is registered first, so it is picked first.
"""

from __future__ import annotations

import grpc
import httpx
import pytest

from kvferry.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from kvferry.proto import generate_pb2, generate_pb2_grpc
from real_workers import start_decode, start_prefill
from waiting import wait_until

# Chunks of 128 tokens: the prompt below takes a dozen prefill steps, seconds on this box.
SLOW_PREFILL = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=256),
                            scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=128, max_model_len=2048))
LONG_PROMPT = "The history of the printing press is long and complex. " * 120


@pytest.fixture(scope="module")
def workers(model_path):
    refusing, taking, decode = start_prefill(worker_id="prefill-full"), start_prefill(SLOW_PREFILL), start_decode()
    refusing.worker.drain_wait(0)  # refuses every prompt from now on: "the prefill worker is draining"
    started = {"refusing": refusing, "taking": taking, "decode": decode}
    aborts: dict[str, list[str]] = {}
    for name in ("refusing", "taking"):  # every abort that reaches each worker, by request id
        worker = started[name].worker
        aborts[name] = calls = []
        real_abort = worker.abort
        worker.abort = lambda request_id, real_abort=real_abort, calls=calls: calls.append(request_id) or real_abort(
            request_id)
    yield started, aborts
    for w in started.values():
        w.stop()


@pytest.fixture
def cluster(workers, start_router):
    started, aborts = workers
    router = start_router()
    registrations = {name: started[name].register(router.grpc_address, name=f"{name}-1")
                     for name in ("refusing", "taking", "decode")}  # the refusing one first: picked first
    yield router, started, aborts, registrations
    for registration in registrations.values():
        registration.stop()
    for name, aborted in aborts.items():
        aborted.clear()
    for w in started.values():
        assert wait_until(lambda: w.worker.engine.block_manager.num_used_blocks == 0, timeout_s=20)


def prefilling(worker) -> bool:
    """The prompt is in the worker's engine with some of its chunks computed."""
    stats = worker.stats()
    return stats.waiting_requests + stats.running_requests > 0 and worker.engine.block_manager.num_used_blocks > 0


def request() -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(prompt=LONG_PROMPT, sampling=generate_pb2.SamplingParams(max_tokens=4))


def test_a_cancel_mid_prefill_aborts_on_the_worker_that_took_the_prompt(cluster):
    router, started, aborts, _ = cluster
    taking, decode = started["taking"].worker, started["decode"].worker
    with grpc.insecure_channel(router.grpc_address) as channel:
        call = generate_pb2_grpc.GenerateStub(channel).GenerateStream(request(), timeout=120)
        assert wait_until(lambda: prefilling(taking), timeout_s=30)
        call.cancel()
    assert wait_until(lambda: taking.engine.block_manager.num_used_blocks == 0, timeout_s=20)
    assert wait_until(lambda: taking.stats().waiting_requests + taking.stats().running_requests == 0, timeout_s=20)
    assert wait_until(lambda: decode.engine.block_manager.num_used_blocks == 0, timeout_s=20)
    assert aborts["taking"]  # the router's Abort (or its cancelled Prefill) reached the worker holding it
    assert wait_until(lambda: router.service.num_running == 0, timeout_s=10)
    assert not aborts["refusing"], aborts["refusing"]  # the worker that refused holds nothing: no abort for it


def test_a_prefill_worker_that_leaves_mid_prefill_keeps_its_channel_until_the_prompt_is_done(cluster):
    # A worker that deregisters (scale-down) has its channel closed once no request uses it: the
    # request on it counts as a user, so its Prefill is not cut and the request does not move.
    router, started, aborts, registrations = cluster
    taking = started["taking"].worker
    with grpc.insecure_channel(router.grpc_address) as channel:
        future = generate_pb2_grpc.GenerateStub(channel).Generate.future(request(), timeout=60)
        assert wait_until(lambda: prefilling(taking), timeout_s=30)
        registrations.pop("taking").stop()  # deregisters
        response = future.result(timeout=60)
    assert response.usage.completion_tokens == 4
    metrics = httpx.get(router.url + "/metrics", timeout=10).text
    assert 'kvferry_router_migrations_total{cause="prefill_worker"} 0.0' in metrics
    assert not aborts["refusing"]

