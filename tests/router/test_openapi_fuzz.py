"""Schemathesis fuzzing of the OpenAI HTTP API, from the OpenAPI schema the router serves, through a real
router (with an API key) and real prefill and decode workers: requests that fit the schema and
requests that break it, on every route. No answer is a 5xx, every answer matches the status codes,
content types and bodies the schema documents, no engine step fails, and afterwards the cluster is
healthy with no worker lost and no KV block in use. The gRPC API has its own fuzzer
(test_generate_fuzz.py)."""

from __future__ import annotations

import collections

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance, response_schema_conformance, status_code_conformance,
)

from kvferry.router.placement import DisaggregationPolicy
from real_workers import assert_unharmed, start_decode_and_prefill

KEY = "sk-fuzz"
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
MAX_PROMPTS = 3  # of a list the schema allows (64): the serving path is fuzzed, not the CPU's patience


def bounded(case, model_name: str):
    """The case, adjusted: mostly the served model (any other name is a 404 before anything else is
    looked at); generation kept to a few tokens a choice and a few choices, as test_generate_fuzz keeps
    it. Values outside the schema's ranges are left alone, so the refusals are fuzzed too."""
    body = case.body
    if not isinstance(body, dict):
        return case
    if isinstance(body.get("model"), str) and len(body["model"]) % 4:
        body["model"] = model_name
    if case.path not in GENERATION_PATHS:
        return case
    # Rules across fields the schema cannot state, repaired so that more requests get served (their
    # refusals are tested in test_router_api.py and test_openai_extras.py).
    if "stream" not in body and len(body) % 2:
        body["stream"] = True  # an optional field the generator seldom sets: half the requests stream
    if body.get("stream_options") is not None and body.get("stream") in (None, False):
        body["stream"] = True
    if body.get("top_logprobs") is not None and body.get("logprobs") in (None, False):
        body["logprobs"] = True
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict) and message.get("content") is None and message.get("role") != "assistant":
                message["content"] = "Hi."  # null content is for assistant messages only
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and 4 < value < 1 << 20:
            body[name] = 1 + value % 4
    if case.path == "/v1/chat/completions" and body.get("max_completion_tokens") is None \
            and body.get("max_tokens") is None:
        body["max_completion_tokens"] = 4  # the default is the whole context
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and 2 < n <= 16:
        body["n"] = 1 + n % 2
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) and len(prompt) <= 64:
        body["prompt"] = prompt[:MAX_PROMPTS]
    return case


@pytest.mark.slow
def test_openapi_fuzz_never_breaks_the_cluster(start_router, caplog):
    decode, prefill = start_decode_and_prefill()
    router = start_router(api_key=KEY, placement=DisaggregationPolicy(mode="auto", local_prefill_max_tokens=16))
    registrations = [decode.register(router.grpc_address), prefill.register(router.grpc_address)]
    schema = schemathesis.openapi.from_url(router.url + "/openapi.json")  # the router's own, as served
    # Every route, valid and invalid, and generation twice as often again (most of its requests the
    # schema allows are still refused by a rule across fields or by the context).
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE),
                      *(schema[path]["POST"].as_strategy() for path in GENERATION_PATHS))
    seen: collections.Counter[tuple[str, int | str]] = collections.Counter()
    auth = {"Authorization": f"Bearer {KEY}"}

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    @given(cases.map(lambda case: bounded(case, router.service.model.name)))
    def check(case) -> None:
        response = case.call(base_url=router.url, headers=auth, timeout=60)
        seen[(case.path, response.status_code)] += 1
        if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):  # a list per header
            seen[(case.path, "streamed")] += 1
        assert response.status_code < 500, f"{response.status_code} {response.text[:300]} for {case.body!r:.300}"
        if response.status_code == 400:  # refused by the router, naming the parameter if the body parsed
            error = response.json()["error"]
            assert error["param"] or error["code"] == "invalid_json" or "JSON object" in error["message"], error
        case.validate_response(response, checks=[status_code_conformance, content_type_conformance,
                                                 response_schema_conformance], headers=auth)

    try:
        check()
        statuses = collections.Counter(status for _, status in seen.elements())
        assert all(seen[(path, "streamed")] >= 2 for path in GENERATION_PATHS), sorted(seen.items(), key=str)
        # Both paths were fuzzed: generation served, and refused with a 400 naming the parameter.
        assert all(seen[(path, 200)] >= 3 for path in GENERATION_PATHS) and statuses[400] >= 40, dict(seen)
        assert len({path for path, _ in seen}) >= 8, dict(seen)  # every route was reached
        assert_unharmed(router.url, (decode, prefill), caplog.records)
    finally:
        for registration in registrations:
            registration.stop()
        prefill.stop()
        decode.stop()
