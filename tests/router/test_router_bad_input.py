"""Hostile and broken requests at a real router (scripted workers on loopback): each gets a 4xx naming
the problem, never a 500, and nothing reaches a worker; the per-request deadline; client request ids are
echoed but never used to address workers."""

from __future__ import annotations

import json
import threading

import grpc
import httpx
import pytest

from kvferry.proto import generate_pb2, generate_pb2_grpc
from router_test_workers import ScriptedCluster
from waiting import wait_until

TEXT = " The quick brown fox jumps over the lazy dog."


@pytest.fixture
def cluster(start_router, served_model, request):
    params = dict(getattr(request, "param", {}))
    c = ScriptedCluster(start_router(**params.pop("router", {})), served_model, TEXT, **params)
    yield c
    c.stop()


def post(c: ScriptedCluster, path: str, content: bytes | str, headers: dict | None = None) -> httpx.Response:
    return httpx.post(c.router.url + path, content=content,
                      headers={"content-type": "application/json", **(headers or {})}, timeout=30)


@pytest.mark.parametrize(
    "raw, what",
    [
        (b"[" * 100_000 + b"]" * 100_000, "nests deeper"),  # the parser's own recursion limit
        (b'{"prompt": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}", "nests deeper"),  # ours: under the parser's
        (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "digits"),  # over Python's int_max_str_digits
        (b'{"prompt": "x", "temperature": NaN}', "NaN"),
        (b'{"prompt": "x", "temperature": Infinity}', "Infinity"),
        (b'{"prompt": "\\ud800 lone high surrogate"}', "surrogate"),
        (b'{"prompt": "x", "stop": ["\\udfff"]}', "surrogate"),
        (b'{"model": "\\ud800", "prompt": "x"}', "surrogate"),  # would be echoed in the 404's message
        (b'{"\\udc00": 1, "prompt": "x"}', "surrogate"),
        (b'{"prompt": "\xff\xfe not utf-8"}', "not valid JSON"),
        (b'{"prompt": "x",', "not valid JSON"),
    ],
)
def test_malformed_json_is_a_400_invalid_json(cluster, raw, what):
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        r = post(cluster, path, raw)
        assert r.status_code == 400, (path, r.status_code, r.text[:200])
        error = r.json()["error"]
        assert error["code"] == "invalid_json" and what in error["message"], error
    assert cluster.decode.served == []


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "top_k": 10**12}, "top_k"),  # fits JSON and Python, not the int32 on the wire
        ({"prompt": "x", "temperature": 10**400}, "temperature"),  # too large for a float
        ({"prompt": "x", "repetition_penalty": 10**400}, "repetition_penalty"),
        ({"prompt": "x", "seed": 2**64}, "seed"),
        ({"prompt": "x", "max_tokens": 10**30}, "max_tokens"),
        ({"prompt": "x", "n": 10**30}, "n"),
        ({"prompt": "x", "logprobs": 10**30}, "logprobs"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": [10**30]}, "prompt"),
        ({"prompt": "x", "stop_token_ids": [2**40]}, "stop_token_ids"),
        ({"prompt": ["x"] * 65}, "prompt"),  # more prompts than one request may fan out to
        ({"prompt": [[1, 2]] * 65}, "prompt"),
        ({"prompt": ["x"] * 5, "n": 16}, "n"),  # 80 choices
    ],
)
def test_out_of_range_values_are_a_400_naming_the_parameter(cluster, body, param):
    r = post(cluster, "/v1/completions", json.dumps(body))
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["param"] == param, r.json()
    assert cluster.decode.served == []


def test_chat_top_logprobs_over_the_limit_is_a_400(cluster):
    body = {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}
    r = post(cluster, "/v1/chat/completions", json.dumps(body))
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs", r.text


def test_four_choices_of_sixteen_prompts_are_served(cluster):
    r = post(cluster, "/v1/completions", json.dumps({"prompt": ["x"] * 16, "n": 4, "max_tokens": 2}))
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["choices"]) == 64 and len(cluster.decode.served) == 64  # the limit itself is allowed


