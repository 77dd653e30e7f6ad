"""The one place the shared vocabulary (``kvferry.common``) becomes protobuf messages and back.

Messages that carry a dataclass's fields under the same names are converted field by field, the
dataclass being the one list of them (a field missing from a message fails loudly).
"""

from __future__ import annotations

import dataclasses

from kvferry.common.fingerprint import KVFingerprint
from kvferry.common.grammar import GrammarError, GrammarSpec
from kvferry.common.sampling import SamplingParams, SamplingParamsError, TokenLogprobs
from kvferry.common.timings import PrefillTimings
from kvferry.common.worker import SLORefusal, WorkerRole, WorkerStats
from kvferry.proto import generate_pb2, kv_transfer_pb2, router_pb2, worker_pb2

_MASK64 = (1 << 64) - 1
# Optional proto fields, under SamplingParams' names: set from each value that is not None, and on the way
# back only where set (unset fields keep the engine's defaults).
_OPTIONAL_FIELDS = (
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "logprobs",
)


def sampling_to_proto(params: SamplingParams) -> generate_pb2.SamplingParams:
    """Workers get everything but ``stop`` strings and ``n``: those are the router's."""
    optional = {name: getattr(params, name) for name in _OPTIONAL_FIELDS if getattr(params, name) is not None}
    msg = generate_pb2.SamplingParams(
        **optional, stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos, n=1,
    )
    if params.seed is not None:
        msg.seed = params.seed & _MASK64
    if params.grammar is not None:
        msg.grammar.CopyFrom(grammar_to_proto(params.grammar))
    return msg


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
    if msg.HasField("grammar"):
        kwargs["grammar"] = grammar_from_proto(msg.grammar)
    return SamplingParams(**kwargs)


def grammar_to_proto(spec: GrammarSpec) -> generate_pb2.Grammar:
    if spec.kind == "json_object":
        return generate_pb2.Grammar(json_object=True)
    return generate_pb2.Grammar(**{spec.kind: spec.source})


def grammar_from_proto(msg: generate_pb2.Grammar) -> GrammarSpec:
    """Raises ``SamplingParamsError`` naming ``grammar.<kind>`` for a grammar that does not compile."""
    kind = msg.WhichOneof("kind")
    if kind is None or (kind == "json_object" and not msg.json_object):
        raise SamplingParamsError("grammar", "grammar: set one of json_schema, json_object (true), regex or lark")
    try:
        return GrammarSpec(kind) if kind == "json_object" else GrammarSpec(kind, getattr(msg, kind))
    except GrammarError as exc:
        raise SamplingParamsError(f"grammar.{kind}", f"grammar.{kind}: {exc}") from None


def logprobs_to_proto(lp: TokenLogprobs) -> kv_transfer_pb2.TokenLogprobs:
    return kv_transfer_pb2.TokenLogprobs(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top_token_ids=list(lp.top_logprobs),
        top_logprobs=list(lp.top_logprobs.values()),
    )


def logprobs_from_proto(msg: kv_transfer_pb2.TokenLogprobs, token_id: int | None = None) -> TokenLogprobs:
    """``token_id``: the sampled token, where the message travels beside it (``TokenEvent.token_ids``,
    ``PrefillResponse.first_token_id``): that one is taken."""
    token = msg.token_id if token_id is None else token_id
    return TokenLogprobs(token, msg.logprob, dict(zip(msg.top_token_ids, msg.top_logprobs)))


# --- fingerprint, role, stats -------------------------------------------------------------------


def fingerprint_to_proto(fp: KVFingerprint, message=kv_transfer_pb2.Fingerprint):
    """``message``: ``kv_transfer_pb2.Fingerprint`` (the KV handshake) or ``router_pb2.ModelFingerprint``
    (registration); both carry every field of ``KVFingerprint``."""
    return message(**dataclasses.asdict(fp))


def fingerprint_from_proto(msg) -> KVFingerprint:
    return KVFingerprint(**{f.name: getattr(msg, f.name) for f in dataclasses.fields(KVFingerprint)})


_ROLES = {
    WorkerRole.PREFILL: router_pb2.WORKER_ROLE_PREFILL,
    WorkerRole.DECODE: router_pb2.WORKER_ROLE_DECODE,
    WorkerRole.COLOCATED: router_pb2.WORKER_ROLE_COLOCATED,
}
_ROLES_FROM_PROTO = {v: k for k, v in _ROLES.items()}


def role_to_proto(role: WorkerRole | str) -> int:
    return _ROLES[WorkerRole(role)]


def role_from_proto(value: int) -> WorkerRole:
    """ValueError for a role this version does not know (unspecified included)."""
    if value not in _ROLES_FROM_PROTO:
        raise ValueError(f"unknown worker role {value}")
    return _ROLES_FROM_PROTO[value]


_CAPACITY_FIELDS = tuple(f.name for f in router_pb2.WorkerCapacity.DESCRIPTOR.fields)


def capacity_to_proto(stats: WorkerStats) -> router_pb2.WorkerCapacity:
    """What a heartbeat carries of a worker's stats."""
    return router_pb2.WorkerCapacity(**{name: getattr(stats, name) for name in _CAPACITY_FIELDS})


def capacity_from_proto(msg: router_pb2.WorkerCapacity) -> WorkerStats:
    return WorkerStats(**{name: getattr(msg, name) for name in _CAPACITY_FIELDS})


def stats_to_proto(stats: WorkerStats) -> worker_pb2.WorkerStats:
    return worker_pb2.WorkerStats(**dataclasses.asdict(stats))


# --- timings and refusals -----------------------------------------------------------------------


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
