"""Profiles change the scheduler's decisions: the chunk a decode step may carry, the batch cap, the
prefill worker's step, shortest-first within the TTFT bound, and early rejection (never of a request
that can still make it, never without a target). The step-time model is a fixed synthetic one, so
every expected number follows from its coefficients."""

import pytest

from kvferry.engine.block_manager import BlockManager
from kvferry.engine.config import SchedulerConfig
from kvferry.engine.profiles import PROFILES, UNTARGETED, ProfileError, SLOProfile, resolve_profile
from kvferry.engine.request import Request, RequestStatus
from kvferry.engine.sampling import SamplingParams
from kvferry.engine.scheduler import Scheduler
from kvferry.engine.step_time import SCALES, StepTimeModel

# 10 ms a step, 5 ms a decode row, 0.5 ms a prefill token, no context or attention cost.
COSTS = (0.010, 0.005, 0.0005, 0.0, 0.0, 0.0)
LATENCY = PROFILES["latency"]  # TPOT 100 ms -> decode steps planned to 80 ms; TTFT 3 s -> 750 ms prefill steps


def fixed_model() -> StepTimeModel:
    return StepTimeModel(prior=tuple(c * s for c, s in zip(COSTS, SCALES)))


def make(profile: SLOProfile, decodes_here: bool = True, max_num_seqs: int = 64, budget: int = 2048) -> Scheduler:
    config = SchedulerConfig(max_num_seqs, budget, 8192, profile)
    return Scheduler(config, BlockManager(4096, 16), fixed_model(), decodes_here)


def request(rid: str, n: int, deadline: float | None = None, arrival: float = 0.0) -> Request:
    req = Request(rid, list(range(1, n + 1)), SamplingParams(), arrival_time=arrival)
    req.ttft_deadline = deadline
    return req


def start_decoding(sched: Scheduler, count: int, prompt_len: int = 8) -> None:
    for i in range(count):
        sched.add(request(f"d{i}", prompt_len))
    out = sched.schedule(now=0.0)
    sched.update(out, {s.request.request_id: 7 for s in out.scheduled if s.samples}, now=0.0)
    assert all(r.num_output_tokens == 1 for r in sched.running)


def chunk_of(sched: Scheduler, rid: str, now: float = 0.0) -> int:
    out = sched.schedule(now=now)
    return next(s.num_new_tokens for s in out.scheduled if s.request.request_id == rid)


@pytest.mark.parametrize("profile, expected", [
    (LATENCY, 100),
    (PROFILES["throughput"], 1000),
    (UNTARGETED, 1000),
])
def test_tpot_target_cuts_the_chunk_beside_decodes(profile, expected):
    sched = make(profile, max_num_seqs=16)
    start_decoding(sched, 4)
    sched.add(request("long", 1000))
    # Latency: 10 ms + 4 rows x 5 ms + 0.5 ms x P <= 80 ms  ->  P = 100 tokens ride along.
    assert chunk_of(sched, "long") == expected


def test_without_decodes_a_colocated_step_is_bounded_by_the_ttft_step_only():
    sched = make(LATENCY)
    sched.add(request("long", 2000))
    # No stream to stall: only the 750 ms prefill step (10 ms + 0.5 ms x P) bounds it.
    assert chunk_of(sched, "long") == 1480


def test_prefill_worker_takes_large_steps_bounded_by_the_ttft_target():
    sched = make(LATENCY, decodes_here=False, budget=4096)
    sched.add(request("long", 4000))
    assert chunk_of(sched, "long") == 1480  # 750 ms
    untargeted = make(PROFILES["throughput"], decodes_here=False, budget=4096)
    untargeted.add(request("long", 4000))
    assert chunk_of(untargeted, "long") == 4000


