"""The part of a worker's ``WorkerStats`` that both workers read off their engine the same way."""

from __future__ import annotations

from kvferry.common.worker import WorkerRole, WorkerStats
from kvferry.engine.engine import LLMEngine
from kvferry.engine.engine_loop import EngineLoop, busy_ms


def engine_stats(engine: LLMEngine, loop: EngineLoop, role: WorkerRole, instance_id: str, **fields) -> WorkerStats:
    """Stats with the engine's blocks, batch limit, TTFT refusals and busy time filled in; ``fields``
    are the worker's own (its requests and transfers), by ``WorkerStats`` field name."""
    bm = engine.block_manager
    return WorkerStats(
        role=role,
        instance_id=instance_id,
        block_size=bm.block_size,
        total_kv_blocks=bm.num_blocks,
        free_kv_blocks=bm.num_free_blocks,
        used_kv_blocks=bm.num_used_blocks,
        max_running_requests=engine.config.scheduler.max_num_seqs,
        requests_rejected_total=engine.scheduler.num_rejected,
        engine_busy_ms=busy_ms(loop),
        **fields,
    )
