"""OpenAI's completions and chat completions, as plain data: a parsed JSON body, validated by the
pydantic models of ``openai_models``, becomes a ``GenerationRequest`` once checked against the served
model (its name, vocabulary, context and chat template); and choices, chunks and usage are formatted the
way the official clients expect. No I/O here; ``openai_api`` serves it.

Structured output: ``response_format`` (json_object, json_schema) and ``tools`` (``openai_tools``)
become a ``GrammarSpec`` in the sampling parameters, which every worker that samples applies as a mask.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from kvferry.common.sampling import TokenLogprobs
from kvferry.common.grammar import GrammarError, GrammarSpec
from kvferry.router.openai_models import (
    MAX_CHOICES,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ResponseFormat,
    SamplingFields,
    validate,
)
from kvferry.router.openai_tools import (
    ToolCalling,
    ToolCallStream,
    ToolError,
    render_tool_calls,
    render_tool_response,
    tool_calling,
)
from kvferry.router.request import (
    APIError,
    ChoiceDelta,
    GenerationRequest,
    ServedModel,
    Usage,
    check_context,
    check_token_ids,
    encode_text,
    make_sampling_params,
)

SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "stop", "stop_token_ids", "ignore_eos", "include_stop_str_in_output", "n",
)


def check_model(name: str | None, model: ServedModel) -> None:
    """An absent model means the served one; any other name is OpenAI's 404 ``model_not_found``."""
    if name is not None and name != model.name:
        raise model_not_found(name, model)


def model_not_found(name: str, model: ServedModel) -> APIError:
    return APIError(
        f"The model `{name}` does not exist; this server serves `{model.name}`.",
        param="model", code="model_not_found", status=404,
    )


def _refuse_unsupported(request: SamplingFields, names: tuple[str, ...]) -> None:
    """OpenAI fields this server does not serve (unknown to the models, so kept as extras): refused
    unless empty, since clients send some of them empty by default."""
    extra = request.model_extra or {}
    for name in names:
        if extra.get(name) not in (None, False, {}, [], ""):
            raise APIError(f"{name} is not supported by this server", param=name, code="unsupported_parameter")


def _include_usage(request: SamplingFields) -> bool:
    if request.stream_options is not None and not request.stream:
        raise APIError("stream_options is only allowed when stream is true", param="stream_options")
    return bool(request.stream_options and request.stream_options.include_usage)


@dataclass(frozen=True)
class ParsedRequest:
    """A request as the workers see it, and how its output is told to the client."""

    generation: GenerationRequest
    tool_calling: ToolCalling | None = None


def _finish(
    request: SamplingFields, model: ServedModel, prompts: list[tuple[int, ...]], max_tokens: int | None,
    logprobs: int | None, prefix: str, default_max_tokens: int | None, grammar: GrammarSpec | None = None,
) -> GenerationRequest:
    n = request.n or 1
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(f"{len(prompts)} prompts x n={n} is {len(prompts) * n} choices; at most "
                       f"{MAX_CHOICES} in one request", param="n", code="invalid_value")
    fields_ = {name: getattr(request, name) for name in SAMPLING_FIELDS}
    if request.stop_token_ids:
        check_token_ids(model, request.stop_token_ids, "stop_token_ids")
    max_tokens_given = max_tokens is not None
    if grammar is not None and request.ignore_eos:
        raise APIError("ignore_eos cannot be combined with response_format or tools: a complete answer "
                       "ends with EOS", param="ignore_eos", code="invalid_value")
    params = make_sampling_params(**fields_, logprobs=logprobs, grammar=grammar,
                                  max_tokens=max_tokens if max_tokens_given else default_max_tokens)
    if not max_tokens_given and default_max_tokens is None:
        params = params.with_(max_tokens=model.max_model_len)  # chat: as much as the context allows
    params = check_context(model, prompts, params, max_tokens_given)
    return GenerationRequest(
        request_id=f"{prefix}-{uuid.uuid4().hex}",
        prompts=tuple(prompts),
        params=params,
        stream=bool(request.stream),
        include_usage=_include_usage(request),
    )


def parse_completion(body: Any, model: ServedModel) -> ParsedRequest:
    request = validate(CompletionRequest, body)
    check_model(request.model, model)
    _refuse_unsupported(request, ("echo", "suffix", "logit_bias"))
    if request.best_of is not None and request.best_of != (request.n or 1):
        raise APIError("best_of other than n is not supported", param="best_of", code="unsupported_parameter")
    raw = request.prompt
    if isinstance(raw, str):
        prompts = [encode_text(model, raw, "prompt")]
    elif isinstance(raw[0], str):
        prompts = [encode_text(model, p, "prompt") for p in raw]
    elif isinstance(raw[0], int):
        prompts = [check_token_ids(model, raw, "prompt")]
    else:
        prompts = [check_token_ids(model, p, "prompt") for p in raw]
    return ParsedRequest(_finish(request, model, prompts, request.max_tokens, request.logprobs, "cmpl",
                                 default_max_tokens=16))


