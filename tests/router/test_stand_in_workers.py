"""The scripted decode worker that most router tests run against (router_test_workers.py) reserves and
frees KV blocks as the real decode worker does, so a router test cannot pass on a stand-in that has
drifted from the worker it stands for. Both are driven over gRPC with the same Reserve and Abort calls."""

from __future__ import annotations

import grpc
import pytest

from kvferry.common.sampling import SamplingParams
from kvferry.proto import router_pb2, worker_pb2, worker_pb2_grpc
from kvferry.proto.convert import sampling_to_proto
from real_workers import small_engine_config
from router_test_workers import BLOCK_SIZE, ScriptedDecode, WorkerProcess

PROMPT_LENGTHS = (1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 2 * BLOCK_SIZE, 2 * BLOCK_SIZE + 1)


@pytest.fixture(scope="module")
def real_decode():
    from kvferry.decode_worker.service import create_decode_server
    from kvferry.decode_worker.worker import DecodeWorker
    from kvferry.engine.engine import LLMEngine

    config = small_engine_config()
    assert config.cache.block_size == BLOCK_SIZE
    worker = DecodeWorker(LLMEngine(config, role="decode"), worker_id="decode-real")
    server, _, port = create_decode_server(worker, "127.0.0.1", 0)
    worker.start()
    server.start()
    yield worker, f"127.0.0.1:{port}"
    worker.stop()
    server.stop(None)


@pytest.fixture
def scripted_decode():
    process = WorkerProcess(ScriptedDecode([5, 6, 7], total_blocks=256), router_pb2.WORKER_ROLE_DECODE,
                            "127.0.0.1:1")  # never registers: only its server is used
    yield process.address
    process.stop()


def reserve_and_abort(address: str) -> tuple[list[int], int]:
    """Block counts of one Reserve per prompt length, and the blocks in use once all are aborted."""
    sampling = sampling_to_proto(SamplingParams(max_tokens=4))
    with grpc.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.DecodeWorkerStub(channel)
        counts = []
        for n in PROMPT_LENGTHS:
            request = worker_pb2.ReserveRequest(request_id=f"r{n}", prompt_token_ids=[7] * n, sampling=sampling)
            counts.append(len(stub.Reserve(request, timeout=10).block_ids))
        used = stub.GetStats(worker_pb2.StatsRequest(), timeout=10).used_kv_blocks
        assert used == sum(counts)
        for n in PROMPT_LENGTHS:
            stub.Abort(worker_pb2.AbortRequest(request_id=f"r{n}"), timeout=10)
        return counts, stub.GetStats(worker_pb2.StatsRequest(), timeout=10).used_kv_blocks


def test_the_stand_in_reserves_and_frees_blocks_as_the_real_decode_worker_does(real_decode, scripted_decode):
    worker, address = real_decode
    real_counts, _ = reserve_and_abort(address)
    scripted_counts, scripted_left = reserve_and_abort(scripted_decode)
    assert scripted_counts == real_counts
    assert scripted_left == 0
    assert worker.engine.block_manager.num_used_blocks == 0
    worker.engine.block_manager.check_integrity()
