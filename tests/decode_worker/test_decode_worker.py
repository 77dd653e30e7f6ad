"""Decode worker + prefill worker on real engines through the in-process transport: exact tokens,
backpressure, leases, aborts, bad input. Block counts are read from the engines after every test."""

from __future__ import annotations

import queue
import time

import pytest
import torch

from kvferry.common.worker import NoRoom
from kvferry.decode_worker.worker import TokenEvent
from kvferry.engine.sampling import SamplingParams
from kvferry.prefill_worker.worker import PrefillAborted
from kvferry.transport.base import KVTarget, TransferError, TransferErrorCode
from kvferry.transport.inprocess import InProcessKVSender
from waiting import wait_until

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = [
    list(range(200, 237)),  # 37 tokens: 3 blocks, the last one partial
    list(range(1000, 1032)),  # exactly 2 blocks
    [5, 9, 300, 4000, 17],
]


def drain(events: queue.Queue, timeout_s: float = 60.0) -> list[TokenEvent]:
    out: list[TokenEvent] = []
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            event = events.get(timeout=0.1)
        except queue.Empty:
            continue
        out.append(event)
        if event.finish_reason is not None:
            return out
    raise AssertionError(f"stream did not finish within {timeout_s}s: {out}")


def tokens_of(events: list[TokenEvent]) -> list[int]:
    tokens = []
    for e in events:
        assert e.index == len(tokens), "events must be contiguous from index 0"
        tokens.extend(e.token_ids)
    return tokens


def run_disaggregated(decode_worker, prefill, request_id, prompt, params=GREEDY):
    reservation = decode_worker.reserve(request_id, prompt, params)
    events = decode_worker.subscribe(request_id)
    target = KVTarget("decode-0", reservation.receiver_instance_id)
    result = prefill.prefill(request_id, prompt, params, target, len(reservation.block_ids)).result(60)
    return result, drain(events)


