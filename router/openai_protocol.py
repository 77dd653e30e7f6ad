"""OpenAI's completions and chat completions, as plain data: parse a JSON body into a
``GenerationRequest`` (with OpenAI's field names, types and ranges checked) and format choices, chunks
and usage the way the official clients expect. No I/O here; ``openai_api`` serves it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from kvferry.router.request import (
    APIError,
    ChoiceDelta,
    GenerationRequest,
    ServedModel,
    TokenLogprob,
    Usage,
    check_context,
    check_token_ids,
    encode_text,
    make_sampling_params,
)

MAX_N = 16
MAX_CHOICES = 64  # prompts x n in one request: each choice is a request of its own on the workers
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
_NUMBER = (int, float)


def _get(body: dict, name: str, kinds: type | tuple[type, ...], default: Any = None) -> Any:
    """``body[name]`` if present and not null, checked to be one of ``kinds`` (bools are not numbers)."""
    value = body.get(name)
    if value is None:
        return default
    kinds_t = kinds if isinstance(kinds, tuple) else (kinds,)
    if (isinstance(value, bool) and bool not in kinds_t) or not isinstance(value, kinds_t):
        what = "a number" if float in kinds_t else _TYPE_NAMES[kinds_t[0]]
        raise APIError(f"{name} must be {what}, got {value!r}", param=name, code="invalid_type")
    return value


_TYPE_NAMES = {str: "a string", int: "an integer", bool: "a boolean", list: "an array", dict: "an object"}


def check_model(body: dict, model: ServedModel) -> None:
    """An absent model means the served one; any other name is OpenAI's 404 ``model_not_found``."""
    name = _get(body, "model", str)
    if name is not None and name != model.name:
        raise model_not_found(name, model)


def model_not_found(name: str, model: ServedModel) -> APIError:
    return APIError(
        f"The model `{name}` does not exist; this server serves `{model.name}`.",
        param="model", code="model_not_found", status=404,
    )


def _refuse_unsupported(body: dict, names: tuple[str, ...]) -> None:
    for name in names:
        value = body.get(name)
        if value not in (None, False, {}, [], ""):
            raise APIError(f"{name} is not supported by this server", param=name, code="unsupported_parameter")


def _common_params(body: dict, max_tokens_name: str) -> dict:
    """The sampling fields both endpoints share (OpenAI's plus vLLM's extensions), type-checked."""
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
        isinstance(stop, list) and all(isinstance(s, str) for s in stop)
    ):
        raise APIError("stop must be a string or an array of strings", param="stop", code="invalid_type")
    _get(body, "user", str)  # OpenAI's end-user id: type-checked, otherwise ignored
    return dict(
        max_tokens=_get(body, max_tokens_name, int),
        temperature=_get(body, "temperature", _NUMBER),
        top_p=_get(body, "top_p", _NUMBER),
        top_k=_get(body, "top_k", int),
        min_p=_get(body, "min_p", _NUMBER),
        seed=_get(body, "seed", int),
        presence_penalty=_get(body, "presence_penalty", _NUMBER),
        frequency_penalty=_get(body, "frequency_penalty", _NUMBER),
        repetition_penalty=_get(body, "repetition_penalty", _NUMBER),
        stop=stop,
        stop_token_ids=_get(body, "stop_token_ids", list),
        ignore_eos=_get(body, "ignore_eos", bool),
        include_stop_str_in_output=_get(body, "include_stop_str_in_output", bool),
        n=_get(body, "n", int),
    )


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict)
    if options is not None and not stream:
        raise APIError("stream_options is only allowed when stream is true", param="stream_options")
    include_usage = False
    if options:
        value = options.get("include_usage")
        if value is not None and not isinstance(value, bool):
            raise APIError(f"stream_options.include_usage must be a boolean, got {value!r}",
                           param="stream_options.include_usage", code="invalid_type")
        include_usage = bool(value)
    return stream, include_usage


def _finish(
    body: dict, model: ServedModel, prompts: list[tuple[int, ...]], fields_: dict, max_tokens_name: str,
    prefix: str, default_max_tokens: int | None,
) -> GenerationRequest:
    n = fields_.get("n")
    if n is not None and not 1 <= n <= MAX_N:
        raise APIError(f"n must be an integer in [1, {MAX_N}], got {n}", param="n", code="invalid_value")
    if len(prompts) * (n or 1) > MAX_CHOICES:
        raise APIError(f"{len(prompts)} prompts x n={n or 1} is {len(prompts) * (n or 1)} choices; at most "
                       f"{MAX_CHOICES} in one request", param="n", code="invalid_value")
    max_tokens_given = fields_["max_tokens"] is not None
    if not max_tokens_given and default_max_tokens is not None:
        fields_["max_tokens"] = default_max_tokens
    if max_tokens_given and fields_["max_tokens"] <= 0:
        raise APIError(
            f"{max_tokens_name} must be at least 1, got {fields_['max_tokens']}", param=max_tokens_name,
            code="invalid_value",
        )
    if fields_.get("stop_token_ids"):
        check_token_ids(model, fields_["stop_token_ids"], "stop_token_ids")
    params = make_sampling_params(**fields_)
    if not max_tokens_given and default_max_tokens is None:
        params = params.with_(max_tokens=model.max_model_len)  # chat: as much as the context allows
    params = check_context(model, prompts, params, max_tokens_given)
    stream, include_usage = _stream_flags(body)
    return GenerationRequest(
        request_id=f"{prefix}-{uuid.uuid4().hex}",
        prompts=tuple(prompts),
        params=params,
        stream=stream,
        include_usage=include_usage,
    )


