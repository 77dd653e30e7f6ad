"""The router end to end over HTTP and gRPC, against scripted workers on loopback (no model).

What the scripted decode worker streams is known, so each test checks the router's own job: OpenAI
shapes, SSE, usage, stop strings, n, logprobs, validation, placement, queueing, aborts on disconnect.
"""

from __future__ import annotations

import json
import re
import threading

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvferry.proto import generate_pb2, generate_pb2_grpc, router_pb2
from kvferry.router.admission import AdmissionConfig
from kvferry.router.dispatch import DispatchConfig
from waiting import wait_until
from router_test_workers import ScriptedDecode, ScriptedPrefill, WorkerProcess

TEXT = " The quick brown fox jumps over the lazy dog."
DECODE, PREFILL = router_pb2.WORKER_ROLE_DECODE, router_pb2.WORKER_ROLE_PREFILL


class Cluster:
    def __init__(self, router, served_model, num_decode=1, total_blocks=64, token_delay=0.0,
                 repeat_first=False, num_prefill=1, prefill_answer_delay=0.0, reserve_delay=0.0):
        self.router = router
        self.model = served_model
        self.script = served_model.tokenizer.encode(TEXT, add_special_tokens=False) + [2]
        self.decoders = {}
        self.workers = []
        for _ in range(num_decode):
            d = ScriptedDecode(self.script, total_blocks=total_blocks, token_delay=token_delay,
                               repeat_first=repeat_first, reserve_delay=reserve_delay)
            w = WorkerProcess(d, DECODE, router.grpc_address)
            self.decoders[w.address] = d
            self.workers.append(w)
        self.prefills = [ScriptedPrefill(self.decoders, answer_delay=prefill_answer_delay) for _ in range(num_prefill)]
        for p in self.prefills:
            self.workers.append(WorkerProcess(p, PREFILL, router.grpc_address))
        for w in self.workers:
            w.register()

    @property
    def decode(self) -> ScriptedDecode:
        return next(iter(self.decoders.values()))

    def stop(self):
        for w in self.workers:
            w.stop()


@pytest.fixture
def cluster(start_router, served_model, request):
    params = dict(getattr(request, "param", {}))
    router_overrides = params.pop("router", {})
    c = Cluster(start_router(**router_overrides), served_model, **params)
    yield c
    c.stop()


def post(c: Cluster, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(c.router.url + path, content=content, headers={"content-type": "application/json"},
                      timeout=30, **kw)


# --- OpenAI HTTP -------------------------------------------------------------------------------------


def test_completion_text_usage_and_finish(cluster):
    r = post(cluster, "/v1/completions", {"model": cluster.model.name, "prompt": "Say it:", "max_tokens": 50})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == cluster.model.name
    assert body["choices"][0]["text"] == TEXT  # EOS text trimmed
    assert body["choices"][0]["finish_reason"] == "stop"
    prompt_len = len(cluster.model.tokenizer.encode("Say it:"))
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": len(cluster.script),
                             "total_tokens": prompt_len + len(cluster.script),
                             "prompt_tokens_details": {"cached_tokens": 0}}  # scripted workers report no hits
    assert wait_until(lambda: cluster.decode.used_blocks == 0)


def test_max_tokens_gives_length(cluster):
    body = post(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 3}).json()
    assert "choices" in body, body
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["text"] == cluster.model.tokenizer.decode(cluster.script[:3])
    assert body["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("cluster", [{"repeat_first": True}], indirect=True)
def test_duplicate_first_token_from_decode_is_dropped(cluster):
    body = post(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 50}).json()
    assert body["choices"][0]["text"] == TEXT


@pytest.mark.parametrize("cluster", [{"prefill_answer_delay": 0.3}], indirect=True)
def test_decode_finishing_before_prefill_answers_keeps_every_token(cluster):
    # The decode stream ends (finish event) before the first token arrives from Prefill.
    body = post(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 3}).json()
    assert body["choices"][0]["text"] == cluster.model.tokenizer.decode(cluster.script[:3])


def test_stop_string_cuts_text_and_aborts_on_the_worker(cluster):
    body = post(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 50, "stop": ["fox"]}).json()
    assert body["choices"][0]["text"] == " The quick brown "
    assert body["choices"][0]["finish_reason"] == "stop"
    assert wait_until(lambda: cluster.decode.aborted and cluster.decode.used_blocks == 0)


