"""Structured output through the official openai client against a real router and real workers (the
default model) on loopback: response_format json_schema (20 prompts at once, each answer validated
against its schema) and json_object, tool calls (named, required, auto; whole and streamed), the
gRPC Generate grammar, a request cut by max_tokens mid-JSON, and invalid response_format / tools as
400s naming the parameter. Disaggregated: the prefill worker masks the first token, the decode worker
the rest; colocated: one worker masks all of them.
"""

from __future__ import annotations

import asyncio
import json

import grpc
import jsonschema
import openai
import pytest

from kvferry.proto import generate_pb2, generate_pb2_grpc
from kvferry.router.admission import AdmissionConfig
from real_workers import registered

CITY = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 24},
    "country": {"type": "string", "maxLength": 24},
    "population_millions": {"type": "integer", "minimum": 0, "maximum": 50},
    "is_capital": {"type": "boolean"},
}, "required": ["city", "country", "population_millions", "is_capital"], "additionalProperties": False}
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "mood": {"enum": ["happy", "sad", "calm"]},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
}, "required": ["name", "age", "mood", "hobbies"], "additionalProperties": False}
PROMPTS = [
    (CITY, "Describe Paris."), (CITY, "Tell me about Tokyo."), (CITY, "What do you know about Lagos?"),
    (CITY, "Give facts on the capital of Canada."), (CITY, "Berlin, please."), (CITY, "A small town in Peru."),
    (CITY, "Which city has the Colosseum?"), (CITY, "Describe the largest city in Australia."),
    (CITY, "Tell me a joke instead."), (CITY, "Write a haiku about rain."),
    (PERSON, "Invent a character for a novel."), (PERSON, "Describe your best friend."),
    (PERSON, "Who is Sherlock Holmes?"), (PERSON, "Make up a cheerful grandmother."),
    (PERSON, "Describe a sad robot."), (PERSON, "A sleepy cat, as a person."),
    (PERSON, "Tell me about a chef from Naples."), (PERSON, "Give me a pirate captain."),
    (PERSON, "What is two plus two?"), (PERSON, "Summarize the plot of Hamlet."),
]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 24}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 24}},
                   "required": ["zone"], "additionalProperties": False}}}
# Asks for the object's shape: with "List three fruits." alone, greedy decoding on an AVX-512 bf16 CPU
# wrote one ever longer string key and ran past the token limit (valid JSON so far, never closed).
FRUITS_AS_JSON = 'Answer in JSON: an object with the key "fruits" and a list of three fruit names.'
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


def _router(start_router):
    # 20 requests at once queue behind a batch of 8: give them time rather than a 503.
    return start_router(admission=AdmissionConfig(max_waiting=64, timeout_s=120.0, poll_s=0.05))


@pytest.fixture
def disaggregated(start_router, decode_and_prefill):
    router = _router(start_router)
    with registered(router.grpc_address, *decode_and_prefill):
        yield router


@pytest.fixture
def colocated(start_router, decode_and_prefill):
    router = _router(start_router)
    with registered(router.grpc_address, decode_and_prefill[0], role="colocated"):
        yield router


def _client(router) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _no_blocks_left(workers) -> bool:
    from waiting import wait_until

    return all(wait_until(lambda w=w: w.worker.engine.block_manager.num_used_blocks == 0, timeout_s=20) for w in workers)


def _format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_json_schema_answers_validate_on_20_prompts(disaggregated, decode_and_prefill):
    client = openai.AsyncOpenAI(base_url=disaggregated.url + "/v1", api_key="unused", max_retries=0, timeout=300)

    async def ask(schema, prompt):
        return await client.chat.completions.create(
            model=disaggregated.service.model.name, messages=[{"role": "user", "content": prompt}],
            response_format=_format(schema), max_completion_tokens=120, temperature=0.7, seed=7)

    async def ask_all():
        try:
            return await asyncio.gather(*(ask(schema, prompt) for schema, prompt in PROMPTS))
        finally:
            await client.close()

    answers = asyncio.run(ask_all())
    for (schema, prompt), answer in zip(PROMPTS, answers):
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", (prompt, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)
    assert _no_blocks_left(decode_and_prefill)


def test_json_object_answer_parses_streamed(colocated):
    stream = _client(colocated).chat.completions.create(
        model=colocated.service.model.name, stream=True, max_completion_tokens=60, temperature=0,
        messages=[{"role": "user", "content": FRUITS_AS_JSON}], response_format={"type": "json_object"})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop", text
    assert isinstance(json.loads(text), dict)


def test_a_named_tool_call_names_the_tool_and_its_arguments_validate(disaggregated, decode_and_prefill):
    answer = _client(disaggregated).chat.completions.create(
        model=disaggregated.service.model.name, max_completion_tokens=60, temperature=0,
        messages=[{"role": "user", "content": "What is the weather like in Oslo?"}],
        tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["get_weather"])
    assert _no_blocks_left(decode_and_prefill)