def test_tpot_target_caps_the_batch():
    for profile, cap in ((LATENCY, 14), (PROFILES["throughput"], 40)):
        # Latency: a decode-only step, 10 ms + 5 ms x B <= 80 ms  ->  B = 14 sequences.
        sched = make(profile, max_num_seqs=64)
        for i in range(40):
            sched.add(request(f"r{i}", 4))
        for _ in range(5):
            out = sched.schedule(now=0.0)
            sched.update(out, {s.request.request_id: 7 for s in out.scheduled if s.samples}, now=0.0)
        assert len(sched.running) == cap, profile.name
        assert sched.batch_cap() == (cap if profile is LATENCY else 64)


def run_decodes(sched: Scheduler, steps: int, step_s: float, start: float = 0.0) -> float:
    """``steps`` decode-only steps of ``step_s`` each; returns the clock after them."""
    now = start
    for _ in range(steps):
        out = sched.schedule(now=now)
        assert all(s.num_new_tokens == 1 for s in out.scheduled)
        now += step_s
        sched.update(out, {s.request.request_id: 7 for s in out.scheduled}, now=now)
    return now


def test_streams_that_ran_ahead_of_their_tpot_target_let_a_larger_chunk_ride_along():
    sched = make(LATENCY, max_num_seqs=16)
    start_decoding(sched, 4)  # first tokens at t = 0
    now = run_decodes(sched, 9, 0.030)  # 10 tokens each, 9 intervals of 30 ms: 0.27 s
    sched.add(request("long", 3000))
    # Banked: 80 ms x 10 intervals - 0.27 s = 0.53 s for the step -> 10 + 20 + 0.5 P <= 530 -> P = 1000.
    assert chunk_of(sched, "long", now=now) == 1000
    assert sched.decode_step_budget(list(sched.running[:4]), now) == pytest.approx(0.53)


def test_a_stream_behind_its_tpot_target_gets_only_the_minimal_chunk():
    sched = make(LATENCY, max_num_seqs=16)
    start_decoding(sched, 4)
    now = run_decodes(sched, 4, 0.150)  # 150 ms a token: over the 100 ms target already
    sched.add(request("long", 3000))
    assert chunk_of(sched, "long", now=now) == LATENCY.min_chunk_tokens


def test_one_stall_is_bounded_however_much_time_was_banked():
    sched = make(LATENCY, max_num_seqs=16)
    start_decoding(sched, 1)
    now = run_decodes(sched, 14, 0.001)  # 15 tokens at 1 ms: 1.1 s banked
    assert sched.decode_step_budget(sched.running[:1], now) == pytest.approx(LATENCY.max_stall_factor * 0.1)


def test_a_step_over_the_tpot_target_still_lets_prefill_progress():
    sched = make(LATENCY, max_num_seqs=16)
    for i in range(4):
        sched.add(request(f"d{i}", 8))
    sched.add(request("long", 3000))
    out = sched.schedule(now=0.0)  # no decodes yet: the 750 ms prefill step (1480 tokens)
    assert [s.num_new_tokens for s in out.scheduled] == [8, 8, 8, 8, 1448]
    sched.update(out, {s.request.request_id: 7 for s in out.scheduled if s.samples}, now=0.0)
    # The machine slows down 4x: 4 decode rows alone now take 120 ms, over the 80 ms plan.
    sched.step_model = StepTimeModel(prior=tuple(4 * c * s for c, s in zip(COSTS, SCALES)))
    assert chunk_of(sched, "long") == LATENCY.min_chunk_tokens  # the prompt still moves, a little


def test_over_slo_request_is_rejected_one_that_can_make_it_is_kept():
    sched = make(LATENCY, decodes_here=False)
    sched.add(request("late", 1000, deadline=100.2, arrival=97.3))  # needs ~0.51 s, 0.2 s left
    sched.add(request("fine", 1000, deadline=105.0, arrival=100.0))
    out = sched.schedule(now=100.0)
    assert [r.request.request_id for r in out.rejected] == ["late"]
    late = out.rejected[0]
    assert late.request.status is RequestStatus.FINISHED_REJECTED and "late" not in sched.requests
    assert late.refusal.reason == "slo" and late.refusal.retry_after_s == pytest.approx(0.51)
    assert [s.request.request_id for s in out.scheduled] == ["fine"]
    assert sched.num_rejected == 1


