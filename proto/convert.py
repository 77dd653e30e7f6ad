"""Conversions between the wire messages and the engine's dataclasses, shared by workers and router."""

from __future__ import annotations

from kvferry.engine.profiles import SLORefusal
from kvferry.engine.request import PrefillTimings
from kvferry.engine.sampling import SamplingParams, TokenLogprobs
from kvferry.proto import generate_pb2, kv_transfer_pb2

# Optional proto fields -> SamplingParams fields; unset fields keep the engine's defaults.
_OPTIONAL_FIELDS = (
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "logprobs",
)


def sampling_from_proto(msg: generate_pb2.SamplingParams) -> SamplingParams:
    """Raises ``SamplingParamsError`` (a ValueError naming the field) for invalid values.

    ``stop`` strings and ``n`` are the router's: workers ignore them."""
    kwargs: dict[str, object] = {name: getattr(msg, name) for name in _OPTIONAL_FIELDS if msg.HasField(name)}
    if msg.HasField("seed"):  # uint64 on the wire; SamplingParams accepts [-2**63, 2**64 - 1]
        kwargs["seed"] = msg.seed
    if msg.stop_token_ids:
        kwargs["stop_token_ids"] = tuple(msg.stop_token_ids)
    if msg.ignore_eos:
        kwargs["ignore_eos"] = True
    return SamplingParams(**kwargs)


def logprobs_to_proto(lp: TokenLogprobs) -> kv_transfer_pb2.TokenLogprobs:
    return kv_transfer_pb2.TokenLogprobs(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top_token_ids=list(lp.top_logprobs),
        top_logprobs=list(lp.top_logprobs.values()),
    )


def logprobs_from_proto(msg: kv_transfer_pb2.TokenLogprobs) -> TokenLogprobs:
    return TokenLogprobs(msg.token_id, msg.logprob, dict(zip(msg.top_token_ids, msg.top_logprobs)))


def prefill_timings_fields(timings: PrefillTimings | None) -> dict[str, float]:
    """Keyword fields for a ``PrefillResponse`` or a ``TokenEvent`` (both carry the same two)."""
    if timings is None:
        return {}
    return {"prefill_queue_seconds": timings.queue_seconds, "prefill_compute_seconds": timings.compute_seconds}


def prefill_timings_from_proto(msg) -> PrefillTimings | None:
    """From a ``PrefillResponse`` or a ``TokenEvent``; None when the worker sent none."""
    if not msg.HasField("prefill_queue_seconds"):
        return None
    return PrefillTimings(msg.prefill_queue_seconds, msg.prefill_compute_seconds)


# An early rejection travels as a gRPC error's trailing metadata (a status code alone cannot tell it
# from a full queue, which is retried elsewhere).
REFUSAL_KEY = "x-kvferry-refusal"
RETRY_AFTER_KEY = "retry-after"


def refusal_metadata(refusal: SLORefusal) -> tuple[tuple[str, str], ...]:
    return (
        (REFUSAL_KEY, refusal.reason),
        (RETRY_AFTER_KEY, f"{refusal.retry_after_s:.3f}"),
    )


def refusal_from_metadata(metadata, message: str = "") -> SLORefusal | None:
    """From an RpcError's ``trailing_metadata()`` (sync or asyncio form); None if it is no refusal."""
    values = {key: value for key, value in metadata or ()}
    reason = values.get(REFUSAL_KEY)
    if not reason:
        return None
    try:
        retry_after = max(float(values.get(RETRY_AFTER_KEY, "1")), 0.0)
    except ValueError:
        retry_after = 1.0
    return SLORefusal(message, retry_after, reason)
