"""The OpenAI surface beside generation, through the official openai client, against a real router and
real workers (the default model) on loopback: /tokenize, /detokenize, /version, /v1/models/{id}, the
404 for an unknown model, max_completion_tokens, user, stream_options, and usage's cached_tokens from
the prefix cache of the worker that prefilled (colocated, and a prefill worker's in disaggregation).
"""

from __future__ import annotations

import uuid

import openai
import pytest

import kvferry
from real_workers import registered

# ~300 tokens: many full 16-token blocks, so a repeat finds most of them in the prefix cache.
LONG_TEXT = " ".join(f"Item {i} is a {['red', 'green', 'blue'][i % 3]} box." for i in range(40))


def _client(router) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def colocated(start_router, decode_and_prefill):
    """A router whose one worker prefills and decodes (the decode worker registered as colocated)."""
    router = start_router()
    with registered(router.grpc_address, decode_and_prefill[0], role="colocated"):
        yield router, _client(router)


@pytest.fixture
def disaggregated(start_router, decode_and_prefill):
    """A router sending every prompt to the prefill worker, which pushes its KV to the decode worker."""
    router = start_router()  # the test router's placement is "never": no prompt is prefilled on decode
    with registered(router.grpc_address, *decode_and_prefill):
        yield router, _client(router)


def unique_prompt() -> str:
    # A fresh first block: nothing an earlier test sent can be a prefix of it.
    return f"[{uuid.uuid4().hex}] {LONG_TEXT}"


def test_tokenize_and_detokenize(colocated):
    router, client = colocated
    model = router.service.model
    tokenized = client.post(router.url + "/tokenize", body={"model": model.name, "prompt": "Hello world"},
                            cast_to=object)
    tokens = model.tokenizer.encode("Hello world")
    assert tokenized == {"count": len(tokens), "max_model_len": 2048, "tokens": tokens}  # the worker's context
    detokenized = client.post(router.url + "/detokenize", body={"tokens": tokens}, cast_to=object)
    assert detokenized == {"prompt": "Hello world"}

    # messages go through the chat template: the count is what a chat completion is charged
    messages = [{"role": "user", "content": "Name a color."}]
    chat_tokens = client.post(router.url + "/tokenize", body={"messages": messages}, cast_to=object)
    chat = client.chat.completions.create(model=model.name, messages=messages, max_completion_tokens=1)
    assert chat_tokens["count"] == chat.usage.prompt_tokens == len(chat_tokens["tokens"])
    bare = client.post(router.url + "/tokenize", body={"messages": messages, "add_generation_prompt": False},
                       cast_to=object)
    assert chat_tokens["tokens"][: bare["count"]] == bare["tokens"] and bare["count"] < chat_tokens["count"]

    with pytest.raises(openai.BadRequestError) as bad:
        client.post(router.url + "/detokenize", body={"tokens": [1, 10**9]}, cast_to=object)
    assert bad.value.param == "tokens"
    with pytest.raises(openai.BadRequestError) as bad:
        client.post(router.url + "/tokenize", body={"prompt": 5}, cast_to=object)
    assert bad.value.param == "prompt"
    with pytest.raises(openai.NotFoundError) as missing:
        client.post(router.url + "/tokenize", body={"model": "nope", "prompt": "x"}, cast_to=object)
    assert missing.value.code == "model_not_found"


def test_version_and_model_card(colocated):
    router, client = colocated
    name = router.service.model.name
    assert client.get(router.url + "/version", cast_to=object) == {"version": kvferry.__version__}
    card = client.models.retrieve(name)
    assert card.id == name and card.object == "model" and card.model_extra["max_model_len"] == 2048
    assert [m.id for m in client.models.list()] == [name]
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert missing.value.code == "model_not_found"