def test_a_request_that_can_still_meet_its_target_stays_queued():
    sched = make(LATENCY, decodes_here=False, budget=512)
    for i in range(4):  # 4 x 512 tokens ahead: ~4 x 266 ms of prefill
        sched.add(request(f"ahead{i}", 512))
    # 0.75 x (4 x 266 + 10 + 64 x 0.5 ms) = 0.83 s: tight but possible within 1 s.
    sched.add(request("tight", 64, deadline=1.0))
    out = sched.schedule(now=0.0)
    assert not out.rejected and "tight" in sched.requests


def test_beside_fresh_decode_rows_a_long_prompt_is_judged_by_the_largest_chunk_they_allow():
    # 8 fresh rows: a 50 ms decode step, so this step's chunk is 60 tokens (80 ms planned): 4,000 tokens
    # would take ~5.3 s at that size. The rows may take one stall of 8 x 100 ms, where the chunk is
    # bounded by the 750 ms prefill step instead (1,400 tokens): ~2.2 s, within 3 s: kept. 10,000
    # tokens behind it take ~7.6 s even so: refused.
    sched = make(LATENCY)
    start_decoding(sched, 8)
    sched.add(request("long", 4000, deadline=3.0))
    sched.add(request("hopeless", 10_000, deadline=3.0))
    out = sched.schedule(now=0.0)
    assert [r.request.request_id for r in out.rejected] == ["hopeless"]
    assert "long" in sched.requests
    assert "about 7.6 s to prefill its 10000 tokens here behind 4000" in out.rejected[0].refusal.message


def test_without_a_target_nothing_is_rejected():
    sched = make(PROFILES["throughput"], decodes_here=False, budget=256)
    for i in range(50):
        sched.add(request(f"r{i}", 2000))
    out = sched.schedule(now=1e6)
    assert not out.rejected and len(sched.requests) == 50


def test_shortest_first_but_a_long_prompt_is_not_starved():
    sched = make(LATENCY, decodes_here=False)
    sched.add(request("long", 1200, deadline=1.0))  # alone: 0.61 s; behind the shorts: 1.37 s
    for i in range(30):
        sched.add(request(f"s{i}", 50, deadline=3.0))
    first = sched.schedule(now=0.0).scheduled[0].request.request_id
    assert first == "long", "it would miss its deadline behind the short prompts"

    relaxed = make(LATENCY, decodes_here=False)
    relaxed.add(request("long", 1200, deadline=10.0))
    for i in range(30):
        relaxed.add(request(f"s{i}", 50, deadline=3.0))
    out = relaxed.schedule(now=0.0)
    assert [s.request.request_id for s in out.scheduled[:3]] == ["s0", "s1", "s2"]  # room to spare: shortest first
    fcfs = make(SLOProfile("fcfs", ttft_slo_ms=3000, prefill_order="fcfs"), decodes_here=False)
    fcfs.add(request("long", 1200, deadline=10.0))
    fcfs.add(request("short", 50, deadline=3.0))
    assert fcfs.schedule(now=0.0).scheduled[0].request.request_id == "long"


def test_profiles_resolve_and_validate():
    assert resolve_profile().name == "balanced"
    latency = resolve_profile("latency", ttft_slo_ms=5000)
    assert (latency.ttft_slo_ms, latency.tpot_slo_ms) == (5000, 100)
    assert latency.ttft_deadline(10.0) == pytest.approx(15.0)
    assert latency.ttft_deadline(10.0, budget_ms=1200) == pytest.approx(11.2)
    assert PROFILES["throughput"].ttft_deadline(10.0) is None
    with pytest.raises(ProfileError, match="unknown profile"):
        resolve_profile("fast")
    with pytest.raises(ProfileError, match=">= 0"):
        resolve_profile("latency", tpot_slo_ms=-1)
    with pytest.raises(ProfileError, match="prefill_order"):
        SLOProfile("x", prefill_order="random")


