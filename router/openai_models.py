"""The OpenAI HTTP API's request and response bodies as pydantic models: the types, ranges and limits
a request is checked against (``validate``), and the shapes the OpenAPI schema (``/openapi.json``)
describes.

Checks that need the served model (its name, vocabulary, context length, chat template) or that span
several fields (``n`` x prompts, ``top_logprobs`` without ``logprobs``) stay in ``openai_protocol``.
Numbers are strict: ``true`` is not 1 and ``"0.5"`` is not a number. Unknown fields are kept (clients
send many) and refused only where ``openai_protocol`` says so. A validation error becomes an ``APIError``
naming the parameter as OpenAI does (``messages[0].role``, ``stream_options.include_usage``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Strict, StrictBool, StrictInt, StrictStr, Tag
from pydantic import ValidationError

from kvferry.common.sampling import (
    MAX_LOGPROBS, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, MAX_TEMPERATURE, MAX_TOP_K,
)
from kvferry.router.request import APIError

MAX_N = 16
MAX_CHOICES = 64  # prompts x n in one request: each choice is a request of its own on the workers
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")

Number = Annotated[float, Strict()]  # ints pass (as floats), bools and strings do not
# Sampling floats travel to the workers as float32: a bound that excludes 0 is the smallest normal
# float32 (1e-300 would arrive as 0 and be refused there, naming no parameter), and no finite value
# may become infinite on the way.
FLOAT32_TINY = 1.1754943508222875e-38
FLOAT32_MAX = 3.4028234663852886e38


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


# --- the parts of requests ------------------------------------------------------------------------


def _kind(value: Any) -> str | None:
    """The union member a value is meant for, by its shape: only that member's errors are reported."""
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        first = value[0] if value else ""  # an empty array: as strings (no stop strings; no prompt)
        return "strings" if isinstance(first, str) else "arrays" if isinstance(first, list) else \
            "objects" if isinstance(first, dict) else "integers"
    return None  # a number, an object...: fits no member


def _shaped_union(members: dict[str, Any], what: str) -> Any:
    return Annotated[
        Union[tuple(Annotated[t, Tag(tag)] for tag, t in members.items())],
        Discriminator(_kind, custom_error_type="invalid_type", custom_error_message=f"must be {what}"),
    ]


TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]
Prompt = _shaped_union({
    "a string": Annotated[StrictStr, Field(min_length=1)],
    "strings": Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(min_length=1, max_length=MAX_CHOICES)],
    "integers": TokenIds,
    "arrays": Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_CHOICES)],
}, "a non-empty string, array of strings, array of token ids or array of arrays of token ids")
StopString = Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
Stop = _shaped_union({
    "a string": StopString,
    "strings": Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)],
}, f"a string or an array of at most {MAX_STOP_STRINGS} strings")


class TextPart(BaseModel):
    """A content part; only text is served."""

    type: Literal["text"]
    text: StrictStr


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names


class FunctionCallIn(_Request):
    name: StrictStr
    arguments: StrictStr = Field(description="JSON text")


class ToolCallIn(_Request):
    """A tool call of an earlier assistant message."""

    id: StrictStr
    type: Literal["function"]
    function: FunctionCallIn


class ChatMessage(_Request):
    role: Literal[CHAT_ROLES] = Field(description="developer is served as system")
    content: _shaped_union({"a string": StrictStr, "objects": list[TextPart]},
                           "a string or an array of text parts") | None = Field(
        None, description="null only for an assistant message")
    name: StrictStr | None = None
    tool_calls: list[ToolCallIn] | None = Field(None, description="assistant messages: the calls it made")
    tool_call_id: StrictStr | None = Field(None, description="tool messages: the call answered")


class StreamOptions(_Request):
    include_usage: StrictBool | None = Field(None, description="a last chunk with usage and no choices")


class SamplingFields(_Request):
    """The sampling fields both generation endpoints share: OpenAI's and vLLM's extensions."""

    model: StrictStr | None = Field(None, description="the served model's name; absent: the served model")
    temperature: Number | None = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_p: Number | None = Field(None, ge=FLOAT32_TINY, le=1, description="in (0, 1]")
    top_k: StrictInt | None = Field(None, ge=-1, le=MAX_TOP_K, description="-1 or 0: off (vLLM)")
    min_p: Number | None = Field(None, ge=0, le=1, description="vLLM")
    seed: StrictInt | None = Field(None, ge=-(1 << 63), le=(1 << 64) - 1)
    presence_penalty: Number | None = Field(None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(None, ge=-2, le=2)
    repetition_penalty: Number | None = Field(None, ge=FLOAT32_TINY, le=FLOAT32_MAX, description="> 0; 1: off (vLLM)")
    stop: Stop | None = None
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = Field(
        None, max_length=MAX_STOP_TOKEN_IDS, description="vLLM")
    ignore_eos: StrictBool | None = Field(None, description="vLLM")
    include_stop_str_in_output: StrictBool | None = Field(None, description="vLLM")
    n: StrictInt | None = Field(None, ge=1, le=MAX_N, description=f"choices per prompt; prompts x n <= {MAX_CHOICES}")
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = Field(None, description="only with stream: true")
    user: StrictStr | None = Field(None, description="the end user's id: accepted, not used")


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``. ``echo``, ``suffix`` and ``logit_bias`` are refused."""

    prompt: Prompt
    max_tokens: StrictInt | None = Field(None, ge=1, description="default 16")
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: StrictInt | None = Field(None, ge=1, description="only equal to n")


class JsonSchemaFormat(_Request):
    name: StrictStr = Field(pattern=FUNCTION_NAME)
    description: StrictStr | None = None
    # "schema" would shadow a BaseModel attribute: stored as schema_, named schema on the wire.
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="a JSON schema; absent: any JSON object")
    strict: StrictBool | None = Field(None, description="the schema is always enforced (a grammar mask)")


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, description="with type json_schema")


class FunctionDefinition(_Request):
    name: StrictStr = Field(pattern=FUNCTION_NAME)
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of an object; absent: no parameters")
    strict: StrictBool | None = Field(None, description="the schema is always enforced (a grammar mask)")


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: StrictStr


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


def _choice_kind(value: Any) -> str | None:
    return "a string" if isinstance(value, str) else "an object" if isinstance(value, dict) else None


ToolChoice = Annotated[
    Union[Annotated[Literal["none", "auto", "required"], Tag("a string")], Annotated[NamedToolChoice, Tag("an object")]],
    Discriminator(_choice_kind, custom_error_type="invalid_type",
                  custom_error_message='must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'),
]


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``. ``functions``, ``logit_bias`` and ``audio`` are refused."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, description="default: the context left")
    max_tokens: StrictInt | None = Field(None, ge=1, description="deprecated: equal to max_completion_tokens if both")
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, description=f"at most {MAX_LOGPROBS}; needs logprobs")
    response_format: ResponseFormat | None = Field(None, description="structured output (docs/ROUTER.md)")
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = Field(None, description="default: auto with tools")
    parallel_tool_calls: StrictBool | None = Field(None, description="false: at most one call (tool_choice required)")


class TokenizeRequest(_Request):
    """vLLM's ``POST /tokenize``: ``prompt`` or ``messages`` (through the chat template)."""

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: StrictBool | None = Field(None, description="default: true for prompt, false for messages")
    add_generation_prompt: StrictBool | None = Field(None, description="messages only; default true")


class DetokenizeRequest(_Request):
    model: StrictStr | None = None
    tokens: list[Annotated[StrictInt, Field(ge=0)]]


REQUEST_MODELS = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest)