def test_streaming_sse_chunks_and_usage(cluster):
    body = {"prompt": "x", "max_tokens": 50, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", cluster.router.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == TEXT
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(cluster.script)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"


def test_openai_client_chat_completions_streaming_n_and_logprobs(cluster):
    client = openai.OpenAI(base_url=cluster.router.url + "/v1", api_key="none", timeout=30, max_retries=0)
    model = client.models.list().data[0].id
    assert model == cluster.model.name
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=40)
    assert chat.choices[0].message.content == TEXT and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == len(cluster.script)
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=40, stream=True, stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
    assert "".join(parts) == TEXT and usage.completion_tokens == len(cluster.script)
    many = client.completions.create(model=model, prompt="x", max_tokens=5, n=3, logprobs=2)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    first = many.choices[0]
    assert len(first.logprobs.tokens) == 5 and len(first.logprobs.top_logprobs[0]) == 2
    assert many.usage.completion_tokens == 15
    lp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=3, logprobs=True, top_logprobs=2)
    content = lp.choices[0].logprobs.content
    assert len(content) == 3 and len(content[0].top_logprobs) == 2 and content[0].logprob == -0.5


@pytest.mark.parametrize(
    "body, param",
    [
        ("{not json", None),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": -3}, "max_tokens"),
        ({"prompt": "x", "temperature": 3.5}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "logprobs": 50}, "logprobs"),
        ({"prompt": "x", "stop": ["s"] * 10_000}, "stop"),
        ({"prompt": "x", "stop_token_ids": list(range(1_000_000))}, "stop_token_ids"),
        ({"prompt": "word " * 9000}, "prompt"),
        ({"prompt": "x", "max_tokens": 9000}, "max_tokens"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [99999999]}, "prompt"),
        ({"max_tokens": 3}, "prompt"),
        ([1, 2], None),
    ],
)
def test_bad_completion_requests_get_400(cluster, body, param):
    r = post(cluster, "/v1/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "presence_penalty": 9}, "presence_penalty"),
    ],
)
def test_bad_chat_requests_get_400(cluster, body, param):
    r = post(cluster, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_unknown_model_is_a_404_model_not_found(cluster, path):
    body = {"model": "gpt-4", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}
    r = post(cluster, path, body)
    assert r.status_code == 404, r.text
    assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                 "param": "model", "code": "model_not_found"}
    assert cluster.decode.served == []  # refused before placement


def test_unknown_route_is_an_openai_error(cluster):
    r = httpx.get(cluster.router.url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and "error" in r.json()


def test_models_health_metrics(cluster):
    models = httpx.get(cluster.router.url + "/v1/models", timeout=10).json()
    assert models["data"][0]["id"] == cluster.model.name
    health = httpx.get(cluster.router.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["workers"] == {"prefill": 1, "decode": 1, "colocated": 0}
    post(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 4})
    text = httpx.get(cluster.router.url + "/metrics", timeout=10).text
    for name in ("kvferry_router_time_to_first_token_seconds_bucket", "kvferry_router_inter_token_latency_seconds",
                 "kvferry_worker_kv_blocks_used", "kvferry_router_kv_transfer_bytes_total",
                 "kvferry_router_kv_transfer_seconds", "kvferry_router_requests_queued",
                 'kvferry_router_requests_total{api="completions",outcome="ok"}'):
        assert name in text, name


# --- placement, backpressure, aborts ------------------------------------------------------------------


@pytest.mark.parametrize("cluster", [{"token_delay": 0.05}], indirect=True)
def test_client_disconnect_mid_stream_aborts_and_frees_blocks(cluster):
    body = {"prompt": "x", "max_tokens": 50, "stream": True}
    with httpx.stream("POST", cluster.router.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break
        assert cluster.decode.used_blocks > 0
    # the connection is closed here, mid-stream
    assert wait_until(lambda: cluster.decode.aborted and cluster.decode.used_blocks == 0)
    assert wait_until(lambda: cluster.router.service.num_running == 0)


@pytest.mark.parametrize("cluster", [{"router": {"dispatch": DispatchConfig(max_migrations=0)}}], indirect=True)
def test_failed_prefill_without_migrations_is_a_502_and_frees_the_reservation(cluster):
    cluster.prefills[0].fail_with = "KV push to 127.0.0.1:1 failed: connection refused"
    for stream in (False, True):
        r = post(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 5, "stream": stream})
        assert r.status_code == 502, r.text
        assert "connection refused" in r.json()["error"]["message"]
    assert wait_until(lambda: cluster.decode.used_blocks == 0 and len(cluster.decode.aborted) == 2)


def test_failed_prefill_is_retried_on_the_decode_worker_when_no_other_prefill_worker_is_left(cluster):
    # The router's policy here is never to prefill locally; a request moved once is prefilled there anyway.
    cluster.prefills[0].fail_with = "KV push to 127.0.0.1:1 failed: connection refused"
    r = post(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 50})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == TEXT
    assert len(cluster.decode.served) == 2  # the first reservation, then the local retry
    metrics = httpx.get(cluster.router.url + "/metrics").text
    assert 'kvferry_router_migrations_total{cause="prefill_worker"} 1.0' in metrics
    assert 'kvferry_router_prefill_decisions_total{decision="local",reason="prefill_worker_lost"} 1.0' in metrics
    assert wait_until(lambda: cluster.decode.used_blocks == 0)


