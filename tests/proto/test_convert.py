"""proto/convert.py: the shared vocabulary survives the trip through its protobuf messages."""

import pytest

from kvferry.common.fingerprint import KVFingerprint
from kvferry.common.sampling import SamplingParams, TokenLogprobs
from kvferry.common.timings import PrefillTimings
from kvferry.common.worker import SLORefusal, WorkerRole, WorkerStats
from kvferry.proto import kv_transfer_pb2, router_pb2, worker_pb2
from kvferry.proto.convert import (
    capacity_from_proto, capacity_to_proto, fingerprint_from_proto, fingerprint_to_proto, logprobs_from_proto,
    logprobs_to_proto, prefill_timings_fields, prefill_timings_from_proto, refusal_from_metadata, refusal_metadata,
    role_from_proto, role_to_proto, sampling_from_proto, sampling_to_proto, stats_to_proto,
)

FP = KVFingerprint(model_name="m", model_digest="abc", dtype="bfloat16", block_size=16, kv_layout="l", num_layers=2,
                   num_kv_heads=3, head_dim=64, vocab_size=100, max_model_len=512)


@pytest.mark.parametrize("message", [kv_transfer_pb2.Fingerprint, router_pb2.ModelFingerprint])
def test_the_fingerprint_is_the_same_through_the_handshake_and_registration(message):
    assert fingerprint_from_proto(fingerprint_to_proto(FP, message)) == FP


def test_max_model_len_is_tolerated_and_everything_else_is_checked():
    other = KVFingerprint(**{**FP.__dict__, "max_model_len": 128})
    assert other.digest == FP.digest and not FP.differences(other)
    wider = KVFingerprint(**{**FP.__dict__, "vocab_size": 101, "dtype": "float32"})
    assert wider.digest != FP.digest
    assert FP.differences(wider, "cluster", "worker") == [
        "dtype: cluster 'bfloat16', worker 'float32'", "vocab_size: cluster 100, worker 101"]
    assert FP.layer_nbytes(2) == 2 * 2 * 16 * 3 * 64 * 2


def test_sampling_params_reach_the_worker_but_the_routers_own_fields():
    params = SamplingParams(max_tokens=7, temperature=0.5, top_k=3, seed=-1, stop=("x",), stop_token_ids=(4,),
                            logprobs=2, n=3)
    back = sampling_from_proto(sampling_to_proto(params))
    assert back == params.with_(seed=(1 << 64) - 1, stop=(), n=1)


def test_roles_stats_logprobs_timings_and_refusals():
    for role in WorkerRole:
        assert role_from_proto(role_to_proto(role)) is role
    with pytest.raises(ValueError):
        role_from_proto(router_pb2.WORKER_ROLE_UNSPECIFIED)
    stats = WorkerStats(role=WorkerRole.DECODE, total_kv_blocks=8, free_kv_blocks=3, used_kv_blocks=5,
                        leases_expired_total=2, engine_busy_ms=7)
    assert stats_to_proto(stats) == worker_pb2.WorkerStats(role="decode", total_kv_blocks=8, free_kv_blocks=3,
                                                           used_kv_blocks=5, leases_expired_total=2, engine_busy_ms=7)
    # A heartbeat carries the capacity fields only.
    assert capacity_from_proto(capacity_to_proto(stats)) == WorkerStats(total_kv_blocks=8, free_kv_blocks=3,
                                                                        engine_busy_ms=7)
    lp = TokenLogprobs(5, -0.25, {5: -0.25, 9: -1.5})
    assert logprobs_from_proto(logprobs_to_proto(lp)) == lp
    assert logprobs_from_proto(logprobs_to_proto(lp), token_id=6).token_id == 6
    timings = PrefillTimings(0.5, 1.25)
    assert prefill_timings_from_proto(worker_pb2.PrefillResponse(**prefill_timings_fields(timings))) == timings
    assert prefill_timings_from_proto(worker_pb2.PrefillResponse()) is None
    refusal = SLORefusal("too late", 2.5)
    assert refusal_from_metadata(refusal_metadata(refusal), "too late") == refusal
    assert refusal_from_metadata((("other", "x"),)) is None
