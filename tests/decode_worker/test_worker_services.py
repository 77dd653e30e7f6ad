"""The decode and prefill workers' gRPC services on loopback: a request through Reserve, Stream and
Prefill; health and reflection; status codes for bad input, no room, incompatible and dead peers; aborts
and disconnects return every block (read through GetStats)."""

from __future__ import annotations

import socket
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvferry.proto import generate_pb2, worker_pb2, worker_pb2_grpc

GREEDY = generate_pb2.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPT = list(range(2300, 2341))  # 41 tokens: 3 blocks, shared with no other test (the engines are per session, and a
# prefix another test left in their caches would make the colocated reference compute a chunk instead)
TIMEOUT = 30.0


@pytest.fixture
def cluster(decode_worker, prefill_worker_factory):
    """(decode stub, prefill stub, decode address, prefill address) on real servers."""
    from kvferry.decode_worker.service import create_decode_server
    from kvferry.prefill_worker.service import create_prefill_server
    from kvferry.transport.grpc_transport import GrpcKVSender

    decode_server, _, decode_port = create_decode_server(decode_worker, "127.0.0.1", 0)
    decode_server.start()
    prefill = prefill_worker_factory(GrpcKVSender(decode_worker.fingerprint, sender_id="prefill-0"))
    prefill_server, _, prefill_port = create_prefill_server(prefill, "127.0.0.1", 0, transfer_timeout_s=10.0)
    prefill_server.start()
    decode_addr, prefill_addr = f"127.0.0.1:{decode_port}", f"127.0.0.1:{prefill_port}"
    with grpc.insecure_channel(decode_addr) as dch, grpc.insecure_channel(prefill_addr) as pch:
        yield worker_pb2_grpc.DecodeWorkerStub(dch), worker_pb2_grpc.PrefillWorkerStub(pch), decode_addr, prefill_addr
    prefill_server.stop(grace=None)
    decode_server.stop(grace=None)


def used_blocks(stub) -> int:
    return stub.GetStats(worker_pb2.StatsRequest(), timeout=TIMEOUT).used_kv_blocks


def wait_for_no_used_blocks(*stubs) -> None:
    end = time.monotonic() + 10
    while time.monotonic() < end and any(used_blocks(s) for s in stubs):
        time.sleep(0.05)
    assert [used_blocks(s) for s in stubs] == [0] * len(stubs)


def generate(decode, prefill, request_id, prompt=PROMPT, sampling=GREEDY):
    reservation = decode.Reserve(
        worker_pb2.ReserveRequest(request_id=request_id, prompt_token_ids=prompt, sampling=sampling), timeout=TIMEOUT
    )
    stream = decode.Stream(worker_pb2.StreamRequest(request_id=request_id), timeout=TIMEOUT)
    first = prefill.Prefill(
        worker_pb2.PrefillRequest(
            request_id=request_id, prompt_token_ids=prompt, sampling=sampling, kv_address=reservation.kv_address,
            block_ids=reservation.block_ids, receiver_instance_id=reservation.receiver_instance_id,
        ),
        timeout=TIMEOUT,
    )
    return reservation, first, list(stream)


def test_request_through_the_services_matches_colocated(cluster):
    decode, prefill, _, _ = cluster
    reservation, first, events = generate(decode, prefill, "g1")
    assert len(reservation.block_ids) == 3 and reservation.lease_ms > 0
    tokens = [t for e in events for t in e.token_ids]
    assert tokens[0] == first.first_token_id and events[-1].finish_reason == "length"
    assert [e.index for e in events] == [sum(len(x.token_ids) for x in events[:i]) for i in range(len(events))]
    assert first.kv_bytes == 30 * 2 * 3 * 16 * 3 * 64 * 2 and first.transfer_seconds > 0
    decode.Reserve(
        worker_pb2.ReserveRequest(request_id="g1-ref", prompt_token_ids=PROMPT, sampling=GREEDY, prefill_locally=True),
        timeout=TIMEOUT,
    )
    reference = [t for e in decode.Stream(worker_pb2.StreamRequest(request_id="g1-ref"), timeout=TIMEOUT) for t in e.token_ids]
    assert tokens == reference
    wait_for_no_used_blocks(decode, prefill)
    stats = decode.GetStats(worker_pb2.StatsRequest(), timeout=TIMEOUT)
    assert stats.role == "decode" and stats.kv_transfers_total >= 1 and stats.free_kv_blocks == stats.total_kv_blocks


def test_health_and_reflection(cluster):
    _, _, decode_addr, prefill_addr = cluster
    for address, service in ((decode_addr, "kvferry.worker.DecodeWorker"), (decode_addr, "kvferry.kv_transfer.KVTransfer"),
                             (prefill_addr, "kvferry.worker.PrefillWorker")):
        with grpc.insecure_channel(address) as ch:
            for name in ("", service):
                answer = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
            responses = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT
            )
            names = {s.name for r in responses for s in r.list_services_response.service}
            assert service in names and "grpc.health.v1.Health" in names


