"""What the router serves, independent of the API it came in on: validated requests and their outputs.

The OpenAI HTTP API and the gRPC ``Generate`` service both parse into a ``GenerationRequest`` (token ids
and ``SamplingParams``, checked against the served model), and both format the same ``ChoiceDelta``
stream. Invalid input raises ``APIError`` (HTTP 400 / gRPC INVALID_ARGUMENT) naming the parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from kvferry.common.sampling import SamplingParams, SamplingParamsError, TokenLogprobs


class APIError(Exception):
    """An error the client sees: ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status
        self.type = type
        self.retry_after_s = retry_after_s  # a 429: the Retry-After header / gRPC retry-after metadata

    @property
    def retry_after_header(self) -> str | None:
        """Whole seconds, rounded up, at least 1 (HTTP's Retry-After has no fractions)."""
        if self.retry_after_s is None:
            return None
        return str(max(1, math.ceil(self.retry_after_s)))

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def deadline_exceeded(timeout_s: float) -> APIError:
    """The router's per-request deadline (``--request-timeout``) passed; the request is aborted."""
    return APIError(f"the request did not finish within the router's {timeout_s:g} s deadline",
                    code="timeout", status=504, type="server_error")


def unavailable(message: str, code: str = "no_capacity", retry_after_s: float | None = None) -> APIError:
    return APIError(message, code=code, status=503, type="service_unavailable", retry_after_s=retry_after_s)


def overloaded(message: str, retry_after_s: float) -> APIError:
    """The router's admission queue is full: refused at once, with when to come back."""
    return APIError(message, code="overloaded", status=429, type="rate_limit_error", retry_after_s=retry_after_s)


def slo_rejected(message: str, retry_after_s: float) -> APIError:
    """Early rejection: the TTFT target cannot be met, so the request is refused rather than served late."""
    return APIError(message, code="slo_rejected", status=429, type="rate_limit_error", retry_after_s=retry_after_s)


class TokenizerLike(Protocol):
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str: ...


@dataclass(frozen=True)
class ServedModel:
    """The model behind the router: its name, tokenizer and context (the smallest any worker accepts)."""

    name: str
    tokenizer: TokenizerLike
    vocab_size: int
    max_model_len: int


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompts: tuple[tuple[int, ...], ...]  # token ids, one per prompt; choices = prompts x params.n
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False  # streaming: a last chunk with usage (OpenAI stream_options)
    # The client's own id (gRPC request_id, HTTP X-Request-Id): echoed back, never sent to a worker,
    # where two clients' equal ids would collide; ``request_id`` is always the router's.
    client_request_id: str = ""

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.params.n

    def choice_params(self, index: int) -> SamplingParams:
        """Choice ``index``'s params: n=1, and with a seed, seed + index so seeded choices differ."""
        changes: dict = {"n": 1}
        if self.params.seed is not None and index:
            changes["seed"] = (self.params.seed + index) & ((1 << 64) - 1)
        return self.params.with_(**changes)

    def choice_prompt(self, index: int) -> tuple[int, ...]:
        return self.prompts[index // self.params.n]


@dataclass
class ChoiceDelta:
    """New output of one choice. The last delta of a choice has ``finish_reason`` set."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    timings: dict[str, float] | None = None  # on a choice's last delta: phase -> seconds (timings.py)
    num_cached_tokens: int = 0  # on a choice's last delta: prompt tokens served from the prefix cache


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, served from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def make_sampling_params(**fields_: object) -> SamplingParams:
    """``SamplingParams`` from the given fields (None = default), errors as ``APIError`` naming the field."""
    try:
        return SamplingParams(**{k: v for k, v in fields_.items() if v is not None})
    except SamplingParamsError as exc:
        raise APIError(str(exc), param=exc.param, code="invalid_value") from None
    except TypeError as exc:  # e.g. a list where a number belongs, caught by no range check
        raise APIError(f"invalid sampling parameters: {exc}", code="invalid_value") from None


def check_context(
    model: ServedModel, prompts: Sequence[Sequence[int]], params: SamplingParams, max_tokens_given: bool
) -> SamplingParams:
    """Refuse prompts that do not fit the context; fit a defaulted max_tokens to the room left."""
    longest = max(len(p) for p in prompts)
    if longest >= model.max_model_len:
        raise APIError(
            f"This model's maximum context length is {model.max_model_len} tokens; the prompt has "
            f"{longest} tokens, and at least one must remain for the output.",
            param="prompt", code="context_length_exceeded",
        )
    room = model.max_model_len - longest
    if params.max_tokens > room:
        if max_tokens_given:
            raise APIError(
                f"This model's maximum context length is {model.max_model_len} tokens. However, you "
                f"requested {longest + params.max_tokens} tokens ({longest} in the prompt, "
                f"{params.max_tokens} for the completion). Reduce the prompt or max_tokens.",
                param="max_tokens", code="context_length_exceeded",
            )
        params = params.with_(max_tokens=room)
    return params


MAX_CLIENT_REQUEST_ID_CHARS = 256


def check_client_request_id(value: str, param: str) -> str:
    """A client's request id, to echo: printable ASCII, at most ``MAX_CLIENT_REQUEST_ID_CHARS``."""
    if len(value) > MAX_CLIENT_REQUEST_ID_CHARS or not (value.isascii() and value.isprintable()):
        raise APIError(f"{param} must be at most {MAX_CLIENT_REQUEST_ID_CHARS} printable ASCII characters",
                       param=param, code="invalid_value")
    return value


def check_token_ids(model: ServedModel, ids: Sequence[object], param: str) -> tuple[int, ...]:
    if not ids:
        raise APIError(f"{param} is empty", param=param)
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < model.vocab_size:
            raise APIError(f"{param}: token ids must be integers in [0, {model.vocab_size}), got {t!r}", param=param)
    return tuple(ids)  # type: ignore[arg-type]


def encode_text(model: ServedModel, text: str, param: str) -> tuple[int, ...]:
    """Tokenize as the engine does (``encode(text)``, special tokens per the tokenizer's defaults)."""
    ids = model.tokenizer.encode(text)
    if not ids:
        raise APIError(f"{param} is empty", param=param)
    return tuple(ids)
