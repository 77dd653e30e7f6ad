"""Property-based fuzzing of the gRPC Generate API (hypothesis) through a real router and real prefill and
decode workers: arbitrary prompts, token ids, chat messages and sampling fields (NaN and infinite
floats, out-of-range integers, too many stop strings, unknown models) are answered OK or with a
client error (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED), never INTERNAL or UNKNOWN; no worker
crashes, and afterwards the cluster is healthy with no KV block in use."""

from __future__ import annotations

import collections

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvferry.proto import generate_pb2, generate_pb2_grpc
from kvferry.router.placement import DisaggregationPolicy
from real_workers import assert_unharmed, start_decode_and_prefill

CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
UINT32 = st.integers(0, 2**32 - 1)
# Generations stay short: a handful of tokens, or a count past any context (refused at once).
MAX_TOKENS = st.one_of(st.integers(1, 6), st.integers(1, 6), st.integers(0, 6), st.integers(2**20, 2**32 - 1))
FLOAT = st.floats(width=32, allow_nan=True, allow_infinity=True)
TEXT = st.text(max_size=80)


@st.composite
def sampling(draw) -> generate_pb2.SamplingParams:
    # Each field: absent, in its valid range, or anything its wire type can carry.
    fields = {
        "temperature": (st.floats(0, 2), FLOAT),
        "top_p": (st.floats(0.01, 1), FLOAT),
        "min_p": (st.floats(0, 1), FLOAT),
        "top_k": (st.integers(-1, 50), st.integers(-(2**31), 2**31 - 1)),
        "seed": (st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
        "presence_penalty": (st.floats(-2, 2), FLOAT),
        "frequency_penalty": (st.floats(-2, 2), FLOAT),
        "repetition_penalty": (st.floats(0.5, 2), FLOAT),
        "logprobs": (st.integers(0, 5), UINT32),
        "n": (st.integers(1, 3), UINT32),
    }
    msg = generate_pb2.SamplingParams(max_tokens=draw(MAX_TOKENS))
    for name, (valid, wild) in fields.items():
        choice = draw(st.integers(0, 19))  # mostly valid requests, so the serving path is fuzzed too
        if choice == 0:
            setattr(msg, name, draw(wild))
        elif choice < 8:
            setattr(msg, name, draw(valid))
    if draw(st.integers(0, 5)) == 0:
        msg.stop.extend(draw(st.lists(st.text(max_size=600), max_size=40)))
    else:
        msg.stop.extend(draw(st.lists(st.text(min_size=1, max_size=8), max_size=3)))
    msg.stop_token_ids.extend(draw(st.lists(st.one_of(st.integers(0, 49151), UINT32), max_size=300 if draw(
        st.integers(0, 5)) == 0 else 3)))
    msg.ignore_eos = draw(st.booleans())
    return msg


@st.composite
def requests(draw) -> generate_pb2.GenerateRequest:
    request_id = st.one_of(st.just(""), st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40), TEXT)
    msg = generate_pb2.GenerateRequest(sampling=draw(sampling()), request_id=draw(request_id))
    if draw(st.integers(0, 9)) == 0:
        msg.model = draw(TEXT)
    kind = draw(st.sampled_from(["prompt", "ids", "chat"]))
    if kind == "prompt":
        msg.prompt = draw(st.text(max_size=300, min_size=0 if draw(st.integers(0, 9)) == 0 else 1))
    elif kind == "ids":
        ids = st.one_of(st.integers(0, 49151), UINT32) if draw(st.booleans()) else st.integers(0, 49151)
        msg.prompt_token_ids.ids.extend(draw(st.lists(ids, min_size=0 if draw(st.integers(0, 9)) == 0 else 1,
                                                      max_size=64)))
    else:
        roles = st.one_of(st.sampled_from(["system", "user", "assistant"]), st.sampled_from(["user"]), TEXT)
        for role, content in draw(st.lists(st.tuples(roles, TEXT), min_size=draw(st.sampled_from([0, 1, 1])),
                                           max_size=4)):
            msg.chat.messages.append(generate_pb2.ChatMessage(role=role, content=content))
    return msg


@pytest.mark.slow
def test_generate_fuzz_never_breaks_the_cluster(start_router, caplog):
    decode, prefill = start_decode_and_prefill()
    router = start_router(placement=DisaggregationPolicy(mode="auto", local_prefill_max_tokens=16))
    registrations = [decode.register(router.grpc_address), prefill.register(router.grpc_address)]
    channel = grpc.insecure_channel(router.grpc_address)
    stub = generate_pb2_grpc.GenerateStub(channel)
    seen: collections.Counter[grpc.StatusCode] = collections.Counter()

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(requests())
    def check(request: generate_pb2.GenerateRequest) -> None:
        try:
            stub.Generate(request, timeout=60)
            seen[grpc.StatusCode.OK] += 1
        except grpc.RpcError as exc:
            seen[exc.code()] += 1
            assert exc.code() in CLIENT_ERRORS, f"{exc.code().name}: {exc.details()} for {request}"

    try:
        check()
        # Both paths were fuzzed: served requests, and refused ones.
        assert seen[grpc.StatusCode.OK] >= 20 and seen[grpc.StatusCode.INVALID_ARGUMENT] >= 20, dict(seen)
        assert_unharmed(router.url, (decode, prefill), caplog.records)
    finally:
        channel.close()
        for registration in registrations:
            registration.stop()
        prefill.stop()
        decode.stop()
