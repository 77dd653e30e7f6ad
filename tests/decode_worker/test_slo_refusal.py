"""A local prefill whose TTFT budget is spent is refused on the decode worker's stream: RESOURCE_EXHAUSTED
with the refusal metadata the router turns into a 429, counted in GetStats, its blocks returned; with
budget to spare the same prompt streams."""

from __future__ import annotations

import grpc
import pytest

from kvferry.proto import generate_pb2, worker_pb2, worker_pb2_grpc
from kvferry.proto.convert import refusal_from_metadata

GREEDY = generate_pb2.SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
PROMPT = list(range(300, 500))  # 200 tokens


@pytest.fixture
def stub(decode_worker):
    from kvferry.decode_worker.service import create_decode_server

    server, _, port = create_decode_server(decode_worker, "127.0.0.1", 0)
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield worker_pb2_grpc.DecodeWorkerStub(channel)
    server.stop(grace=None)


def local(stub, request_id: str, budget_ms: int):
    stub.Reserve(worker_pb2.ReserveRequest(request_id=request_id, prompt_token_ids=PROMPT, sampling=GREEDY,
                                           prefill_locally=True, ttft_budget_ms=budget_ms), timeout=30)
    return list(stub.Stream(worker_pb2.StreamRequest(request_id=request_id), timeout=60))


def test_spent_budget_is_refused_with_retry_after(stub, decode_worker):
    before = stub.GetStats(worker_pb2.StatsRequest(), timeout=10).requests_rejected_total
    with pytest.raises(grpc.RpcError) as info:
        local(stub, "late", budget_ms=1)  # 1 ms: no prompt of 200 tokens is prefilled that fast
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    refusal = refusal_from_metadata(info.value.trailing_metadata(), info.value.details())
    assert refusal is not None and refusal.reason == "slo" and refusal.retry_after_s > 0
    assert "time-to-first-token" in refusal.message
    stats = stub.GetStats(worker_pb2.StatsRequest(), timeout=10)
    assert stats.requests_rejected_total == before + 1

    events = local(stub, "fine", budget_ms=600_000)
    assert sum(len(e.token_ids) for e in events) == 3 and events[-1].finish_reason == "length"
    assert decode_worker.engine.block_manager.num_used_blocks == 0
