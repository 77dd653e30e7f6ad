"""What a worker accepts from the network, on real decode and prefill workers (the default model) behind
their gRPC servers: the cluster token on every RPC and KV push, and range checks on wire fields before
they reach an engine (a first token outside the vocabulary, over-long request ids)."""

from __future__ import annotations

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvferry.proto import generate_pb2, kv_transfer_pb2, kv_transfer_pb2_grpc, worker_pb2, worker_pb2_grpc
from kvferry.proto.cluster_security import ClusterSecurity
from kvferry.transport.base import FirstToken, KVTarget, TransferState

TOKEN = "cluster-secret"
GREEDY = generate_pb2.SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
PROMPT = list(range(300, 333))  # 33 tokens: 3 blocks
TIMEOUT = 30.0


@pytest.fixture
def secured(decode_worker, prefill_worker_factory, request):
    """(decode address, prefill address) of real workers whose servers want the cluster token, built as
    `kvferry decode` / `kvferry prefill` build them, with the KV data plane ``request.param`` (grpc)."""
    from kvferry.decode_worker.service import create_decode_server
    from kvferry.prefill_worker.service import create_prefill_server
    from kvferry.transport.negotiation import NegotiatedKVSender, start_receiver_transports

    kv_transport = getattr(request, "param", "grpc")
    security = ClusterSecurity(token=TOKEN)
    start_receiver_transports(decode_worker.receiver, kv_transport)
    decode_server, _, decode_port = create_decode_server(decode_worker, "127.0.0.1", 0, security=security)
    prefill = prefill_worker_factory(NegotiatedKVSender(decode_worker.fingerprint, kv_transport=kv_transport,
                                                        security=security))
    prefill_server, _, prefill_port = create_prefill_server(prefill, "127.0.0.1", 0, 10.0, security=security)
    decode_server.start()
    prefill_server.start()
    yield f"127.0.0.1:{decode_port}", f"127.0.0.1:{prefill_port}"
    prefill_server.stop(grace=None)
    decode_server.stop(grace=None)


def used_blocks(decode: worker_pb2_grpc.DecodeWorkerStub) -> int:
    return decode.GetStats(worker_pb2.StatsRequest(), timeout=TIMEOUT).used_kv_blocks


def reserve(decode, request_id: str) -> worker_pb2.ReserveResponse:
    return decode.Reserve(worker_pb2.ReserveRequest(request_id=request_id, prompt_token_ids=PROMPT, sampling=GREEDY),
                          timeout=TIMEOUT)


