"""A real prefill worker and decode worker (gRPC services on loopback, the default model) with each data
plane: greedy output equal to the decode engine prefilling the prompt itself, and a transfer corrupted
on the wire failing its request cleanly on both workers without entering the prefix cache."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from kvferry.proto import generate_pb2, worker_pb2, worker_pb2_grpc

from test_data_planes import FlippingProxy

GREEDY = generate_pb2.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
TIMEOUT = 30.0


@pytest.fixture
def services(decode_worker_factory, prefill_worker_factory):
    """make(kv_transport) -> (decode stub, prefill stub, decode worker, sender) on real servers."""
    from kvferry.decode_worker.service import create_decode_server
    from kvferry.prefill_worker.service import create_prefill_server
    from kvferry.transport.negotiation import NegotiatedKVSender

    servers, channels = [], []

    def make(kv_transport: str):
        decode = decode_worker_factory(kv_transport)
        decode_server, _, decode_port = create_decode_server(decode, "127.0.0.1", 0)
        decode_server.start()
        sender = NegotiatedKVSender(decode.fingerprint, sender_id="prefill-0", kv_transport=kv_transport)
        prefill = prefill_worker_factory(sender)
        prefill_server, _, prefill_port = create_prefill_server(prefill, "127.0.0.1", 0, transfer_timeout_s=10.0)
        prefill_server.start()
        servers.extend([prefill_server, decode_server])
        dch, pch = grpc.insecure_channel(f"127.0.0.1:{decode_port}"), grpc.insecure_channel(f"127.0.0.1:{prefill_port}")
        channels.extend([dch, pch])
        return worker_pb2_grpc.DecodeWorkerStub(dch), worker_pb2_grpc.PrefillWorkerStub(pch), decode, sender

    yield make
    for ch in channels:
        ch.close()
    for server in servers:
        server.stop(grace=None)


def disaggregated(decode, prefill, request_id, prompt):
    """(first token response or the RpcError, stream events)."""
    reservation = decode.Reserve(
        worker_pb2.ReserveRequest(request_id=request_id, prompt_token_ids=prompt, sampling=GREEDY), timeout=TIMEOUT
    )
    stream = decode.Stream(worker_pb2.StreamRequest(request_id=request_id), timeout=TIMEOUT)
    try:
        first = prefill.Prefill(
            worker_pb2.PrefillRequest(
                request_id=request_id, prompt_token_ids=prompt, sampling=GREEDY, kv_address=reservation.kv_address,
                block_ids=reservation.block_ids, receiver_instance_id=reservation.receiver_instance_id,
            ),
            timeout=TIMEOUT,
        )
    except grpc.RpcError as e:
        first = e
    return first, list(stream)


def local(decode, request_id, prompt):
    decode.Reserve(worker_pb2.ReserveRequest(request_id=request_id, prompt_token_ids=prompt, sampling=GREEDY,
                                             prefill_locally=True), timeout=TIMEOUT)
    return list(decode.Stream(worker_pb2.StreamRequest(request_id=request_id), timeout=TIMEOUT))


@pytest.mark.parametrize("transport", ["grpc", "tcp", "shm", "gloo"])
def test_greedy_output_through_each_transport_equals_the_single_engine(services, transport):
    decode, prefill, decode_worker, sender = services(transport)
    prompt = [1000 + 37 * i % 4000 for i in range(41)]  # 41 tokens: 3 blocks
    # The reference first: the decode engine alone, before any of this prompt's KV was sent to it.
    reference = [t for e in local(decode, f"{transport}-ref", prompt) for t in e.token_ids]
    first, events = disaggregated(decode, prefill, f"{transport}-g", prompt)
    assert not isinstance(first, grpc.RpcError), first
    tokens = [t for e in events for t in e.token_ids]
    assert events[-1].finish_reason == "length" and tokens[0] == first.first_token_id
    assert tokens == reference
    figures, routes = sender.stats.snapshot()
    assert routes == {"decode-0": transport} and figures[("decode-0", transport)].transfers == 1
    assert decode_worker.receiver.pair_stats.snapshot()[1] == {"prefill-0": transport}


def test_a_corrupted_transfer_fails_its_request_and_never_enters_the_prefix_cache(services):
    decode, prefill, decode_worker, _ = services("tcp")
    receiver = decode_worker.receiver
    tcp = next(o for o in receiver.offers if o.name == "tcp")
    host, port = tcp.address.split(":")
    proxy = FlippingProxy((host, int(port)), marker=None)
    receiver.set_offers([dataclasses.replace(tcp, address=proxy.address)], list(receiver.data_planes))
    prompt = [int(t) for t in range(700, 741)]
    try:
        first, events = disaggregated(decode, prefill, "corrupt", prompt)
    finally:
        proxy.close()
    assert proxy.flipped.is_set()
    assert isinstance(first, grpc.RpcError) and first.code() == grpc.StatusCode.DATA_LOSS, first
    assert "checksum mismatch" in first.details()
    assert events[-1].finish_reason == "error" and "checksum mismatch" in events[-1].error
    # The prompt's blocks were freed unregistered: prefilled here now, it finds nothing cached...
    assert local(decode, "corrupt-then-local", prompt)[0].num_cached_tokens == 0
    # ...whereas a prompt whose KV arrived intact is found (so the check above can fail).
    receiver.set_offers([tcp], list(receiver.data_planes))
    good = list(range(800, 841))
    first, _ = disaggregated(decode, prefill, "intact", good)
    assert not isinstance(first, grpc.RpcError), first
    assert local(decode, "intact-then-local", good)[0].num_cached_tokens == 32  # two full blocks of 16