def _message_text(message: ChatMessage, i: int) -> dict:
    content = message.content
    if isinstance(content, list):  # content parts: only text is served (the model checked their type)
        content = "".join(part.text for part in content)
    if message.tool_calls and message.role == "assistant":  # its calls, as the model is asked to write them
        content = "\n".join(filter(None, [content, render_tool_calls(message.tool_calls)]))
    if content is None:
        if message.role != "assistant":
            raise APIError(f"messages[{i}].content is required for the {message.role} role",
                           param=f"messages[{i}].content", code="missing_required_parameter")
        content = ""
    if message.role == "tool":
        return {"role": "user", "content": render_tool_response(content)}
    return {"role": "system" if message.role == "developer" else message.role, "content": content}


def chat_prompt_text(messages: list[ChatMessage], model: ServedModel, add_generation_prompt: bool = True,
                     tools: ToolCalling | None = None) -> str:
    """Validated messages through the model's chat template (chat completions, /tokenize); ``tools``:
    their system prompt first, or after the request's own system message."""
    conversation = [_message_text(m, i) for i, m in enumerate(messages)]
    if tools is not None:
        if conversation[0]["role"] == "system":
            conversation[0] = {"role": "system", "content": conversation[0]["content"] + "\n\n" + tools.system_prompt()}
        else:
            conversation.insert(0, {"role": "system", "content": tools.system_prompt()})
    return model.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)


def response_format_grammar(response_format: ResponseFormat | None) -> GrammarSpec | None:
    if response_format is None or response_format.type == "text":
        if response_format is not None and response_format.json_schema is not None:
            raise APIError("response_format.json_schema is only allowed with type json_schema",
                           param="response_format.json_schema")
        return None
    if response_format.type == "json_object":
        return GrammarSpec("json_object")
    spec = response_format.json_schema
    if spec is None:
        raise APIError("response_format.json_schema is required with type json_schema",
                       param="response_format.json_schema", code="missing_required_parameter")
    if spec.schema_ is None:
        return GrammarSpec("json_object")
    try:
        return GrammarSpec.json_schema(spec.schema_)
    except GrammarError as exc:
        raise APIError(f"response_format.json_schema.schema: {exc}", param="response_format.json_schema.schema",
                       code="invalid_value") from None


def _structured_output(request: ChatCompletionRequest) -> tuple[GrammarSpec | None, ToolCalling | None]:
    grammar = response_format_grammar(request.response_format)
    try:
        tools = tool_calling(request.tools or [], request.tool_choice, request.parallel_tool_calls)
    except ToolError as exc:
        raise APIError(str(exc), param=exc.param, code="invalid_value") from None
    if tools is None:
        return grammar, None
    if grammar is not None:
        raise APIError("response_format json_object or json_schema cannot be combined with tools unless "
                       "tool_choice is none", param="response_format", code="invalid_value")
    return tools.grammar(), tools


def parse_chat(body: Any, model: ServedModel) -> ParsedRequest:
    request = validate(ChatCompletionRequest, body)
    check_model(request.model, model)
    _refuse_unsupported(request, ("functions", "logit_bias", "audio"))
    # max_completion_tokens is OpenAI's current name, max_tokens the deprecated one: either, or both equal.
    max_tokens = request.max_completion_tokens
    if max_tokens is None:
        max_tokens = request.max_tokens
    elif request.max_tokens is not None and request.max_tokens != max_tokens:
        raise APIError(
            f"max_completion_tokens ({max_tokens}) and max_tokens ({request.max_tokens}) differ; "
            "give one of them (max_tokens is the deprecated name)",
            param="max_completion_tokens", code="invalid_value",
        )
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError("top_logprobs requires logprobs to be true", param="top_logprobs")
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    grammar, tools = _structured_output(request)
    prompts = [encode_text(model, chat_prompt_text(request.messages, model, tools=tools), "messages")]
    gen = _finish(request, model, prompts, max_tokens, logprobs, "chatcmpl", default_max_tokens=None, grammar=grammar)
    return ParsedRequest(gen, tools)


# --- responses ------------------------------------------------------------------------------------