@pytest.mark.parametrize("cluster", [{"token_delay": 0.05}], indirect=True)
def test_shutdown_lets_in_flight_streams_finish(cluster):
    body = {"prompt": "x", "max_tokens": 50, "stream": True}
    with httpx.stream("POST", cluster.router.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        stopper = threading.Thread(target=cluster.router.stop)
        stopper.start()  # SIGTERM's path: refuse new work, let this stream finish
        rest = [line for line in lines if line.startswith("data: ")]
    stopper.join(20)
    assert rest[-1] == "data: [DONE]"
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in [first, *rest[:-1]])
    assert text == TEXT
    assert not cluster.router.thread.is_alive()
    assert not cluster.decode.aborted


@pytest.mark.parametrize("cluster", [{"token_delay": 0.05}], indirect=True)
def test_client_disconnect_while_non_streaming_aborts(cluster):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(cluster.router.url + "/v1/completions", json={"prompt": "x", "max_tokens": 50}, timeout=0.3)
    assert wait_until(lambda: len(cluster.decode.aborted) == 1 and cluster.decode.used_blocks == 0)


@pytest.mark.parametrize("cluster", [{"total_blocks": 1, "token_delay": 0.02}], indirect=True)
def test_full_decode_worker_makes_requests_queue_not_fail(cluster):
    # One block fits one short request at a time: the others wait in the router's queue and complete.
    results = []

    def one():
        results.append(post(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 10}))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [200] * 4
    assert all(r.json()["choices"][0]["text"] == cluster.model.tokenizer.decode(cluster.script[:10]) for r in results)
    assert len(cluster.decode.served) == 4


def hold_the_only_block(cluster) -> threading.Thread:
    """A 12-token request holding a one-block cluster's only KV block while it streams (join it after)."""
    first = threading.Thread(target=post, args=(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 12}))
    first.start()
    assert wait_until(lambda: cluster.decode.used_blocks == 1)
    return first


@pytest.mark.parametrize("cluster", [{"total_blocks": 1, "token_delay": 0.1, "router": {
    "admission": AdmissionConfig(max_waiting=4, timeout_s=0.5, poll_s=0.05)}}], indirect=True)
def test_queue_timeout_is_a_clear_503(cluster):
    first = hold_the_only_block(cluster)
    r = post(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 12})
    first.join(30)
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] == "no_capacity" and "no decode worker had room within 0.5 s" in error["message"]
    assert "needs 1 KV blocks" in error["message"] and int(r.headers["retry-after"]) >= 1
    # Both limits the worker refuses on (blocks, and sequences as of its last heartbeat) are named.
    assert re.search(r": 0 free, \d+ of \d+ sequences\)", error["message"]), error["message"]


@pytest.mark.parametrize("cluster", [{"total_blocks": 1, "token_delay": 0.1, "router": {
    "admission": AdmissionConfig(max_waiting=0, timeout_s=5, poll_s=0.05)}}], indirect=True)
def test_a_full_admission_queue_is_a_429_with_retry_after_over_http_and_grpc(cluster):
    first = hold_the_only_block(cluster)
    r = post(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 12})
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "overloaded" and "queue is full" in r.json()["error"]["message"]
    with grpc.insecure_channel(cluster.router.grpc_address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            generate_pb2_grpc.GenerateStub(channel).Generate(
                generate_pb2.GenerateRequest(prompt="x", sampling=generate_pb2.SamplingParams(max_tokens=2)), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(dict(info.value.trailing_metadata())["retry-after"]) >= 1
    first.join(30)


# Slow Reserves: a burst's placements overlap, so each must see those still waiting for their answer.
@pytest.mark.parametrize("cluster", [{"num_decode": 2, "num_prefill": 2, "total_blocks": 8, "reserve_delay": 0.2}],
                         indirect=True)
def test_load_is_shared_across_workers(cluster):
    def one():
        post(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 5})

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(len(d.served) >= 2 for d in cluster.decoders.values()), [len(d.served) for d in cluster.decoders.values()]
    assert all(len(p.served) >= 2 for p in cluster.prefills), [len(p.served) for p in cluster.prefills]


@pytest.mark.parametrize("cluster", [{"num_decode": 2, "total_blocks": 1, "token_delay": 0.05}], indirect=True)
def test_a_full_decode_worker_sends_requests_to_another(cluster):
    a, b = cluster.decoders.values()
    a.used_blocks = a.total_blocks  # full, but its last heartbeat may still say otherwise
    for _ in range(2):
        assert post(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 3}).status_code == 200
    assert len(b.served) == 2 and not a.served


