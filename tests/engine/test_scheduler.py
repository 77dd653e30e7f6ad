"""Scheduler: token budget, chunking, preemption by recompute and abort, driven with synthetic tokens."""

import random

from kvferry.engine.block_manager import BlockManager
from kvferry.engine.config import SchedulerConfig
from kvferry.engine.request import Request, RequestStatus
from kvferry.engine.sampling import SamplingParams
from kvferry.engine.scheduler import Scheduler


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=32) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs, budget, 4096), BlockManager(num_blocks, block_size))


def run_step(sched: Scheduler, max_tokens: int) -> list[str]:
    """One step with token id 7 for every sampling request; finishes requests at max_tokens."""
    out = sched.schedule()
    sched.update(out, {s.request.request_id: 7 for s in out.scheduled if s.samples})
    done = [s.request.request_id for s in out.scheduled
            if s.request.num_output_tokens >= max_tokens and s.samples]
    for rid in done:
        sched.finish(rid, RequestStatus.FINISHED_LENGTH)
    return done


def test_long_prompt_is_chunked_under_the_budget():
    sched = make_scheduler(budget=16)
    sched.add(Request("long", list(range(40)), SamplingParams()))
    sizes = []
    for _ in range(3):
        out = sched.schedule()
        sizes.append(out.num_tokens)
        assert not any(s.samples for s in out.scheduled[:-1])
        sched.update(out, {s.request.request_id: 1 for s in out.scheduled if s.samples})
    assert sizes == [16, 16, 8]
    assert sched.requests["long"].output_token_ids == [1]


def test_decodes_come_after_chunks_and_share_the_budget():
    sched = make_scheduler(budget=16)
    sched.add(Request("a", list(range(5)), SamplingParams()))
    run_step(sched, 100)  # a prefilled, now decoding
    sched.add(Request("b", list(range(30)), SamplingParams()))
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["b", "a"]
    assert [s.num_new_tokens for s in out.scheduled] == [15, 1]


def test_preemption_recomputes_and_loses_nothing():
    sched = make_scheduler(num_blocks=6, block_size=4, budget=64)
    for i in range(3):
        sched.add(Request(f"r{i}", list(range(6)), SamplingParams()))
    finished, steps, preempted = [], 0, 0
    while sched.has_unfinished() and steps < 200:
        out = sched.schedule()
        preempted += len(out.preempted)
        sched.update(out, {s.request.request_id: 7 for s in out.scheduled if s.samples})
        for s in out.scheduled:
            if s.samples and s.request.num_output_tokens >= 10:
                finished.append(s.request.request_id)
                sched.finish(s.request.request_id, RequestStatus.FINISHED_LENGTH)
        sched.block_manager.check_integrity(sched.requests.values())
        steps += 1
    assert preempted > 0, "6 blocks cannot hold three 16-token requests: someone must be preempted"
    assert sorted(finished) == ["r0", "r1", "r2"]
    assert sched.block_manager.num_used_blocks == 0


def test_random_load_with_aborts_returns_every_block():
    rng = random.Random(0)
    sched = make_scheduler(num_blocks=40, block_size=4, max_num_seqs=6, budget=24)
    next_id = 0
    for _ in range(400):
        if next_id < 300 and rng.random() < 0.7:
            sched.add(Request(f"r{next_id}", [rng.randrange(50) for _ in range(rng.randint(1, 30))],
                              SamplingParams()))
            next_id += 1
        if sched.requests and rng.random() < 0.2:
            sched.finish(rng.choice(list(sched.requests)), RequestStatus.FINISHED_ABORTED)
        run_step(sched, rng.randint(1, 8))
        sched.block_manager.check_integrity(sched.requests.values())
    for rid in list(sched.requests):
        sched.finish(rid, RequestStatus.FINISHED_ABORTED)
    assert sched.block_manager.num_used_blocks == 0
    sched.block_manager.check_integrity()


def test_reservation_then_commit_then_abort():
    sched = make_scheduler(num_blocks=4, block_size=4)
    req = Request("d", list(range(10)), SamplingParams())
    assert sched.reserve(req) is not None and req.status is RequestStatus.WAITING_FOR_KV
    assert sched.reserve(Request("e", list(range(10)), SamplingParams())) is None  # no room
    sched.commit_kv("d", 42)
    assert req.status is RequestStatus.RUNNING and req.num_computed_tokens == 10
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("d", 1)]
    sched.finish("d", RequestStatus.FINISHED_ABORTED)
    assert sched.block_manager.num_used_blocks == 0