@pytest.mark.parametrize("cluster", [{"router": {"max_body_bytes": 2000}}], indirect=True)
def test_body_over_the_limit_is_a_413_declared_or_chunked(cluster):
    big = json.dumps({"prompt": "word " * 1000})
    r = post(cluster, "/v1/completions", big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text

    def chunks():  # no Content-Length: counted as it arrives
        for i in range(0, len(big), 500):
            yield big[i:i + 500].encode()

    r = httpx.post(cluster.router.url + "/v1/completions", content=chunks(),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413, r.text
    assert cluster.decode.served == []
    small = post(cluster, "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 50}))
    assert small.status_code == 200 and small.json()["choices"][0]["text"] == TEXT


@pytest.mark.parametrize("cluster", [{"router": {"request_timeout_s": 0.5}, "token_delay": 0.2}], indirect=True)
def test_request_deadline_is_a_504_and_aborts_on_the_workers(cluster):
    body = json.dumps({"prompt": "x", "max_tokens": 50})  # 11 tokens, 0.2 s each: over the 0.5 s deadline
    r = post(cluster, "/v1/completions", body)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
    assert wait_until(lambda: len(cluster.decode.aborted) == 1 and cluster.decode.used_blocks == 0)

    with httpx.stream("POST", cluster.router.url + "/v1/completions", timeout=30,
                      json={"prompt": "x", "max_tokens": 50, "stream": True}) as stream:
        assert stream.status_code == 200  # the first token came in time: the deadline ends the stream
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["code"] == "timeout"
    assert wait_until(lambda: len(cluster.decode.aborted) == 2 and cluster.decode.used_blocks == 0)

    with grpc.insecure_channel(cluster.router.grpc_address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            generate_pb2_grpc.GenerateStub(channel).Generate(
                generate_pb2.GenerateRequest(prompt="x", sampling=generate_pb2.SamplingParams(max_tokens=50)),
                timeout=30)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: len(cluster.decode.aborted) == 3 and cluster.decode.used_blocks == 0)


@pytest.mark.parametrize("cluster", [{"token_delay": 0.02}], indirect=True)
def test_client_request_ids_are_echoed_and_never_sent_to_workers(cluster):
    request = generate_pb2.GenerateRequest(request_id="mine", prompt="x",
                                           sampling=generate_pb2.SamplingParams(max_tokens=50))
    answers = []
    with grpc.insecure_channel(cluster.router.grpc_address) as channel:
        stub = generate_pb2_grpc.GenerateStub(channel)

        def call():
            answers.append(stub.Generate(request, timeout=30))

        threads = [threading.Thread(target=call) for _ in range(2)]  # one id, two requests at once
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert [a.request_id for a in answers] == ["mine", "mine"]
        assert [a.choices[0].text for a in answers] == [TEXT, TEXT]
        assert all(c.request_id == "mine" for c in stub.GenerateStream(request, timeout=30))
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(generate_pb2.GenerateRequest(request_id="x" * 257, prompt="x"), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    r = post(cluster, "/v1/completions", json.dumps({"prompt": "x"}), headers={"x-request-id": "trace-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
    assert len(cluster.decode.served) == 4 and len(set(cluster.decode.served)) == 4
    assert not any(rid in ("mine", "trace-42") for rid in cluster.decode.served), cluster.decode.served
    r = post(cluster, "/v1/completions", json.dumps({"prompt": "x"}), headers={"x-request-id": "a\tb"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Id"


def test_undecodable_grpc_requests_are_invalid_argument(cluster):
    good = generate_pb2.GenerateRequest(prompt="ab", sampling=generate_pb2.SamplingParams(max_tokens=50))
    raw = good.SerializeToString()
    with grpc.insecure_channel(cluster.router.grpc_address) as channel:
        for method in ("Generate", "GenerateStream"):
            call = (channel.unary_stream if method == "GenerateStream" else channel.unary_unary)(
                f"/kvferry.generate.v1.Generate/{method}", request_serializer=None, response_deserializer=None)
            for bad in (raw.replace(b"ab", b"\xff\xfe"), b"\xff\xff\xff"):  # not UTF-8; corrupt wire format
                with pytest.raises(grpc.RpcError) as err:
                    answer = call(bad, timeout=10)
                    list(answer) if method == "GenerateStream" else answer
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            answer = call(raw, timeout=30)  # the same path decodes good requests
            chunks = [generate_pb2.GenerateChunk.FromString(c) for c in answer] if method == "GenerateStream" \
                else [generate_pb2.GenerateResponse.FromString(answer).choices[0]]
            assert "".join(c.text for c in chunks) == TEXT
        with pytest.raises(grpc.RpcError) as err:  # the control plane too
            channel.unary_unary("/kvferry.router.v1.Router/Heartbeat", request_serializer=None,
                                response_deserializer=None)(b"\xff\xff\xff", timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(cluster.decode.served) == 2
