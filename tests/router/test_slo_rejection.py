"""Early rejection through a real router and real prefill and decode workers on loopback (the default
model): with a TTFT target, a prompt the prefill worker cannot finish in time is refused at once with
HTTP 429 + Retry-After (gRPC: RESOURCE_EXHAUSTED + retry-after metadata), counted by the router and the
worker, while a short prompt that can make it is served. The prefill worker plans with a fixed prior of
2 ms a prompt token (this box measures 1.1-1.8 ms with 2 threads), so the verdict does not depend on
the machine's mood."""

from __future__ import annotations

import grpc
import httpx
import pytest

from kvferry.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from kvferry.engine.profiles import PROFILES
from kvferry.engine.step_time import SCALES, StepTimeModel
from kvferry.proto import generate_pb2, generate_pb2_grpc
from kvferry.router.dispatch import DispatchConfig
from real_workers import registered, start_decode_and_prefill
from waiting import wait_until

TTFT_MS = 1000
LONG = list(range(1000, 2500))  # 1500 tokens: ~3 s predicted, even 0.75 x that misses 1 s
PRIOR_COSTS = (0.020, 0.001, 0.002, 1e-6, 2e-7, 0.0)  # s per: step, decode row, prompt token, context token, pair,
# mixed step


@pytest.fixture
def cluster(model_path, start_router):
    router = start_router(dispatch=DispatchConfig(ttft_slo_ms=TTFT_MS))
    config = EngineConfig(
        dtype="bfloat16", cache=CacheConfig(block_size=16, num_blocks=160),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=2048, max_model_len=2048,
                                  profile=PROFILES["latency"]),
    )
    decode, prefill = start_decode_and_prefill(
        config, prefill_step_model=StepTimeModel(prior=tuple(c * s for c, s in zip(PRIOR_COSTS, SCALES))))
    with decode, prefill, registered(router.grpc_address, decode, prefill):
        yield router, prefill.worker, decode.worker


def test_over_slo_prompt_gets_429_with_retry_after_while_a_short_one_is_served(cluster):
    router, prefill, decode = cluster
    with httpx.Client(base_url=router.url, timeout=60) as client:
        refused = client.post("/v1/completions", json={"prompt": LONG, "max_tokens": 2, "temperature": 0})
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        error = refused.json()["error"]
        assert error["code"] == "slo_rejected" and "time-to-first-token" in error["message"]

        served = client.post("/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 4,
                                                      "temperature": 0})
        assert served.status_code == 200, served.text
        assert served.json()["choices"][0]["text"]

        with grpc.insecure_channel(router.grpc_address) as channel:
            with pytest.raises(grpc.RpcError) as info:
                generate_pb2_grpc.GenerateStub(channel).Generate(
                    generate_pb2.GenerateRequest(prompt_token_ids=generate_pb2.TokenIds(ids=LONG),
                                                 sampling=generate_pb2.SamplingParams(max_tokens=2)),
                    timeout=60,
                )
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert int(dict(info.value.trailing_metadata())["retry-after"]) >= 1

        metrics = client.get("/metrics").text
    assert 'kvferry_router_requests_rejected_total{where="prefill_worker"} 2.0' in metrics
    assert prefill.stats().requests_rejected_total == 2
    assert prefill.engine.block_manager.num_used_blocks == 0
    # The router aborts the refused request's reservation in a task of its own, after the 429 went out.
    assert wait_until(lambda: decode.engine.block_manager.num_used_blocks == 0)
