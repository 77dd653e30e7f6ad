"""Conditional disaggregation and phase timings through a real router on loopback, with scripted
workers (router_test_workers.py): which worker prefilled each prompt, the decision counters, and the
``kvferry_timings`` breakdown in bodies, headers, SSE chunks and gRPC trailing metadata. The same with
the real model is tests/cluster/test_placement.py."""

from __future__ import annotations

import json

import grpc
import httpx
import pytest

from kvferry.proto import generate_pb2, generate_pb2_grpc, router_pb2
from kvferry.router.placement import DisaggregationPolicy
from router_test_workers import ScriptedDecode, ScriptedPrefill, WorkerProcess

SHORT = [15] * 20  # token ids: 20 tokens
LONG = list(range(1000, 1200))  # 200 tokens, 12 full blocks


@pytest.fixture
def cluster(start_router, served_model):
    router = start_router(placement=DisaggregationPolicy(local_prefill_max_tokens=32, local_prefill_cached_fraction=0.9))
    script = served_model.tokenizer.encode(" one two three four five", add_special_tokens=False)
    decode = ScriptedDecode(script)
    workers = [WorkerProcess(decode, router_pb2.WORKER_ROLE_DECODE, router.grpc_address)]
    prefill = ScriptedPrefill({workers[0].address: decode})
    workers.append(WorkerProcess(prefill, router_pb2.WORKER_ROLE_PREFILL, router.grpc_address))
    for w in workers:
        w.register()
    yield router, decode, prefill
    for w in workers:
        w.stop()


def complete(router, prompt, **extra) -> httpx.Response:
    r = httpx.post(router.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 4, **extra}, timeout=30)
    assert r.status_code == 200, r.text
    return r


def metric(router, name: str, **labels) -> float:
    text = httpx.get(router.url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            got = dict(kv.split("=", 1) for kv in line[line.find("{") + 1 : line.find("}")].split(",") if kv)
            if all(got.get(k) == json.dumps(v) for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{labels} not in /metrics")


def test_short_and_cached_prompts_are_prefilled_by_the_decode_worker(cluster):
    router, decode, prefill = cluster
    complete(router, SHORT)
    assert decode.served and not prefill.served  # the decode worker prefilled it itself
    complete(router, LONG)
    assert len(prefill.served) == 1  # 200 uncached tokens: a prefill worker's job
    complete(router, LONG)  # now in the decode worker's prefix cache, as the router estimates it
    complete(router, LONG[:150] + [7] * 100)  # 9 of 15 blocks cached: not enough
    assert len(prefill.served) == 2 and len(decode.served) == 4
    assert metric(router, "kvferry_router_prefill_decisions_total", decision="local", reason="short_prompt") == 1
    assert metric(router, "kvferry_router_prefill_decisions_total", decision="local", reason="cached") == 1
    assert metric(router, "kvferry_router_prefill_decisions_total", decision="remote", reason="default") == 2
    assert metric(router, "kvferry_router_prefill_decisions_total", decision="local", reason="prefill_busy") == 0


def test_timings_come_back_in_body_header_stream_and_trailing_metadata(cluster, served_model):
    router, _, _ = cluster
    r = complete(router, LONG)
    timings = r.json()["kvferry_timings"]
    assert {"router_queue", "reserve", "kv_transfer", "first_token", "decode", "e2e"} <= set(timings)
    assert all(v >= 0 for v in timings.values())
    assert timings["router_queue"] + timings["reserve"] <= timings["first_token"] <= timings["e2e"]
    assert timings["first_token"] + timings["decode"] == pytest.approx(timings["e2e"], abs=1e-5)
    header = dict(kv.split("=") for kv in r.headers["x-kvferry-timings"].split(","))
    assert set(header) == set(timings)

    for include_usage in (False, True):
        body = {"prompt": SHORT, "max_tokens": 4, "stream": True}
        if include_usage:
            body["stream_options"] = {"include_usage": True}
        with httpx.stream("POST", router.url + "/v1/completions", json=body, timeout=30) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        assert [("kvferry_timings" in c) for c in chunks] == [False] * (len(chunks) - 1) + [True]
        assert ("usage" in chunks[-1] and chunks[-1]["usage"] is not None) == include_usage
        assert "kv_transfer" not in chunks[-1]["kvferry_timings"]  # prefilled locally: nothing moved

    with grpc.insecure_channel(router.grpc_address) as ch:
        request = generate_pb2.GenerateRequest(prompt_token_ids=generate_pb2.TokenIds(ids=LONG),  # cached now
                                               sampling=generate_pb2.SamplingParams(max_tokens=3))
        _, call = generate_pb2_grpc.GenerateStub(ch).Generate.with_call(request, timeout=30)
        trailing = dict(call.trailing_metadata())
        assert "e2e=" in trailing["x-kvferry-timings"]

    model = served_model.name
    assert metric(router, "kvferry_router_request_phase_seconds_count", model_name=model, phase="e2e") == 4
    assert metric(router, "kvferry_router_request_phase_seconds_count", model_name=model, phase="kv_transfer") == 1
    assert metric(router, "kvferry_router_request_phase_seconds_count", model_name=model, phase="prefill_queue") == 0