@pytest.mark.parametrize(
    "prompt, sampling, field",
    [
        ([], GREEDY, "empty"),
        (PROMPT, generate_pb2.SamplingParams(temperature=5.0), "temperature"),
        (PROMPT, generate_pb2.SamplingParams(max_tokens=0), "max_tokens"),
        ([1] * 600, GREEDY, "context"),
    ],
)
def test_bad_input_is_invalid_argument(cluster, prompt, sampling, field):
    decode, prefill, decode_addr, _ = cluster
    for call, request in (
        (decode.Reserve, worker_pb2.ReserveRequest(request_id="bad", prompt_token_ids=prompt, sampling=sampling)),
        (prefill.Prefill, worker_pb2.PrefillRequest(request_id="bad", prompt_token_ids=prompt, sampling=sampling,
                                                    kv_address=decode_addr)),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in info.value.details()
    with pytest.raises(grpc.RpcError) as info:  # a reservation that does not fit the prompt
        prefill.Prefill(worker_pb2.PrefillRequest(request_id="bad2", prompt_token_ids=PROMPT, sampling=GREEDY,
                                                  kv_address=decode_addr, block_ids=[1, 2]), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    generate(decode, prefill, "after-bad")  # both still serve
    wait_for_no_used_blocks(decode, prefill)


def test_no_room_is_resource_exhausted_with_a_reason(cluster):
    decode, _, _, _ = cluster
    big = list(range(1000, 1000 + 16 * 20))  # 20 blocks; 48 in the cache
    held = []
    with pytest.raises(grpc.RpcError) as info:
        for i in range(3):
            decode.Reserve(worker_pb2.ReserveRequest(request_id=f"big{i}", prompt_token_ids=big, sampling=GREEDY),
                           timeout=TIMEOUT)
            held.append(f"big{i}")
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "blocks" in info.value.details()
    for request_id in held:
        assert decode.Abort(worker_pb2.AbortRequest(request_id=request_id), timeout=TIMEOUT).found
    wait_for_no_used_blocks(decode)


def test_abort_and_disconnect_mid_stream_return_every_block(cluster):
    decode, prefill, _, _ = cluster
    long = generate_pb2.SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    for how in ("abort", "disconnect"):
        request_id = f"mid-{how}"
        reservation = decode.Reserve(
            worker_pb2.ReserveRequest(request_id=request_id, prompt_token_ids=PROMPT, sampling=long), timeout=TIMEOUT
        )
        stream = decode.Stream(worker_pb2.StreamRequest(request_id=request_id), timeout=TIMEOUT)
        prefill.Prefill(worker_pb2.PrefillRequest(
            request_id=request_id, prompt_token_ids=PROMPT, sampling=long, kv_address=reservation.kv_address,
            receiver_instance_id=reservation.receiver_instance_id), timeout=TIMEOUT)
        first = next(stream)
        assert first.index == 0 and used_blocks(decode) > 0
        if how == "abort":
            assert decode.Abort(worker_pb2.AbortRequest(request_id=request_id), timeout=TIMEOUT).found
            prefill.Abort(worker_pb2.AbortRequest(request_id=request_id), timeout=TIMEOUT)  # idempotent, done there
            assert list(stream)[-1].finish_reason == "abort"
        else:
            stream.cancel()
        wait_for_no_used_blocks(decode, prefill)


def test_incompatible_decode_side_fails_prefill_at_handshake_naming_the_field(cluster):
    from kvferry.transport.grpc_transport import create_server, add_kv_transfer_service
    from kvferry.transport.receiver import KVReceiver

    decode, prefill, _, _ = cluster
    fp = decode.GetStats(worker_pb2.StatsRequest(), timeout=TIMEOUT)  # only to show the decode side is fine
    assert fp.role == "decode"
    from kvferry.transport.base import KVFingerprint
    from kvferry.engine.config import ModelConfig

    other = KVFingerprint.from_model(
        ModelConfig(architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=1e5,
                    max_position_embeddings=8192, tie_word_embeddings=True, name="SmolLM2-135M-Instruct.Q4_1.gguf"),
        torch.float32, 16,
    )
    caches = [torch.zeros(2, 4, 16, 3, 64) for _ in range(30)]
    server, _, port = create_server("127.0.0.1:0", ["kvferry.kv_transfer.KVTransfer"])
    add_kv_transfer_service(server, KVReceiver(caches, other))
    server.start()
    try:
        with pytest.raises(grpc.RpcError) as info:
            prefill.Prefill(worker_pb2.PrefillRequest(request_id="fp", prompt_token_ids=PROMPT, sampling=GREEDY,
                                                      kv_address=f"127.0.0.1:{port}"), timeout=TIMEOUT)
    finally:
        server.stop(grace=None)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "dtype: sender 'bfloat16', receiver 'float32'" in info.value.details()
    wait_for_no_used_blocks(prefill)


def test_dead_decode_peer_fails_prefill_fast_and_frees_blocks(cluster):
    _, prefill, _, _ = cluster
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        prefill.Prefill(worker_pb2.PrefillRequest(request_id="dead", prompt_token_ids=PROMPT, sampling=GREEDY,
                                                  kv_address=dead), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert time.monotonic() - t0 < 10.0
    wait_for_no_used_blocks(prefill)