def test_silent_worker_is_removed_and_a_new_one_joins(cluster, served_model):
    reg = cluster.router.service.registry
    assert len(reg.workers) == 2
    cluster.workers[0].stopping.set()  # the decode worker stops heartbeating
    assert wait_until(lambda: len(reg.workers) == 1, timeout_s=5)
    r = httpx.get(cluster.router.url + "/health", timeout=10)
    assert r.status_code == 503
    fresh = ScriptedDecode(cluster.script)
    w = WorkerProcess(fresh, DECODE, cluster.router.grpc_address)
    cluster.decoders[w.address] = fresh
    cluster.workers.append(w)
    w.register()
    assert post(cluster, "/v1/completions", {"prompt": "x", "max_tokens": 3}).status_code == 200
    assert len(fresh.served) == 1


def test_incompatible_worker_is_refused_with_the_difference(cluster):
    import kvferry.proto.router_pb2 as rp

    bad = rp.ModelFingerprint()
    bad.CopyFrom(cluster.workers[0].fingerprint)
    bad.dtype, bad.block_size = "bfloat16", 32
    w = WorkerProcess(ScriptedDecode(cluster.script), DECODE, cluster.router.grpc_address, fingerprint=bad)
    try:
        with pytest.raises(grpc.RpcError) as err:
            w.register()
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "dtype: cluster 'float32', worker 'bfloat16'" in err.value.details()
        assert "block_size: cluster 16, worker 32" in err.value.details()
    finally:
        w.stop()


# --- gRPC Generate ------------------------------------------------------------------------------------


def test_grpc_generate_stream_health_and_reflection(cluster):
    with grpc.insecure_channel(cluster.router.grpc_address) as channel:
        stub = generate_pb2_grpc.GenerateStub(channel)
        request = generate_pb2.GenerateRequest(prompt="x", sampling=generate_pb2.SamplingParams(max_tokens=50))
        response = stub.Generate(request, timeout=30)
        assert response.choices[0].text == TEXT
        assert response.choices[0].finish_reason == generate_pb2.FINISH_REASON_STOP
        assert response.usage.completion_tokens == len(cluster.script)
        chunks = list(stub.GenerateStream(request, timeout=30))
        assert "".join(c.text for c in chunks) == TEXT
        assert chunks[-1].usage.completion_tokens == len(cluster.script)
        chat = stub.Generate(generate_pb2.GenerateRequest(
            chat=generate_pb2.ChatMessages(messages=[generate_pb2.ChatMessage(role="user", content="hi")]),
            sampling=generate_pb2.SamplingParams(max_tokens=50, n=2)), timeout=30)
        assert [c.text for c in chat.choices] == [TEXT, TEXT]
        for bad in (
            generate_pb2.GenerateRequest(prompt="x", sampling=generate_pb2.SamplingParams(max_tokens=0)),
            generate_pb2.GenerateRequest(prompt="x", model="nope"),
            generate_pb2.GenerateRequest(prompt="x", sampling=generate_pb2.SamplingParams(temperature=9)),
            generate_pb2.GenerateRequest(chat=generate_pb2.ChatMessages()),
            generate_pb2.GenerateRequest(),
        ):
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(bad, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=5))
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"kvferry.generate.v1.Generate", "kvferry.router.v1.Router", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize("cluster", [{"token_delay": 0.05}], indirect=True)
def test_grpc_cancel_aborts_on_the_worker(cluster):
    with grpc.insecure_channel(cluster.router.grpc_address) as channel:
        stub = generate_pb2_grpc.GenerateStub(channel)
        call = stub.GenerateStream(generate_pb2.GenerateRequest(
            prompt="x", sampling=generate_pb2.SamplingParams(max_tokens=50)), timeout=30)
        next(call)
        next(call)
        call.cancel()
    assert wait_until(lambda: cluster.decode.aborted and cluster.decode.used_blocks == 0)