def test_disaggregated_greedy_matches_colocated(decode_worker, prefill_worker_factory):
    prefill = prefill_worker_factory(InProcessKVSender({"decode-0": decode_worker.receiver}, decode_worker.fingerprint))
    for i, prompt in enumerate(PROMPTS):
        result, events = run_disaggregated(decode_worker, prefill, f"d{i}", prompt)
        # Reference: the same engine doing the whole request itself (the single-process path).
        decode_worker.reserve(f"c{i}", prompt, GREEDY, prefill_locally=True)
        reference = drain(decode_worker.subscribe(f"c{i}"))
        assert tokens_of(events) == tokens_of(reference), f"prompt {i}"
        assert tokens_of(events)[0] == result.first_token_id
        assert events[-1].finish_reason == "length" and len(tokens_of(events)) == GREEDY.max_tokens
        assert result.kv_bytes == 30 * 2 * -(-len(prompt) // 16) * 16 * 3 * 64 * 2
    assert wait_until(lambda: decode_worker.engine.block_manager.num_used_blocks == 0, timeout_s=10)
    assert wait_until(lambda: prefill.engine.block_manager.num_used_blocks == 0, timeout_s=10)
    stats = decode_worker.stats()
    assert stats.kv_transfers_total >= len(PROMPTS) and stats.used_kv_blocks == 0


def test_logprobs_and_seeded_sampling_cross_the_wire(decode_worker, prefill_worker_factory):
    prefill = prefill_worker_factory(InProcessKVSender({"decode-0": decode_worker.receiver}, decode_worker.fingerprint))
    params = SamplingParams(temperature=0.8, seed=1234, max_tokens=6, logprobs=2, ignore_eos=True)
    result, events = run_disaggregated(decode_worker, prefill, "lp", PROMPTS[0], params)
    decode_worker.reserve("lp-ref", PROMPTS[0], params, prefill_locally=True)
    reference = drain(decode_worker.subscribe("lp-ref"))
    assert tokens_of(events) == tokens_of(reference)
    logprobs = [lp for e in events for lp in (e.logprobs or [])]
    assert [lp.token_id for lp in logprobs] == tokens_of(events)
    assert all(len(lp.top_logprobs) == 2 for lp in logprobs)
    assert result.first_logprobs is not None and result.first_logprobs.token_id == result.first_token_id


def test_reserve_refuses_with_a_reason_when_out_of_blocks(decode_worker):
    bm = decode_worker.engine.block_manager
    held = []
    prompt = list(range(100, 100 + 16 * 10))  # 10 blocks each
    with pytest.raises(NoRoom, match="blocks"):
        for i in range(bm.num_blocks // 10 + 1):  # bounded: one more than fits
            decode_worker.reserve(f"full{i}", prompt, GREEDY)
            held.append(f"full{i}")
    assert held and bm.num_free_blocks < 10
    for request_id in held:
        assert decode_worker.abort(request_id)
    assert bm.num_used_blocks == 0


def test_lease_expiry_frees_blocks_when_kv_never_arrives(decode_worker):
    bm = decode_worker.engine.block_manager
    decode_worker.reserve("lease", PROMPTS[0], GREEDY, lease_s=0.3)
    events = decode_worker.subscribe("lease")
    assert bm.num_used_blocks == 3
    final = drain(events, timeout_s=5.0)[-1]
    assert final.finish_reason == "error" and "lease expired" in final.error
    assert bm.num_used_blocks == 0
    assert decode_worker.stats().leases_expired_total >= 1
    assert decode_worker.receiver.poll("lease") is None  # a late push finds no reservation


def test_renewed_lease_keeps_the_reservation_until_renewals_stop(decode_worker):
    bm = decode_worker.engine.block_manager
    decode_worker.reserve("renewed", PROMPTS[0], GREEDY, lease_s=0.3)
    events = decode_worker.subscribe("renewed")
    for _ in range(8):  # 1.2 s: four leases long
        time.sleep(0.15)
        assert decode_worker.renew("renewed")
    assert bm.num_used_blocks == 3 and events.empty()
    final = drain(events, timeout_s=5.0)[-1]  # no more renewals: it expires
    assert final.finish_reason == "error" and "lease expired" in final.error
    assert bm.num_used_blocks == 0
    assert not decode_worker.renew("renewed") and not decode_worker.renew("never-reserved")


def test_abort_mid_stream_frees_blocks(decode_worker, prefill_worker_factory):
    prefill = prefill_worker_factory(InProcessKVSender({"decode-0": decode_worker.receiver}, decode_worker.fingerprint))
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    reservation = decode_worker.reserve("ab", PROMPTS[0], params)
    events = decode_worker.subscribe("ab")
    prefill.prefill("ab", PROMPTS[0], params, KVTarget("decode-0", reservation.receiver_instance_id)).result(60)
    first = events.get(timeout=30)
    assert first.index == 0 and first.token_ids
    assert decode_worker.abort("ab")
    final = drain(events)[-1]
    assert final.finish_reason == "abort"
    assert decode_worker.engine.block_manager.num_used_blocks == 0
    assert prefill.engine.block_manager.num_used_blocks == 0
    assert not decode_worker.abort("ab")  # idempotent
    decode_worker.unsubscribed("ab")


def test_an_abort_that_overtakes_its_reservation_refuses_the_reservation(decode_worker):
    """The router aborts a Reserve its client cancelled; the abort can reach the worker first. The late
    reservation must be refused, not held (blocks and a batch slot) until its lease runs out."""
    for request_id, local in (("overtaken", False), ("overtaken-local", True)):
        assert not decode_worker.abort(request_id)
        with pytest.raises(ValueError, match="aborted before its reservation arrived"):
            decode_worker.reserve(request_id, PROMPTS[1], GREEDY, prefill_locally=local)
    assert decode_worker.engine.block_manager.num_used_blocks == 0
    assert not decode_worker.engine.has_unfinished_requests()
    decode_worker.reserve("overtaken", PROMPTS[1], GREEDY)  # remembered once: the id can be used again
    assert decode_worker.abort("overtaken")


def test_subscriber_going_away_aborts(decode_worker):
    decode_worker.reserve("gone", PROMPTS[1], GREEDY)
    decode_worker.subscribe("gone")
    decode_worker.unsubscribed("gone")
    assert wait_until(lambda: decode_worker.engine.block_manager.num_used_blocks == 0, timeout_s=10)


def test_prefill_to_unreachable_decode_fails_and_frees_blocks(decode_worker, prefill_worker_factory):
    prefill = prefill_worker_factory(InProcessKVSender({}, decode_worker.fingerprint))
    future = prefill.prefill("lost", PROMPTS[0], GREEDY, KVTarget("nowhere"))
    with pytest.raises(TransferError) as info:
        future.result(60)
    assert info.value.code is TransferErrorCode.UNAVAILABLE
    assert wait_until(lambda: prefill.engine.block_manager.num_used_blocks == 0, timeout_s=10)


def test_prefill_abort_while_sending_frees_blocks(decode_worker, prefill_worker_factory):
    """A decode peer that accepts connections but never answers holds the transfer open: aborting the
    request on the prefill worker frees its blocks and fails the caller, well before the deadline."""
    import socket

    from kvferry.transport.grpc_transport import GrpcKVSender

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        sender = GrpcKVSender(decode_worker.fingerprint, handshake_timeout_s=30.0)
        prefill = prefill_worker_factory(sender)
        target = KVTarget(f"127.0.0.1:{listener.getsockname()[1]}", timeout_s=60.0)
        future = prefill.prefill("pa", PROMPTS[0], GREEDY, target)
        assert wait_until(lambda: prefill.stats().running_requests == 1, timeout_s=30.0)  # first token out
        assert prefill.engine.block_manager.num_used_blocks == 3  # held until acknowledged
        assert prefill.abort("pa")
        with pytest.raises(PrefillAborted):
            future.result(5)
        assert prefill.engine.block_manager.num_used_blocks == 0
        sender.close()
    finally:
        listener.close()


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        ([], GREEDY, "empty"),
        ([1] * 600, GREEDY, "context"),
        ([10**6], GREEDY, "token ids"),
    ],
)
def test_bad_input_is_refused_and_the_worker_keeps_serving(decode_worker, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        decode_worker.reserve("bad", prompt, params)
    decode_worker.reserve("good", PROMPTS[2], GREEDY, prefill_locally=True)
    assert drain(decode_worker.subscribe("good"))[-1].finish_reason == "length"


def test_kv_is_sent_layer_by_layer_during_the_prefill_step(decode_worker, prefill_worker_factory):
    """Each layer goes out from the engine's layer hook while the step still runs: when layer 0 is
    sent, the last layer's KV for the prompt has not been computed yet."""
    prefill = prefill_worker_factory(InProcessKVSender({"decode-0": decode_worker.receiver}, decode_worker.fingerprint))
    engine = prefill.engine
    sent_layers: list[int] = []
    last_layer_when_layer0_sent: list[torch.Tensor] = []
    hook = prefill._on_layer

    def recording_hook(layer_idx, kv_cache_layer, finishing):
        ((_, block_ids),) = finishing
        if layer_idx == 0:
            last_layer_when_layer0_sent.append(engine.kv_caches[-1][:, block_ids].clone())
        sent_layers.append(layer_idx)
        hook(layer_idx, kv_cache_layer, finishing)

    engine.set_layer_hook(recording_hook)
    try:
        prompt = [int(t) for t in torch.randint(1000, 40000, (35,), generator=torch.Generator().manual_seed(7))]
        reservation = decode_worker.reserve("ovl", prompt, GREEDY)
        events = decode_worker.subscribe("ovl")
        prefill.prefill("ovl", prompt, GREEDY, KVTarget("decode-0")).result(60)
        drain(events)
    finally:
        engine.set_layer_hook(hook)
    assert sent_layers == list(range(30))
    # The decode side got the final last-layer KV, which differs from what was there at layer 0's send.
    final = decode_worker.engine.kv_caches[-1][:, reservation.block_ids]
    assert not torch.equal(last_layer_when_layer0_sent[0], final)


def test_chunked_prefill_ships_every_chunk(decode_worker, prefill_worker_factory):
    """A prompt over the prefill engine's token budget (256) takes two steps; the KV of both chunks
    arrives, and the tokens equal the single-engine run."""
    prefill = prefill_worker_factory(InProcessKVSender({"decode-0": decode_worker.receiver}, decode_worker.fingerprint))
    prompt = [int(t) for t in torch.randint(1000, 40000, (300,), generator=torch.Generator().manual_seed(3))]
    result, events = run_disaggregated(decode_worker, prefill, "chunked", prompt)
    assert result.kv_bytes == 30 * 2 * 19 * 16 * 3 * 64 * 2
    decode_worker.reserve("chunked-ref", prompt, GREEDY, prefill_locally=True)
    assert tokens_of(events) == tokens_of(drain(decode_worker.subscribe("chunked-ref")))
