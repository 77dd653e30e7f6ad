"""Sampling parameters (frozen, validated once) and the logprobs of a sampled token.

Both cross every process boundary: the router validates ``SamplingParams`` for the client (a bad value
raises ``SamplingParamsError`` naming the field: HTTP 400 / gRPC INVALID_ARGUMENT) and the workers get
the same fields; a worker's ``TokenLogprobs`` reach the client through the router. The sampler that
uses them is ``kvferry.engine.sampling``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from kvferry.common.grammar import GrammarSpec

SAMPLING_EPS = 1e-5  # temperatures below this are greedy (dividing by them overflows)
MAX_TEMPERATURE = 2.0  # OpenAI's range; above 2 the distribution is near-uniform noise anyway
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit
# Stop conditions are checked on every token of the stream: their size is bounded (OpenAI allows 4
# strings; these leave room for templates with many end markers while keeping the check cheap).
MAX_STOP_STRINGS = 32
MAX_STOP_STRING_CHARS = 512
MAX_STOP_TOKEN_IDS = 256
MAX_TOP_K = (1 << 31) - 1  # int32 on the wire; any k above the vocabulary keeps every token
_MASK64 = (1 << 64) - 1


class SamplingParamsError(ValueError):
    """An invalid sampling parameter; ``param`` is the field's name (OpenAI's error ``param``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise SamplingParamsError(name, f"{name} must be an integer {allowed}, got {value!r}")


def _check_float(name: str, value: object, lo: float, hi: float, lo_open: bool = False, allowed: str = "") -> None:
    try:  # an integer too large for a float (10**400) is out of range, not an OverflowError
        ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
              and (lo < value if lo_open else lo <= value) and value <= hi)
    except OverflowError:
        ok = False
    if not ok:
        allowed = allowed or f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise SamplingParamsError(name, f"{name} must be a number in {allowed}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # >= 1; the engine also stops at the context length
    temperature: float = 1.0  # [0, 2]; below SAMPLING_EPS = greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = -1  # -1 or 0 = off, else >= 1
    min_p: float = 0.0  # [0, 1]: drop tokens with prob < min_p * max prob
    seed: int | None = None  # [-2**63, 2**64 - 1]; None = drawn from the engine's RNG
    presence_penalty: float = 0.0  # [-2, 2], output tokens only
    frequency_penalty: float = 0.0  # [-2, 2], output tokens only
    repetition_penalty: float = 1.0  # > 0, 1 = off; prompt and output tokens
    stop: tuple[str, ...] = ()  # a str or a list is accepted and stored as a tuple
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None = no logprobs; n in [0, 20] = chosen token's + top n
    include_stop_str_in_output: bool = False
    n: int = 1  # choices per prompt; the router fans out
    grammar: GrammarSpec | None = None  # structured output: what the output must match (grammar.py)

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, 1)
        _check_float("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        _check_float("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not -1 <= self.top_k <= MAX_TOP_K:
            raise SamplingParamsError(
                "top_k", f"top_k must be -1 or 0 (off) or an integer in [1, {MAX_TOP_K}], got {self.top_k!r}")
        _check_float("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, -(1 << 63), _MASK64)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, math.inf, lo_open=True,
                     allowed="(0, inf) (1 = off)")
        # Normalising the containers is part of construction, not a patch of a frozen object.
        object.__setattr__(self, "stop", _as_tuple("stop", self.stop, str))
        object.__setattr__(self, "stop_token_ids", _as_tuple("stop_token_ids", self.stop_token_ids, int))
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingParamsError("stop", f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if any(not s for s in self.stop):
            raise SamplingParamsError("stop", "stop strings must be non-empty")
        if self.max_stop_len > MAX_STOP_STRING_CHARS:
            raise SamplingParamsError(
                "stop", f"stop strings may be at most {MAX_STOP_STRING_CHARS} characters, got {self.max_stop_len}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise SamplingParamsError(
                "stop_token_ids", f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} stop token ids, got {len(self.stop_token_ids)}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, 0)
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(name, f"{name} must be a boolean, got {getattr(self, name)!r}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        _check_int("n", self.n, 1)
        if self.grammar is not None:
            if not isinstance(self.grammar, GrammarSpec):
                raise SamplingParamsError("grammar", f"grammar must be a GrammarSpec, got {self.grammar!r}")
            if self.ignore_eos:  # a complete grammar allows only EOS: ignoring it leaves no token at all
                raise SamplingParamsError("ignore_eos", "ignore_eos cannot be combined with structured output")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def max_stop_len(self) -> int:
        return max(map(len, self.stop), default=0)

    def with_(self, **changes: object) -> SamplingParams:
        """A copy with ``changes`` applied, validated again."""
        return replace(self, **changes)  # type: ignore[arg-type]


def _as_tuple(name: str, value: object, kind: type) -> tuple:
    if isinstance(value, str) and kind is str:  # a single stop string
        value = (value,)
    if not isinstance(value, (tuple, list)) or any(isinstance(v, bool) or not isinstance(v, kind) for v in value):
        raise SamplingParamsError(name, f"{name} must be a list of {kind.__name__}, got {value!r}")
    return tuple(value)



@dataclass(frozen=True)
class TokenLogprobs:
    token_id: int
    logprob: float  # the chosen token's raw logprob
    top_logprobs: dict[int, float]  # the top-n token ids -> raw logprob, highest first