# --- validation errors as OpenAI's ----------------------------------------------------------------


def _field_names(models: tuple[type[BaseModel], ...]) -> frozenset[str]:
    names: set[str] = set()
    for m in (*models, ChatMessage, StreamOptions, TextPart, ResponseFormat, JsonSchemaFormat, FunctionDefinition,
              Tool, NamedFunction, NamedToolChoice, ToolCallIn, FunctionCallIn):
        names.update(m.model_fields)
    names.add("schema")  # JsonSchemaFormat.schema_'s name on the wire
    return frozenset(names)


_FIELD_NAMES = _field_names(REQUEST_MODELS)  # a union's member tag in an error's location is none of these
_CODES = {"missing": "missing_required_parameter", "invalid_type": "invalid_type"}


def param_name(loc: tuple[str | int, ...]) -> str | None:
    """OpenAI's ``param`` for a pydantic error location: ``("messages", 0, "role")`` -> ``messages[0].role``."""
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in _FIELD_NAMES:
            param += f".{part}" if param else part
    return param or None


def _api_error(exc: ValidationError) -> APIError:
    error = exc.errors(include_url=False)[0]
    param = param_name(error["loc"])
    kind = error["type"]
    if kind == "missing":
        message = f"{param} is required"
    else:
        value = error.get("input")
        got = "" if isinstance(value, (list, dict)) else f", got {_short(repr(value))}"
        message = f"{param}: {error['msg']}{got}" if param else error["msg"]
    code = _CODES.get(kind, "invalid_type" if kind.endswith("_type") else "invalid_value")
    return APIError(message, param=param, code=code)


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


RequestModel = TypeVar("RequestModel", bound=BaseModel)


def validate(model: type[RequestModel], body: Any) -> RequestModel:
    """``body`` (parsed JSON) as ``model``, or the first problem as a 400 ``APIError`` naming its parameter."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _api_error(exc) from None


# --- responses (documented in the OpenAPI schema; built as dicts on the hot path) -------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens served from the prefix cache")


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


FinishReason = Literal["stop", "length", "tool_calls", "abort", "error"] | None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class CompletionResponse(BaseModel):
    """Also each streamed chunk's shape (``data:`` lines of text/event-stream, then ``data: [DONE]``)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    kvferry_timings: dict[str, float] | None = Field(None, description="phase -> seconds (docs/ROUTER.md)")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobOut]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str = Field(description="JSON text")


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = Field(description="null when the answer is tool calls only")
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    kvferry_timings: dict[str, float] | None = Field(None, description="phase -> seconds (docs/ROUTER.md)")


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """The first delta of a call has its id, type and name; later ones add to ``arguments``."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletionChunk(BaseModel):
    """A streamed chunk (``data:`` lines of text/event-stream, then ``data: [DONE]``)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    kvferry_timings: dict[str, float] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


class WorkerCounts(BaseModel):
    prefill: int
    decode: int
    colocated: int


class LostWorker(BaseModel):
    name: str
    role: str
    address: str
    seconds_ago: float
    times_lost: int


class ExcludedPair(BaseModel):
    prefill: str
    decode: str
    reason: str = Field(description="the last KV-transfer failure: unavailable, incompatible, deadline, corrupt")
    failures: int = Field(description="KV-transfer failures in a row")
    seconds_left: float = Field(description="until the pair is tried again")


class HealthResponse(BaseModel):
    """200 when the router can serve (a colocated worker, or a prefill and a decode worker), else 503."""

    status: Literal["ok", "no_workers"]
    workers: WorkerCounts
    queued: int
    running: int
    lost_workers: list[LostWorker] = Field(description="workers whose heartbeats stopped, not back under their name")
    excluded_pairs: list[ExcludedPair] = Field(
        description="prefill -> decode worker pairs whose KV transfers failed in a row: no requests on them until "
                    "their cool-down ends")
