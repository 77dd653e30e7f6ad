"""The router's OpenAPI schema and the pydantic models behind it, on a real router with scripted workers:
the schema is served (open even with an API key) and describes every route, its request body and its
security; real responses validate against the response models the schema documents; validation errors
name the parameter the way OpenAI does."""

from __future__ import annotations

import json

import httpx
import pytest

from kvferry.router.auth import OPEN_PATHS
from kvferry.router.openai_models import (
    ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
    DetokenizeResponse, HealthResponse, ModelCard, ModelList, TokenizeResponse, VersionResponse, param_name, validate,
)
from kvferry.proto import router_pb2
from kvferry.router.request import APIError
from router_test_workers import ScriptedDecode, ScriptedPrefill, WorkerProcess

KEY = "sk-schema"
TEXT = " The quick brown fox"


@pytest.fixture
def cluster(start_router, served_model, request):
    router = start_router(api_key=getattr(request, "param", ""))
    decode = ScriptedDecode(served_model.tokenizer.encode(TEXT, add_special_tokens=False) + [2])
    processes = [WorkerProcess(decode, router_pb2.WORKER_ROLE_DECODE, router.grpc_address)]
    processes.append(WorkerProcess(ScriptedPrefill({processes[0].address: decode}), router_pb2.WORKER_ROLE_PREFILL,
                                   router.grpc_address))
    for p in processes:
        p.register()
    yield router
    for p in processes:
        p.stop()


@pytest.mark.parametrize("cluster", [KEY], indirect=True)
def test_schema_is_served_open_and_describes_every_route_body_and_key(cluster):
    r = httpx.get(cluster.url + "/openapi.json", timeout=10)  # no key: a browser on /docs cannot send one
    assert r.status_code == 200, r.text
    schema = r.json()
    paths = schema["paths"]
    assert set(paths) == {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/{model_id}",
                          "/tokenize", "/detokenize", "/version", "/health", "/metrics"}
    components = schema["components"]["schemas"]
    for path, model in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest"),
                        ("/tokenize", "TokenizeRequest"), ("/detokenize", "DetokenizeRequest")):
        body = paths[path]["post"]["requestBody"]
        assert body["required"] and body["content"]["application/json"]["schema"]["$ref"].endswith("/" + model)
        assert model in components
    prompt = components["CompletionRequest"]["properties"]["prompt"]
    assert len(prompt["oneOf"]) == 4 and "prompt" in components["CompletionRequest"]["required"]
    temperature = components["CompletionRequest"]["properties"]["temperature"]["anyOf"][0]
    assert (temperature["minimum"], temperature["maximum"]) == (0, 2)
    roles = components["ChatMessage"]["properties"]["role"]["enum"]
    assert roles == ["system", "user", "assistant", "tool", "developer"]
    refs = json.dumps(schema).count("#/components/schemas/")
    assert refs > 20 and all(ref.split("/")[-1] in components for ref in _refs(schema))  # every $ref resolves
    assert schema["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": "the router's --api-key"}
    for path, operations in paths.items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (path, method)  # invalid input is a 400
            if path in OPEN_PATHS:
                assert "security" not in operation, path
            else:
                assert operation["security"] == [{"apiKey": []}] and "401" in operation["responses"], path
    chat_200 = paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(chat_200) == {"application/json", "text/event-stream"}
    assert {"400", "404", "413", "429", "502", "503", "504"} <= set(paths["/v1/completions"]["post"]["responses"])

    docs = httpx.get(cluster.url + "/docs", timeout=10)
    assert docs.status_code == 200 and "/openapi.json" in docs.text and "swagger" in docs.text.lower()
    assert httpx.get(cluster.url + "/version", timeout=10).status_code == 401  # the API itself still needs it


def test_schema_without_a_key_has_no_security(cluster):
    schema = httpx.get(cluster.url + "/openapi.json", timeout=10).json()
    assert "securitySchemes" not in schema["components"]
    assert not any("security" in op for ops in schema["paths"].values() for op in ops.values())


def _refs(value):
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(value, list):
        for v in value:
            yield from _refs(v)


