"""Real engines on the default model (small caches) and the workers built on them, for the test folders
that run whole workers; a conftest imports the fixtures it needs. Each importing conftest gets engines of
its own (a session fixture is cached per conftest), as each folder had before they shared this module."""

from __future__ import annotations

from collections.abc import Callable, Iterator

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
def decode_engine(model_path):
    from kvferry.engine.engine import LLMEngine

    return LLMEngine(engine_config(), role="decode")


@pytest.fixture(scope="session")
def prefill_engine(model_path):
    from kvferry.engine.engine import LLMEngine

    return LLMEngine(engine_config(), role="prefill")


def started_workers(build: Callable, engine, role: str) -> Iterator[Callable]:
    """A factory fixture's body: yields make(*args) -> build(*args), started; after the test stops each
    one and checks that no block is left in use on ``engine``."""
    made = []

    def make(*args):
        worker = build(*args)
        worker.start()
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.stop()
    assert engine.block_manager.num_used_blocks == 0, f"a test left blocks on the {role} engine"
    engine.block_manager.check_integrity()


@pytest.fixture
def decode_worker_factory(decode_engine):
    """make(kv_transport=None) -> a started DecodeWorker (stopped after the test); kv_transport names the
    data planes to start beside its gRPC receiver ("auto", "tcp", ...), None starts none."""
    from kvferry.decode_worker.worker import DecodeWorker, DecodeWorkerConfig
    from kvferry.transport.negotiation import start_receiver_transports

    def build(kv_transport: str | None = None):
        worker = DecodeWorker(decode_engine, DecodeWorkerConfig(lease_s=30.0, idle_wait_s=0.01), worker_id="decode-0")
        if kv_transport is not None:
            start_receiver_transports(worker.receiver, kv_transport)
        return worker

    yield from started_workers(build, decode_engine, "decode")


@pytest.fixture
def prefill_worker_factory(prefill_engine):
    """make(sender) -> a started PrefillWorker (stopped after the test, which closes the sender)."""
    from kvferry.prefill_worker.worker import PrefillWorker

    yield from started_workers(lambda sender: PrefillWorker(prefill_engine, sender, worker_id="prefill-0"),
                               prefill_engine, "prefill")
