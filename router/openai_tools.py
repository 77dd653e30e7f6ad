"""Tool calling for chat completions: the tools in the prompt, the grammar of a call, and the parser
that turns the output back into OpenAI ``tool_calls`` (whole, or as streamed deltas).

The prompt format is Hermes's (what Qwen2.5's and NousResearch's chat templates render): a system
message lists the tools as JSON inside ``<tools></tools>`` and asks for each call as
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``. It is used for every model, also one
whose template has a tool format of its own (the default model's ChatML template has none), so one
parser serves all. The output is constrained by ``tool_choice``:

- a named function: the output is that function's arguments, a JSON object of its ``parameters``
  schema (the name is known: nothing else to generate);
- ``required``: a JSON array of calls ``{"name", "arguments"}``, each one of the tools (one call only
  with ``parallel_tool_calls: false``);
- ``auto``: free text, in which ``<tool_call>`` starts a call that the grammar holds to the tools'
  schemas until ``</tool_call>`` (llguidance's lazy trigger), so the model chooses between an answer
  and a call, and a call it starts is always well-formed;
- ``none``: no tools in the prompt, no grammar.

An assistant message's ``tool_calls`` in the history are rendered as the same blocks, and a ``tool``
message as a user turn in ``<tool_response></tool_response>``, as Hermes templates do.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import llguidance

from kvferry.common.grammar import JSON_OPTIONS, GrammarError, GrammarSpec

CALL_BEGIN, CALL_END = "<tool_call>", "</tool_call>"
_CALL_BLOCK = re.compile(re.escape(CALL_BEGIN) + r"\s*(.*?)\s*" + re.escape(CALL_END), re.DOTALL)
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}

SYSTEM_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


class ToolError(ValueError):
    """A tool definition or choice that cannot be served; ``param`` names it (``tools[1].function.name``)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_json(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None
    tool_calls: list[ToolCall]


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict  # a JSON schema (an object's)


@dataclass(frozen=True)
class ToolCalling:
    """One request's tools and ``tool_choice`` (``mode``: "auto", "required" or "named")."""

    functions: tuple[Function, ...]
    mode: str
    name: str | None = None  # mode "named": the function to call
    parallel: bool = True

    def system_prompt(self) -> str:
        listed = "\n".join(json.dumps({"type": "function", "function": _definition(f)}, ensure_ascii=False)
                           for f in self.functions)
        return SYSTEM_PROMPT.format(tools=listed)

    def grammar(self) -> GrammarSpec:
        if self.mode == "named":
            return GrammarSpec.json_schema(self._function(self.name).parameters)
        calls = [_call_schema(f) for f in self.functions]
        call = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if self.mode == "required":
            return GrammarSpec.json_schema(
                {"type": "array", "items": call, "minItems": 1, **({} if self.parallel else {"maxItems": 1})})
        tag = llguidance.StructTag(trigger=CALL_BEGIN, begin=CALL_BEGIN + "\n", grammar={**call, "x-guidance": JSON_OPTIONS},
                                   end="\n" + CALL_END)
        return GrammarSpec("lark", llguidance.StructTag.to_grammar([tag], assume_special=False))

    def _function(self, name: str | None) -> Function:
        return next(f for f in self.functions if f.name == name)

    def parse(self, text: str) -> ParsedOutput:
        """The output as content and calls; output that is not a complete call stays content."""
        if self.mode == "named":
            arguments = _json_or_none(text)
            if not isinstance(arguments, dict):
                return ParsedOutput(text, [])
            return ParsedOutput(None, [ToolCall(self.name or "", text)])
        if self.mode == "required":
            calls = _json_or_none(text)
            parsed = [self._call(c) for c in calls] if isinstance(calls, list) else []
            if not parsed or None in parsed:
                return ParsedOutput(text, [])
            return ParsedOutput(None, parsed)  # type: ignore[arg-type]
        calls: list[ToolCall] = []
        for block in _CALL_BLOCK.finditer(text):
            call = self._call(_json_or_none(block.group(1)))
            if call is None:
                return ParsedOutput(text, [])  # not a call after all: all of it is the answer
            calls.append(call)
        content = _CALL_BLOCK.sub("", text).strip() if calls else text
        return ParsedOutput(content or None, calls)

    def _call(self, value: Any) -> ToolCall | None:
        if not (isinstance(value, dict) and isinstance(value.get("arguments"), dict)
                and any(f.name == value.get("name") for f in self.functions)):
            return None
        return ToolCall(value["name"], json.dumps(value["arguments"], ensure_ascii=False))


def _definition(f: Function) -> dict:
    out: dict[str, Any] = {"name": f.name}
    if f.description:
        out["description"] = f.description
    out["parameters"] = f.parameters
    return out


def _call_schema(f: Function) -> dict:
    return {"type": "object", "properties": {"name": {"const": f.name}, "arguments": f.parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def tool_calling(tools: list, tool_choice: Any, parallel: bool | None) -> ToolCalling | None:
    """From the validated ``tools`` (openai_models.Tool) and ``tool_choice``; None: no tool calling.
    Raises ToolError naming the parameter."""
    if not tools:  # "auto" or "none" without tools mean no tool calling (clients send them so)
        if tool_choice not in (None, "none", "auto"):
            raise ToolError("tool_choice requires tools", "tool_choice")
        return None
    functions = []
    for i, tool in enumerate(tools):
        fn = tool.function
        if any(f.name == fn.name for f in functions):
            raise ToolError(f"two tools are named {fn.name!r}", f"tools[{i}].function.name")
        parameters = NO_PARAMETERS if fn.parameters is None else fn.parameters
        try:
            GrammarSpec.json_schema(parameters)
        except GrammarError as exc:
            raise ToolError(f"tools[{i}].function.parameters: {exc}", f"tools[{i}].function.parameters") from None
        functions.append(Function(fn.name, fn.description, parameters))
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return None
    if isinstance(choice, str):
        return ToolCalling(tuple(functions), choice, parallel=parallel is not False)
    name = choice.function.name
    if not any(f.name == name for f in functions):
        raise ToolError(f"tool_choice names {name!r}, which is not one of the tools", "tool_choice.function.name")
    return ToolCalling(tuple(functions), "named", name, parallel=parallel is not False)


def render_tool_calls(calls: list) -> str:
    """An assistant message's ``tool_calls`` (openai_models.ToolCallIn) as the prompt shows them."""
    blocks = []
    for call in calls:
        arguments = _json_or_none(call.function.arguments)
        body = {"name": call.function.name, "arguments": arguments if arguments is not None else call.function.arguments}
        blocks.append(f"{CALL_BEGIN}\n{json.dumps(body, ensure_ascii=False)}\n{CALL_END}")
    return "\n".join(blocks)


def render_tool_response(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"


class ToolCallStream:
    """One streamed choice's text turned into content and ``tool_calls`` deltas.

    ``feed(text)`` and ``finish()`` return the delta to send ({} when nothing is ready): a named call
    streams its arguments as they come; ``required`` output is sent whole at the end (a JSON array
    half-way is no call yet); ``auto`` streams content and holds back what may be the start of a
    ``<tool_call>``, sending each call once its block closes.
    """

    def __init__(self, calling: ToolCalling) -> None:
        self.calling = calling
        self.num_calls = 0
        self._buffer = ""  # required: all of it; auto: the text not yet sent
        self._call_id = f"call_{uuid.uuid4().hex[:24]}"

    def feed(self, text: str) -> dict:
        if not text:
            return {}
        if self.calling.mode == "named":
            call: dict[str, Any] = {"index": 0, "function": {"arguments": text}}
            if self.num_calls == 0:
                self.num_calls = 1
                call = {"index": 0, "id": self._call_id, "type": "function",
                        "function": {"name": self.calling.name, "arguments": text}}
            return {"tool_calls": [call]}
        self._buffer += text
        return {} if self.calling.mode == "required" else self._auto(final=False)

    def finish(self) -> dict:
        if self.calling.mode == "named":
            return {}
        if self.calling.mode == "required":
            parsed, self._buffer = self.calling.parse(self._buffer), ""
            if not parsed.tool_calls:
                return {"content": parsed.content} if parsed.content else {}
            return self._calls_delta(parsed.tool_calls)
        return self._auto(final=True)

    def _auto(self, final: bool) -> dict:
        delta: dict[str, Any] = {}
        content, calls = "", []
        while self._buffer:
            start = self._buffer.find(CALL_BEGIN)
            if start < 0:
                keep = 0 if final else _partial_suffix(self._buffer, CALL_BEGIN)
                content += self._buffer[: len(self._buffer) - keep]
                self._buffer = self._buffer[len(self._buffer) - keep :]
                break
            end = self._buffer.find(CALL_END, start)
            if end < 0:
                content += self._buffer[:start]
                self._buffer = self._buffer[start:]
                if final:  # a call cut off (max_tokens): it is text after all
                    content, self._buffer = content + self._buffer, ""
                break
            block = self._buffer[start : end + len(CALL_END)]
            parsed = self.calling.parse(block)
            content += self._buffer[:start]
            if parsed.tool_calls:
                calls += parsed.tool_calls
            else:
                content += block
            self._buffer = self._buffer[end + len(CALL_END) :]
        # Whitespace between calls is dropped, as the whole-response parse drops it.
        if content.strip() or (content and not calls and not self.num_calls):
            delta["content"] = content
        if calls:
            delta.update(self._calls_delta(calls))
        return delta

    def _calls_delta(self, calls: list[ToolCall]) -> dict:
        out = []
        for call in calls:
            out.append({"index": self.num_calls, **call.to_json()})
            self.num_calls += 1
        return {"tool_calls": out}


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest tail of ``text`` that is a proper prefix of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0