def _sse(response: httpx.Response) -> list[dict]:
    events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_real_responses_match_the_documented_models(cluster):
    url = cluster.url
    name = cluster.service.model.name

    def post(path, body):
        r = httpx.post(url + path, json=body, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    completion = CompletionResponse.model_validate(post("/v1/completions", {"prompt": "x", "logprobs": 2, "n": 2}))
    assert completion.choices[1].logprobs.tokens and completion.usage.prompt_tokens_details.cached_tokens == 0
    chat = ChatCompletionResponse.model_validate(post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "logprobs": True,
        "top_logprobs": 1, "max_completion_tokens": 8}))
    assert chat.choices[0].message.content and chat.choices[0].logprobs.content[0].top_logprobs
    for path, model, body in (("/v1/completions", CompletionResponse, {"prompt": "x"}),
                              ("/v1/chat/completions", ChatCompletionChunk,
                               {"messages": [{"role": "user", "content": "hi"}], "logprobs": True})):
        with httpx.stream("POST", url + path, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                          timeout=30) as r:
            chunks = [model.model_validate(c) for c in _sse(r)]
        assert chunks[-1].usage.completion_tokens > 0 and not chunks[-1].choices
    assert ModelList.model_validate(httpx.get(url + "/v1/models", timeout=10).json()).data[0].id == name
    assert ModelCard.model_validate(httpx.get(f"{url}/v1/models/{name}", timeout=10).json()).id == name
    tokens = TokenizeResponse.model_validate(post("/tokenize", {"prompt": "hello"})).tokens
    assert DetokenizeResponse.model_validate(post("/detokenize", {"tokens": tokens})).prompt == "hello"
    VersionResponse.model_validate(httpx.get(url + "/version", timeout=10).json())
    assert HealthResponse.model_validate(httpx.get(url + "/health", timeout=10).json()).status == "ok"


@pytest.mark.parametrize(
    "model, body, param, code",
    [
        (CompletionRequest, {}, "prompt", "missing_required_parameter"),
        (CompletionRequest, {"prompt": 5}, "prompt", "invalid_type"),
        (CompletionRequest, {"prompt": []}, "prompt", "invalid_value"),
        (CompletionRequest, {"prompt": [[1, 2], [3, "a"]]}, "prompt[1][1]", "invalid_type"),
        (CompletionRequest, {"prompt": "x", "temperature": True}, "temperature", "invalid_type"),  # not 1
        (CompletionRequest, {"prompt": "x", "temperature": "0.5"}, "temperature", "invalid_type"),  # not coerced
        (CompletionRequest, {"prompt": "x", "stop": [1]}, "stop", "invalid_type"),
        (CompletionRequest, {"prompt": "x", "stop": ["a", ""]}, "stop[1]", "invalid_value"),
        (CompletionRequest, {"prompt": "x", "n": 17}, "n", "invalid_value"),
        # positive, but 0 as the float32 the workers get
        (CompletionRequest, {"prompt": "x", "top_p": 1e-300}, "top_p", "invalid_value"),
        (CompletionRequest, {"prompt": "x", "repetition_penalty": 1e39}, "repetition_penalty", "invalid_value"),
        (CompletionRequest, {"prompt": "x", "stream_options": []}, "stream_options", "invalid_type"),
        (ChatCompletionRequest, {"messages": ["hi"]}, "messages[0]", "invalid_type"),
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content[0].type", "invalid_value"),
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json"}},
         "response_format.type", "invalid_value"),
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], "stream_options": {
            "include_usage": 1}}, "stream_options.include_usage", "invalid_type"),
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
         "max_completion_tokens", "invalid_value"),
    ],
)
def test_validation_errors_name_the_parameter(model, body, param, code):
    with pytest.raises(APIError) as err:
        validate(model, body)
    assert (err.value.param, err.value.code, err.value.status) == (param, code, 400), err.value.message
    assert err.value.message.startswith(param), err.value.message


def test_valid_requests_keep_their_values_and_unknown_fields():
    request = validate(CompletionRequest, {"prompt": [1, 2], "temperature": 1, "stop": [], "service_tier": "auto"})
    assert request.prompt == [1, 2] and request.temperature == 1.0 and request.stop == []
    assert request.model_extra == {"service_tier": "auto"}  # clients send fields this server ignores


def test_param_names_skip_union_members():
    assert param_name(("messages", 0, "content", "objects", 2, "text")) == "messages[0].content[2].text"
    assert param_name(("prompt", "arrays", 1, 0)) == "prompt[1][0]"
    assert param_name(()) is None
