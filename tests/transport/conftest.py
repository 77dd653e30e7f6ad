"""Real engines on the default model (small caches) for the transport tests that run whole workers."""

from __future__ import annotations

import pytest

from kvferry.engine.config import CacheConfig, EngineConfig, SchedulerConfig

NUM_BLOCKS = 48
BLOCK_SIZE = 16


def engine_config(num_blocks: int = NUM_BLOCKS) -> EngineConfig:
    return EngineConfig(
        dtype="bfloat16",
        cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=512),
    )


@pytest.fixture(scope="session")
def transport_decode_engine(model_path):
    from kvferry.engine.engine import LLMEngine

    return LLMEngine(engine_config(), role="decode")


@pytest.fixture(scope="session")
def transport_prefill_engine(model_path):
    from kvferry.engine.engine import LLMEngine

    return LLMEngine(engine_config(), role="prefill")


@pytest.fixture
def decode_worker_factory(transport_decode_engine):
    """make(kv_transport) -> a started DecodeWorker with its data planes (stopped after the test)."""
    from kvferry.decode_worker.worker import DecodeWorker, DecodeWorkerConfig
    from kvferry.transport.negotiation import start_receiver_transports

    made = []

    def make(kv_transport: str = "auto"):
        worker = DecodeWorker(transport_decode_engine, DecodeWorkerConfig(lease_s=30.0, idle_wait_s=0.01),
                              worker_id="decode-0")
        start_receiver_transports(worker.receiver, kv_transport)
        worker.start()
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.stop()
    assert transport_decode_engine.block_manager.num_used_blocks == 0, "a test left blocks on the decode engine"
    transport_decode_engine.block_manager.check_integrity()


@pytest.fixture
def prefill_worker_factory(transport_prefill_engine):
    """make(sender) -> a started PrefillWorker (stopped after the test, which closes the sender)."""
    from kvferry.prefill_worker.worker import PrefillWorker

    made = []

    def make(sender):
        worker = PrefillWorker(transport_prefill_engine, sender, worker_id="prefill-0")
        worker.start()
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.stop()
    assert transport_prefill_engine.block_manager.num_used_blocks == 0, "a test left blocks on the prefill engine"
    transport_prefill_engine.block_manager.check_integrity()
