"""Tool calling as plain data: the prompt, the grammar each tool_choice gets, and the parser, whole and
streamed in arbitrary pieces (the model rarely chooses a call by itself under auto, so the auto parser
is checked here on text that has them)."""

from __future__ import annotations

import json

import pytest

from kvferry.router.openai_models import NamedToolChoice, Tool
from kvferry.router.openai_tools import ToolCallStream, ToolError, tool_calling

WEATHER = Tool.model_validate({"type": "function", "function": {
    "name": "get_weather", "description": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
PING = Tool.model_validate({"type": "function", "function": {"name": "ping"}})  # no parameters
WEATHER_CHOICE = NamedToolChoice.model_validate({"type": "function", "function": {"name": "get_weather"}})
AUTO_TEXT = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>')


def _streamed(calling, text: str, piece: int) -> tuple[str, list[dict]]:
    stream = ToolCallStream(calling)
    deltas = [stream.feed(text[i : i + piece]) for i in range(0, len(text), piece)] + [stream.finish()]
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for c in d.get("tool_calls", ()):
            call = calls.setdefault(c["index"], {"name": "", "arguments": ""})
            call["name"] += c["function"].get("name") or ""
            call["arguments"] += c["function"].get("arguments") or ""
    return content, [calls[i] for i in sorted(calls)]


def test_the_prompt_lists_every_tool_in_hermes_format():
    prompt = tool_calling([WEATHER, PING], "auto", None).system_prompt()
    listed = prompt.split("<tools>\n")[1].split("\n</tools>")[0].splitlines()
    assert [json.loads(line)["function"]["name"] for line in listed] == ["get_weather", "ping"]
    assert json.loads(listed[1])["function"]["parameters"] == {"type": "object", "properties": {},
                                                              "additionalProperties": False}
    assert "<tool_call>" in prompt


@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
def test_auto_output_parses_whole_and_streamed_alike(piece):
    calling = tool_calling([WEATHER, PING], None, None)
    assert calling.mode == "auto" and calling.grammar().kind == "lark"
    parsed = calling.parse(AUTO_TEXT)
    assert parsed.content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [("get_weather", {"city": "Oslo"}),
                                                                             ("ping", {})]
    content, calls = _streamed(calling, AUTO_TEXT, piece)
    assert content.strip() == "Let me check."
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Oslo"}), ("ping", {})]


@pytest.mark.parametrize("text", ["Just text, no call. A < sign and <tool", 'Cut: <tool_call>\n{"name": "get_weather"'])
def test_auto_text_without_a_complete_call_is_content(text):
    calling = tool_calling([WEATHER], "auto", None)
    assert calling.parse(text).content == text and not calling.parse(text).tool_calls
    content, calls = _streamed(calling, text, 4)
    assert content == text and not calls


def test_required_and_named_output_parse_whole_and_streamed():
    required = tool_calling([WEATHER, PING], "required", False)
    assert json.loads(required.grammar().source)["maxItems"] == 1
    text = '[{"name": "ping", "arguments": {}}]'
    assert [c.name for c in required.parse(text).tool_calls] == ["ping"]
    assert _streamed(required, text, 5)[1] == [{"name": "ping", "arguments": "{}"}]
    named = tool_calling([WEATHER, PING], WEATHER_CHOICE, None)
    assert json.loads(named.grammar().source) == WEATHER.function.parameters
    assert _streamed(named, '{"city": "Rome"}', 3) == ("", [{"name": "get_weather", "arguments": '{"city": "Rome"}'}])
    cut = named.parse('{"city": "Ro')  # cut by max_tokens: no call, the text is the content
    assert cut.content == '{"city": "Ro' and not cut.tool_calls


@pytest.mark.parametrize("tools, choice, param", [
    ([WEATHER, WEATHER], "auto", "tools[1].function.name"),
    ([], "required", "tool_choice"),
    ([Tool.model_validate({"type": "function", "function": {"name": "f", "parameters": {"type": "wat"}}})], "auto",
     "tools[0].function.parameters"),
])
def test_bad_tools_name_the_parameter(tools, choice, param):
    with pytest.raises(ToolError) as err:
        tool_calling(tools, choice, None)
    assert err.value.param == param