def test_unknown_model_is_a_404_model_not_found(colocated):
    router, client = colocated
    for call in (
        lambda: client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}]),
        lambda: client.completions.create(model="gpt-4o", prompt="Hi"),
    ):
        with pytest.raises(openai.NotFoundError) as missing:
            call()
        assert missing.value.status_code == 404
        assert missing.value.code == "model_not_found" and missing.value.param == "model"
    metrics = router.service.metrics.exposition().decode()
    assert 'kvferry_router_requests_total{api="chat",outcome="invalid"} 1.0' in metrics


def test_max_completion_tokens_and_user(colocated):
    router, client = colocated
    name = router.service.model.name
    messages = [{"role": "user", "content": "Count from one to twenty."}]
    chat = client.chat.completions.create(model=name, messages=messages, max_completion_tokens=3,
                                          temperature=0, user="user-1234", extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 3 and chat.choices[0].finish_reason == "length"
    same = client.chat.completions.create(model=name, messages=messages, max_completion_tokens=2, max_tokens=2,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert same.usage.completion_tokens == 2
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=name, messages=messages, max_completion_tokens=2, max_tokens=5)
    assert bad.value.param == "max_completion_tokens" and "max_tokens" in bad.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=name, messages=messages, max_completion_tokens=2, user=7)
    assert bad.value.param == "user"


def test_stream_options_usage_chunk_only_when_asked(colocated):
    router, client = colocated
    name = router.service.model.name
    common = dict(model=name, messages=[{"role": "user", "content": "Say hello."}], max_completion_tokens=4,
                  temperature=0, stream=True, extra_body={"ignore_eos": True})
    plain = list(client.chat.completions.create(**common))
    assert all(c.usage is None and c.choices for c in plain)
    assert "usage" not in plain[0].model_fields_set  # absent, not null, as OpenAI does

    chunks = list(client.chat.completions.create(**common, stream_options={"include_usage": True}))
    *content, last = chunks
    assert all(c.usage is None and c.choices for c in content)
    assert last.choices == [] and last.usage.completion_tokens == 4
    assert last.usage.total_tokens == last.usage.prompt_tokens + 4

    off = list(client.chat.completions.create(**common, stream_options={"include_usage": False}))
    assert all(c.usage is None and c.choices for c in off)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(**{**common, "stream": False}, stream_options={"include_usage": True})
    assert bad.value.param == "stream_options"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(**common, stream_options={"include_usage": "yes"})
    assert bad.value.param == "stream_options.include_usage"


def _cached(usage) -> int:
    return usage.prompt_tokens_details.cached_tokens


def test_cached_tokens_from_a_colocated_worker(colocated, decode_and_prefill):
    router, client = colocated
    name = router.service.model.name
    prompt = unique_prompt()
    first = client.completions.create(model=name, prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model=name, prompt=prompt, max_tokens=2, temperature=0)
    assert _cached(first.usage) == 0
    # every full block but the one holding the last prompt token (it is recomputed for its logits)
    assert 0 < _cached(second.usage) < second.usage.prompt_tokens
    assert _cached(second.usage) % 16 == 0 and _cached(second.usage) >= second.usage.prompt_tokens - 32
    assert second.choices[0].text == first.choices[0].text

    stream = client.completions.create(model=name, prompt=prompt, max_tokens=2, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    usage = [c.usage for c in stream][-1]
    assert _cached(usage) == _cached(second.usage)
    assert decode_and_prefill[0].worker.engine.block_manager.num_used_blocks == 0


def test_cached_tokens_from_the_prefill_worker(disaggregated, decode_and_prefill):
    router, client = disaggregated
    name = router.service.model.name
    messages = [{"role": "user", "content": unique_prompt()}]
    first = client.chat.completions.create(model=name, messages=messages, max_completion_tokens=3, temperature=0)
    second = client.chat.completions.create(model=name, messages=messages, max_completion_tokens=3, temperature=0)
    assert router.service.dispatcher.prefill_decisions[("remote", "never")] >= 2
    # the chat template's system prompt may be cached from earlier chats, the user's text not yet
    assert _cached(first.usage) <= 32
    assert _cached(second.usage) >= second.usage.prompt_tokens - 32
    assert second.choices[0].message.content == first.choices[0].message.content
