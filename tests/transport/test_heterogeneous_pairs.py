"""A prefill worker and a decode worker whose KV differs in dtype or block size: refused at the
handshake with a message naming each difference, before any block moves, on every data plane; through
real workers (a bf16 prefill worker, an fp32 decode worker) the request fails cleanly and no block
stays in use on either side. KV is never converted between dtypes."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
import torch

from kvferry.proto import generate_pb2, worker_pb2, worker_pb2_grpc
from kvferry.transport.base import FirstToken, KVFingerprint, KVTarget, TransferErrorCode, TransferState

from conftest import engine_config
from kv_helpers import NETWORK_TRANSPORTS, ReceiverServer, kv_caches, model_config, sender

GREEDY = generate_pb2.SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
TIMEOUT = 30.0


@pytest.mark.parametrize("transport", NETWORK_TRANSPORTS)
def test_dtype_and_block_size_differences_are_refused_at_handshake_naming_each(transport):
    bf16_bs4 = KVFingerprint.from_model(model_config(), torch.bfloat16, 4)
    fp32_bs8 = KVFingerprint.from_model(model_config(), torch.float32, 8)
    server = ReceiverServer("auto", fp=fp32_bs8, caches=[c.float() for c in kv_caches(fill=0.0)])
    server.receiver.expect("mixed", [0])
    s = sender(transport, fp=bf16_bs4)
    try:
        h = s.send(KVTarget(server.address, server.receiver.instance_id, 10.0), "mixed", kv_caches(), [1],
                   FirstToken(1))
        assert h.wait(10.0) is TransferState.FAILED
    finally:
        s.close()
        server.close()
    assert h.error.code is TransferErrorCode.INCOMPATIBLE, h.error
    assert "dtype: sender 'bfloat16', receiver 'float32'" in h.error.message
    assert "block_size: sender 4, receiver 8" in h.error.message
    assert "same --dtype and --block-size" in h.error.message
    assert server.ends.events == [] and server.receiver.poll("mixed") is TransferState.PENDING  # nothing moved


@pytest.fixture(scope="module")
def fp32_decode_engine(model_path):
    from kvferry.engine.engine import LLMEngine

    return LLMEngine(dataclasses.replace(engine_config(), dtype="float32"), role="decode")


def test_bf16_prefill_worker_and_fp32_decode_worker_fail_the_request_cleanly(
    fp32_decode_engine, transport_prefill_engine, prefill_worker_factory
):
    from kvferry.decode_worker.service import create_decode_server
    from kvferry.decode_worker.worker import DecodeWorker, DecodeWorkerConfig
    from kvferry.prefill_worker.service import create_prefill_server
    from kvferry.transport.negotiation import NegotiatedKVSender, start_receiver_transports

    engine = transport_prefill_engine
    fp = KVFingerprint.from_model(engine.model_config, engine.dtype, engine.config.cache.block_size)
    decode_worker = DecodeWorker(fp32_decode_engine, DecodeWorkerConfig(lease_s=30.0, idle_wait_s=0.01),
                                 worker_id="decode-fp32")
    start_receiver_transports(decode_worker.receiver, "auto")
    decode_worker.start()
    prefill = prefill_worker_factory(NegotiatedKVSender(fp, sender_id="prefill-bf16", kv_transport="auto"))
    decode_server, _, decode_port = create_decode_server(decode_worker, "127.0.0.1", 0)
    prefill_server, _, prefill_port = create_prefill_server(prefill, "127.0.0.1", 0, transfer_timeout_s=10.0)
    decode_server.start()
    prefill_server.start()
    dch, pch = grpc.insecure_channel(f"127.0.0.1:{decode_port}"), grpc.insecure_channel(f"127.0.0.1:{prefill_port}")
    try:
        decode, prefill_stub = worker_pb2_grpc.DecodeWorkerStub(dch), worker_pb2_grpc.PrefillWorkerStub(pch)
        prompt = list(range(600, 641))
        reservation = decode.Reserve(worker_pb2.ReserveRequest(request_id="mixed", prompt_token_ids=prompt,
                                                               sampling=GREEDY), timeout=TIMEOUT)
        stream = decode.Stream(worker_pb2.StreamRequest(request_id="mixed"), timeout=TIMEOUT)
        with pytest.raises(grpc.RpcError) as refused:
            prefill_stub.Prefill(worker_pb2.PrefillRequest(
                request_id="mixed", prompt_token_ids=prompt, sampling=GREEDY, kv_address=reservation.kv_address,
                block_ids=reservation.block_ids, receiver_instance_id=reservation.receiver_instance_id,
            ), timeout=TIMEOUT)
        decode.Abort(worker_pb2.AbortRequest(request_id="mixed"), timeout=TIMEOUT)  # as the router does
        events = list(stream)
    finally:
        dch.close()
        pch.close()
        prefill_server.stop(grace=None)
        decode_server.stop(grace=None)
        decode_worker.stop()
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value
    assert "dtype: sender 'bfloat16', receiver 'float32'" in refused.value.details()
    assert "block_size" not in refused.value.details().split("(give")[0]  # only the field that differs
    assert events[-1].finish_reason in ("abort", "error") and not any(e.token_ids for e in events), events
    assert decode_worker.receiver.transfers_total == 0  # refused before any block moved
    assert fp32_decode_engine.block_manager.num_used_blocks == 0
    fp32_decode_engine.block_manager.check_integrity()