def test_an_idle_engine_serves_a_fresh_request_its_model_calls_late():
    """A warm-up on a busy box once left a model predicting 2-4 s of fixed cost per step: every request was
    refused and none ran to correct it. On an idle engine only the prompt's per-token cost can refuse it;
    with work ahead, the whole prediction decides."""
    skewed = StepTimeModel(prior=tuple(c * s for c, s in zip((4.0, *COSTS[1:]), SCALES)))  # 4 s a step

    sched = make(LATENCY, decodes_here=False)
    sched.step_model = skewed
    sched.add(request("fresh", 32, deadline=103.0, arrival=100.0))
    out = sched.schedule(now=100.0)
    assert not out.rejected and [s.request.request_id for s in out.scheduled] == ["fresh"]

    sched = make(LATENCY, decodes_here=False)
    sched.step_model = skewed
    sched.add(request("first", 32, deadline=103.0, arrival=100.0))
    sched.add(request("behind", 32, deadline=103.0, arrival=100.0))
    out = sched.schedule(now=100.0)
    assert [r.request.request_id for r in out.rejected] == ["behind"]

    sched = make(LATENCY, decodes_here=False)  # 32 tokens at 0.5 ms each cannot fit 5 ms, whatever the model
    sched.add(request("spent", 32, deadline=100.005, arrival=100.0))
    assert [r.request.request_id for r in sched.schedule(now=100.0).rejected] == ["spent"]


def test_a_short_prompt_overtakes_a_long_one_already_started():
    """Shortest first counts a started prompt by the tokens it has left: a short prompt arriving
    behind a long one's first chunk goes next, unless the long one would then miss its deadline."""
    sched = make(LATENCY, decodes_here=False, budget=512)
    sched.add(request("long", 3000, deadline=10.0))
    first = sched.schedule(now=0.0)
    assert [(s.request.request_id, s.num_new_tokens) for s in first.scheduled] == [("long", 512)]
    sched.update(first, {}, now=0.3)
    short = Request("short", list(range(5000, 5040)), SamplingParams(), arrival_time=0.3)  # no shared prefix
    short.ttft_deadline = 3.3
    sched.add(short)
    out = sched.schedule(now=0.3)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("short", 40), ("long", 472)]

    tight = make(LATENCY, decodes_here=False, budget=512)
    tight.add(request("long", 3000, deadline=1.3))  # 3000 tokens at 0.5 ms: ~1.5 s alone already
    out = tight.schedule(now=0.0)
    tight.update(out, {}, now=0.0)
    tight.add(request("short", 40, deadline=3.0))
    out = tight.schedule(now=0.0)
    assert out.scheduled[0].request.request_id == "long", "it would miss its deadline behind the short one"


def test_a_stream_of_known_length_may_spend_its_future_slack():
    """ignore_eos and no stop: the stream's mean TPOT is over all max_tokens tokens, so a step may
    take what the steps still to come leave; a stream that might stop any time gets only what it banked."""
    def started(ignore_eos: bool) -> Scheduler:
        sched = make(LATENCY, max_num_seqs=16)
        req = Request("d", list(range(1, 9)), SamplingParams(max_tokens=64, ignore_eos=ignore_eos), arrival_time=0.0)
        sched.add(req)
        out = sched.schedule(now=0.0)
        sched.update(out, {"d": 7}, now=0.0)
        return sched
    fixed, open_ended = started(True), started(False)
    # 80 ms x 63 intervals, 62 of them still to come at 23 ms (10 ms + 1 row + a 16-token chunk): 3.6 s,
    # capped at 8 x 100 ms per stall; the open-ended one only has its first interval's 80 ms.
    assert fixed.decode_step_budget(fixed.running, 0.0) == pytest.approx(0.8)
    assert open_ended.decode_step_budget(open_ended.running, 0.0) == pytest.approx(0.08)