def test_required_tool_calls_stream_as_deltas(colocated):
    stream = _client(colocated).chat.completions.create(
        model=colocated.service.model.name, max_completion_tokens=80, temperature=0, stream=True,
        messages=[{"role": "user", "content": "What time is it in Tokyo?"}], tools=[WEATHER, TIME],
        tool_choice="required", parallel_tool_calls=False)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or ():
                call = calls.setdefault(delta.index, {"name": "", "arguments": "", "id": None})
                call["id"] = delta.id or call["id"]
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls" and len(calls) == 1  # parallel_tool_calls: false
    call = calls[0]
    assert call["id"].startswith("call_") and call["name"] in SCHEMAS
    jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_a_named_tool_call_streams_its_arguments(colocated):
    stream = _client(colocated).chat.completions.create(
        model=colocated.service.model.name, max_completion_tokens=60, temperature=0, stream=True,
        messages=[{"role": "user", "content": "Weather in Rome?"}], tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    deltas = [d for c in stream for ch in c.choices for d in (ch.delta.tool_calls or ())]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert all(d.index == 0 and d.id is None for d in deltas[1:]) and len(deltas) > 2  # argument pieces
    jsonschema.validate(json.loads("".join(d.function.arguments for d in deltas)), SCHEMAS["get_weather"])


def test_auto_tool_choice_answers_with_text_or_a_valid_call(colocated):
    client = _client(colocated)
    for question in ("What is the weather in Madrid in celsius?", "Say hello."):
        choice = client.chat.completions.create(
            model=colocated.service.model.name, max_completion_tokens=64, temperature=0,
            messages=[{"role": "user", "content": question}], tools=[WEATHER]).choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            for call in choice.message.tool_calls:
                jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        else:
            assert choice.finish_reason in ("stop", "length") and "<tool_call>" not in (choice.message.content or "")


def test_a_conversation_with_tool_results_continues(colocated):
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": -3}'},
    ]
    answer = _client(colocated).chat.completions.create(
        model=colocated.service.model.name, messages=messages, max_completion_tokens=8, temperature=0, tools=[WEATHER],
        tool_choice="none")
    assert answer.choices[0].message.content and answer.usage.prompt_tokens > 30


def test_max_tokens_mid_json_is_finish_reason_length(colocated, decode_and_prefill):
    client = _client(colocated)
    name = colocated.service.model.name
    messages = [{"role": "user", "content": "Describe Paris."}]
    choice = client.chat.completions.create(model=name, messages=messages, response_format=_format(CITY),
                                            max_completion_tokens=5, temperature=0).choices[0]
    assert choice.finish_reason == "length" and choice.message.content.startswith("{")
    with pytest.raises(ValueError):
        json.loads(choice.message.content)
    streamed = list(client.chat.completions.create(model=name, messages=messages, response_format=_format(CITY),
                                                   max_completion_tokens=5, temperature=0, stream=True))
    assert streamed[-1].choices[0].finish_reason == "length"
    cut = client.chat.completions.create(model=name, messages=messages, tools=[WEATHER], tool_choice="required",
                                         max_completion_tokens=4, temperature=0).choices[0]
    assert cut.finish_reason == "length" and not cut.message.tool_calls and cut.message.content
    assert _no_blocks_left(decode_and_prefill)


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "no spaces!", "schema": {}}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "wat"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
])
def test_invalid_response_format_and_tools_are_400_naming_the_parameter(colocated, extra, param):
    with pytest.raises(openai.BadRequestError) as bad:
        _client(colocated).chat.completions.create(
            model=colocated.service.model.name, messages=[{"role": "user", "content": "x"}], max_completion_tokens=2,
            extra_body=extra)
    assert bad.value.status_code == 400 and bad.value.param == param, bad.value.body


def test_grpc_generate_takes_a_grammar(colocated):
    with grpc.insecure_channel(colocated.grpc_address) as channel:
        stub = generate_pb2_grpc.GenerateStub(channel)
        chat = generate_pb2.ChatMessages(messages=[generate_pb2.ChatMessage(role="user", content="Describe Oslo.")])
        response = stub.Generate(generate_pb2.GenerateRequest(chat=chat, sampling=generate_pb2.SamplingParams(
            max_tokens=120, temperature=0, grammar=generate_pb2.Grammar(json_schema=json.dumps(CITY)))), timeout=120)
        assert response.choices[0].finish_reason == generate_pb2.FINISH_REASON_STOP
        jsonschema.validate(json.loads(response.choices[0].text), CITY)
        digits = stub.Generate(generate_pb2.GenerateRequest(prompt="Count:", sampling=generate_pb2.SamplingParams(
            max_tokens=8, temperature=0, grammar=generate_pb2.Grammar(regex="[0-9]{3}"))), timeout=60)
        assert len(digits.choices[0].text) == 3 and digits.choices[0].text.isdigit()
        for grammar, param in ((generate_pb2.Grammar(json_schema='{"type": "strnig"}'), "sampling.grammar.json_schema"),
                               (generate_pb2.Grammar(regex="(("), "sampling.grammar.regex"),
                               (generate_pb2.Grammar(), "sampling.grammar")):
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(generate_pb2.GenerateRequest(prompt="x", sampling=generate_pb2.SamplingParams(
                    max_tokens=2, grammar=grammar)), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and param in err.value.details()