@pytest.mark.parametrize("secured", ["grpc", "tcp", "shm"], indirect=True)  # the token gates each data plane
def test_every_worker_rpc_needs_the_cluster_token(secured, decode_worker):
    decode_address, prefill_address = secured
    with grpc.insecure_channel(decode_address) as dch, grpc.insecure_channel(prefill_address) as pch:
        decode, prefill = worker_pb2_grpc.DecodeWorkerStub(dch), worker_pb2_grpc.PrefillWorkerStub(pch)
        kv = kv_transfer_pb2_grpc.KVTransferStub(dch)
        calls = {
            "Reserve": lambda: reserve(decode, "intruder"),
            "Stream": lambda: list(decode.Stream(worker_pb2.StreamRequest(request_id="x"), timeout=5)),
            "Abort": lambda: decode.Abort(worker_pb2.AbortRequest(request_id="x"), timeout=5),
            "GetStats": lambda: decode.GetStats(worker_pb2.StatsRequest(), timeout=5),
            "Handshake": lambda: kv.Handshake(kv_transfer_pb2.HandshakeRequest(), timeout=5),
            "PushKV": lambda: kv.PushKV(iter([kv_transfer_pb2.KVChunk(header=kv_transfer_pb2.KVHeader(
                request_id="x"))]), timeout=5),
            "Prefill": lambda: prefill.Prefill(worker_pb2.PrefillRequest(
                request_id="intruder", prompt_token_ids=PROMPT, sampling=GREEDY, kv_address=decode_address),
                timeout=5),
            "Prefill.Abort": lambda: prefill.Abort(worker_pb2.AbortRequest(request_id="x"), timeout=5),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        for channel in (dch, pch):  # health probes need no secret
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert decode_worker.engine.block_manager.num_used_blocks == 0  # nothing was reserved

    security = ClusterSecurity(token=TOKEN)  # with the token: a whole request, KV pushed with the token
    with security.channel(decode_address) as dch, security.channel(prefill_address) as pch:
        decode, prefill = worker_pb2_grpc.DecodeWorkerStub(dch), worker_pb2_grpc.PrefillWorkerStub(pch)
        reservation = reserve(decode, "member")
        stream = decode.Stream(worker_pb2.StreamRequest(request_id="member"), timeout=TIMEOUT)
        first = prefill.Prefill(worker_pb2.PrefillRequest(
            request_id="member", prompt_token_ids=PROMPT, sampling=GREEDY, kv_address=reservation.kv_address,
            block_ids=reservation.block_ids, receiver_instance_id=reservation.receiver_instance_id), timeout=TIMEOUT)
        events = list(stream)
        assert first.kv_bytes > 0 and events[-1].finish_reason == "length", events[-1]
        assert [t for e in events for t in e.token_ids][0] == first.first_token_id


def test_a_first_token_outside_the_vocabulary_fails_only_that_request(secured, decode_worker):
    from kvferry.transport.grpc_transport import GrpcKVSender

    decode_address, _ = secured
    vocab = decode_worker.engine.model_config.vocab_size
    security = ClusterSecurity(token=TOKEN)
    sender = GrpcKVSender(decode_worker.fingerprint, sender_id="bad-prefill", security=security)
    src = [torch.zeros_like(layer) for layer in decode_worker.engine.kv_caches]
    try:
        with security.channel(decode_address) as channel:
            decode = worker_pb2_grpc.DecodeWorkerStub(channel)
            reservation = reserve(decode, "bad-first")
            stream = decode.Stream(worker_pb2.StreamRequest(request_id="bad-first"), timeout=TIMEOUT)
            target = KVTarget(reservation.kv_address, reservation.receiver_instance_id, timeout_s=10.0)
            handle = sender.send(target, "bad-first", src, [0, 1, 2], FirstToken(vocab + 7))
            assert handle.wait(10.0) is TransferState.DONE, handle.error  # the KV itself was fine
            events = list(stream)
            assert events[-1].finish_reason == "error" and "first token id" in events[-1].error, events[-1]
            assert not any(e.token_ids for e in events)
            assert used_blocks(decode) == 0
            # The worker's loop is alive and serves the next request.
            local = decode.Reserve(worker_pb2.ReserveRequest(request_id="after", prompt_token_ids=PROMPT,
                                                             sampling=GREEDY, prefill_locally=True), timeout=TIMEOUT)
            assert local is not None
            after = list(decode.Stream(worker_pb2.StreamRequest(request_id="after"), timeout=TIMEOUT))
            assert after[-1].finish_reason == "length" and sum(len(e.token_ids) for e in after) == 4
    finally:
        sender.close()


def test_an_overlong_request_id_is_invalid_argument(secured, decode_worker):
    decode_address, prefill_address = secured
    security = ClusterSecurity(token=TOKEN)
    long_id = "r" * 513
    with security.channel(decode_address) as dch, security.channel(prefill_address) as pch:
        with pytest.raises(grpc.RpcError) as err:
            reserve(worker_pb2_grpc.DecodeWorkerStub(dch), long_id)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            worker_pb2_grpc.PrefillWorkerStub(pch).Prefill(worker_pb2.PrefillRequest(
                request_id=long_id, prompt_token_ids=PROMPT, sampling=GREEDY, kv_address=decode_address), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in err.value.details()
    assert decode_worker.engine.block_manager.num_used_blocks == 0