def parse_completion(body: Any, model: ServedModel) -> GenerationRequest:
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    check_model(body, model)
    _refuse_unsupported(body, ("echo", "suffix", "logit_bias"))
    best_of = _get(body, "best_of", int)
    if best_of is not None and best_of != (body.get("n") or 1):
        raise APIError("best_of other than n is not supported", param="best_of", code="unsupported_parameter")
    if "prompt" not in body or body["prompt"] is None:
        raise APIError("prompt is required", param="prompt", code="missing_required_parameter")
    raw = body["prompt"]
    if isinstance(raw, list) and raw and isinstance(raw[0], (str, list)) and len(raw) > MAX_CHOICES:
        raise APIError(f"prompt: at most {MAX_CHOICES} prompts in one request, got {len(raw)}", param="prompt",
                       code="invalid_value")  # checked before tokenizing any of them
    prompts: list[tuple[int, ...]]
    if isinstance(raw, str):
        prompts = [encode_text(model, raw, "prompt")]
    elif isinstance(raw, list) and raw and all(isinstance(p, str) for p in raw):
        prompts = [encode_text(model, p, "prompt") for p in raw]
    elif isinstance(raw, list) and raw and all(isinstance(t, int) and not isinstance(t, bool) for t in raw):
        prompts = [check_token_ids(model, raw, "prompt")]
    elif isinstance(raw, list) and raw and all(isinstance(p, list) for p in raw):
        prompts = [check_token_ids(model, p, "prompt") for p in raw]
    else:
        raise APIError(
            "prompt must be a non-empty string, array of strings, array of token ids or array of arrays "
            "of token ids", param="prompt",
        )
    fields_ = _common_params(body, "max_tokens")
    logprobs = _get(body, "logprobs", int)
    fields_["logprobs"] = logprobs
    return _finish(body, model, prompts, fields_, "max_tokens", "cmpl", default_max_tokens=16)


def _message_text(message: Any, i: int) -> dict:
    param = f"messages[{i}]"
    if not isinstance(message, dict):
        raise APIError(f"{param} must be an object with role and content", param=param)
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise APIError(f"{param}.role must be one of {', '.join(CHAT_ROLES)}, got {role!r}", param=f"{param}.role")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text is served
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(f"{param}.content: only text parts are supported", param=f"{param}.content")
            texts.append(part["text"])
        content = "".join(texts)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise APIError(f"{param}.content must be a string or an array of text parts", param=f"{param}.content")
    return {"role": "system" if role == "developer" else role, "content": content}


def chat_prompt_text(body: dict, model: ServedModel, add_generation_prompt: bool = True) -> str:
    """``body["messages"]``, checked, through the model's chat template (chat completions, /tokenize)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("messages must be a non-empty array", param="messages",
                       code="missing_required_parameter" if messages is None else "invalid_value")
    conversation = [_message_text(m, i) for i, m in enumerate(messages)]
    return model.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)


def parse_chat(body: Any, model: ServedModel) -> GenerationRequest:
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    check_model(body, model)
    _refuse_unsupported(body, ("tools", "functions", "logit_bias", "audio"))
    response_format = _get(body, "response_format", dict)
    if response_format is not None and response_format.get("type", "text") != "text":
        raise APIError("only response_format {\"type\": \"text\"} is supported", param="response_format",
                       code="unsupported_parameter")
    prompts = [encode_text(model, chat_prompt_text(body, model), "messages")]
    # max_completion_tokens is OpenAI's current name, max_tokens the deprecated one: either, or both equal.
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    fields_ = _common_params(body, max_name)
    legacy = _get(body, "max_tokens", int)
    if max_name == "max_completion_tokens" and legacy is not None and legacy != fields_["max_tokens"]:
        raise APIError(
            f"max_completion_tokens ({fields_['max_tokens']}) and max_tokens ({legacy}) differ; "
            "give one of them (max_tokens is the deprecated name)",
            param="max_completion_tokens", code="invalid_value",
        )
    want = _get(body, "logprobs", bool, False)
    top = _get(body, "top_logprobs", int)
    if top is not None and not want:
        raise APIError("top_logprobs requires logprobs to be true", param="top_logprobs")
    fields_["logprobs"] = (top if top is not None else 0) if want else None
    return _finish(body, model, prompts, fields_, max_name, "chatcmpl", default_max_tokens=None)


# --- responses ------------------------------------------------------------------------------------


@dataclass
class ChoiceResult:
    """A choice accumulated from its deltas (non-streaming responses)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
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

    def __init__(self, request: GenerationRequest, model: ServedModel, chat: bool) -> None:
        self.request = request
        self.model = model
        self.chat = chat
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}
        self._text_offsets = [0] * request.num_choices

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.model.tokenizer.decode([token_id])
        return text

    def _logprobs_json(self, index: int, logprobs: list[TokenLogprob] | None, text_start: int) -> dict | None:
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
                        for t, v in lp.top
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
            "top_logprobs": [{self.token_text(t): v for t, v in lp.top} for lp in logprobs],
            "text_offset": offsets,
        }

    def response(self, choices: list[ChoiceResult], usage: Usage) -> dict:
        out = []
        for c in sorted(choices, key=lambda c: c.index):
            item: dict[str, Any] = {"index": c.index}
            if self.chat:
                item["message"] = {"role": "assistant", "content": c.text}
            else:
                item["text"] = c.text
            item["logprobs"] = self._logprobs_json(c.index, c.logprobs, 0)
            item["finish_reason"] = c.finish_reason
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
        else:
            choice = {"index": delta.index, "text": delta.text, "logprobs": logprobs,
                      "finish_reason": delta.finish_reason}
        return self._chunk([choice])

    def usage_chunk(self, usage: Usage) -> dict:
        return self._chunk([], usage)