@dataclass
class ChoiceResult:
    """A choice accumulated from its deltas (non-streaming responses)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    error: str | None = None

    num_cached_tokens: int = 0

    def add(self, delta: ChoiceDelta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        if delta.finish_reason is not None:
            self.finish_reason, self.error = delta.finish_reason, delta.error
            self.num_cached_tokens = delta.num_cached_tokens


def usage_of(request: GenerationRequest, completion_tokens: int, cached_tokens: Sequence[int] = ()) -> Usage:
    """Usage of a whole request. ``cached_tokens``: each choice's prefix-cache hit, by choice index.

    ``prompt_tokens`` counts each prompt once however many choices it has, so a prompt's cached tokens
    are the fewest any of its choices had served from the cache.
    """
    cached = 0
    if len(cached_tokens) == request.num_choices:
        n = request.params.n
        cached = sum(min(cached_tokens[i * n : (i + 1) * n]) for i in range(len(request.prompts)))
    return Usage(sum(len(p) for p in request.prompts), completion_tokens, cached)


def usage_json(usage: Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


class Formatter:
    """Formats one request's responses; ``chat`` picks chat.completion over text_completion shapes."""

    def __init__(self, request: GenerationRequest, model: ServedModel, chat: bool,
                 tools: ToolCalling | None = None) -> None:
        self.request = request
        self.model = model
        self.chat = chat
        self.tools = tools
        self._tool_streams = [ToolCallStream(tools) for _ in range(request.num_choices)] if tools else []
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}
        self._text_offsets = [0] * request.num_choices

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.model.tokenizer.decode([token_id])
        return text

    def _logprobs_json(self, index: int, logprobs: list[TokenLogprobs] | None, text_start: int) -> dict | None:
        if logprobs is None:
            return None
        if self.chat:
            return {"content": [
                {
                    "token": self.token_text(lp.token_id),
                    "logprob": lp.logprob,
                    "bytes": list(self.token_text(lp.token_id).encode()),
                    "top_logprobs": [
                        {"token": self.token_text(t), "logprob": v, "bytes": list(self.token_text(t).encode())}
                        for t, v in lp.top_logprobs.items()
                    ],
                }
                for lp in logprobs
            ]}
        tokens = [self.token_text(lp.token_id) for lp in logprobs]
        offsets, pos = [], text_start
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{self.token_text(t): v for t, v in lp.top_logprobs.items()} for lp in logprobs],
            "text_offset": offsets,
        }

    def response(self, choices: list[ChoiceResult], usage: Usage) -> dict:
        out = []
        for c in sorted(choices, key=lambda c: c.index):
            item: dict[str, Any] = {"index": c.index}
            finish_reason = c.finish_reason
            if self.chat:
                item["message"] = {"role": "assistant", "content": c.text}
                if self.tools is not None:
                    parsed = self.tools.parse(c.text)
                    item["message"]["content"] = parsed.content
                    if parsed.tool_calls:
                        item["message"]["tool_calls"] = [call.to_json() for call in parsed.tool_calls]
                        finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
            else:
                item["text"] = c.text
            item["logprobs"] = self._logprobs_json(c.index, c.logprobs, 0)
            item["finish_reason"] = finish_reason
            out.append(item)
        return {
            "id": self.request.request_id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model.name,
            "choices": out,
            "usage": usage_json(usage),
        }

    def _chunk(self, choices: list[dict], usage: Usage | None = None) -> dict:
        chunk: dict[str, Any] = {
            "id": self.request.request_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model.name,
            "choices": choices,
        }
        if self.request.include_usage:
            chunk["usage"] = usage_json(usage) if usage is not None else None
        return chunk

    def role_chunk(self, index: int) -> dict:
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}])

    def delta_chunk(self, delta: ChoiceDelta) -> dict:
        start = self._text_offsets[delta.index]
        self._text_offsets[delta.index] += len(delta.text)
        logprobs = self._logprobs_json(delta.index, delta.logprobs, start)
        if self.chat:
            choice = {"index": delta.index, "delta": {"content": delta.text} if delta.text else {},
                      "logprobs": logprobs, "finish_reason": delta.finish_reason}
            if self._tool_streams:
                choice["delta"], choice["finish_reason"] = self._tool_delta(delta)
        else:
            choice = {"index": delta.index, "text": delta.text, "logprobs": logprobs,
                      "finish_reason": delta.finish_reason}
        return self._chunk([choice])

    def _tool_delta(self, delta: ChoiceDelta) -> tuple[dict, str | None]:
        stream = self._tool_streams[delta.index]
        out = stream.feed(delta.text)
        finish_reason = delta.finish_reason
        if finish_reason is not None:
            end = stream.finish()
            if "content" in end:
                out["content"] = out.get("content", "") + end["content"]
            if "tool_calls" in end:
                out["tool_calls"] = out.get("tool_calls", []) + end["tool_calls"]
            if finish_reason == "stop" and stream.num_calls:
                finish_reason = "tool_calls"
        return out, finish_reason

    def usage_chunk(self, usage: Usage) -> dict:
        return self._chunk([], usage)
