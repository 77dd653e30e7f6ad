"""The benchmark's timings, attainment and goodput against a scripted server with known timings.

Timing tolerance: the scripted server sends each token at an exact time after it receives the request,
so a measured TTFT or end-to-end latency is the scripted one plus the loopback HTTP and event-loop
delay: about a millisecond on an idle machine, but 40-160 ms seen at a load average of 13-14 on the
shared 2 cores, when the client and the server each wait for a slice of CPU (the first request to a
fresh server also pays ~130 ms of warm-up, which the fixture absorbs). So a measured time must lie in
[scripted - 2 ms, scripted + TOL] with TOL = 300 ms, about twice the worst seen. TPOT divides (last
token - first token) by the 4 gaps of a 5-token request, on tokens scheduled on an absolute clock, so
its error is at most TOL / 4. Each SLO target sits at least TOL (TOL / 4 for TPOT) above every TTFT
(TPOT) scripted to meet it and below every one scripted to miss it, so attainment, and with it both
goodputs' numerators, are exact.
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from scripted_openai_server import MODEL
from kvferry.benchmark.client import RequestOptions
from kvferry.benchmark.datasets import Sample
from kvferry.benchmark.metrics import SLO
from kvferry.benchmark.report import build_results
from kvferry.benchmark.runner import UNFINISHED, run_round

TOL = 0.300
EARLY = 0.002
TOKENS = 5
SLO_A = SLO(ttft_ms=550, tpot_ms=120)
SLO_B = SLO(ttft_ms=1000, tpot_ms=300)


def samples(*scripts: str) -> list[Sample]:
    return [Sample(s, TOKENS, len(s.split())) for s in scripts]


def run(options: RequestOptions, rate: float, batch: list[Sample], send_times=None, max_duration_s=30.0):
    send_times = send_times if send_times is not None else [0.0] * len(batch)
    return asyncio.run(run_round(options, rate, batch, send_times, max_duration_s, progress=False))


def within(measured_ms: float, expected_s: float, tol_s: float = TOL) -> bool:
    return expected_s * 1e3 - EARLY * 1e3 <= measured_ms <= (expected_s + tol_s) * 1e3


@pytest.fixture(scope="module")
def sweep(scripted):
    """Three rounds labelled 1, 2 and 4 req/s (all requests at once, to keep the test short)."""
    options = RequestOptions(scripted.url, MODEL)
    rounds = [
        run(options, 1.0, samples(*(f"ttft={t} itl=0.02" for t in (0.1, 0.15, 0.2, 0.1, 0.15)))),
        run(options, 2.0, samples(*(f"ttft={t} itl=0.02" for t in (0.1, 0.2, 0.6, 0.1, 0.2)))),
        run(options, 4.0, samples("ttft=0.1 itl=0.02", "ttft=1.05 itl=0.02", "ttft=0.1 itl=0.2",
                                  "status=500", "status=429 retry=2")),
    ]
    return rounds, build_results("scripted", {}, {}, rounds, [SLO_A, SLO_B])


def test_ttft_tpot_itl_e2e_percentiles(sweep):
    s = sweep[1]["rounds"][1]["summary"]  # TTFTs 0.1, 0.2, 0.6, 0.1, 0.2 s; 20 ms between tokens
    assert s["num_sent"] == s["num_completed"] == 5 and s["num_failed"] == 0
    # numpy's linear percentiles of [100, 100, 200, 200, 600] ms: p90 at index 3.6, p99 at 3.96.
    for key, expected in (("mean", 0.24), ("p50", 0.2), ("p90", 0.44), ("p99", 0.584)):
        assert within(s["ttft_ms"][key], expected), (key, s["ttft_ms"])
        assert within(s["e2e_ms"][key], expected + (TOKENS - 1) * 0.02), (key, s["e2e_ms"])
    for key in ("mean", "p50", "p90", "p99"):
        assert abs(s["tpot_ms"][key] - 20.0) <= TOL / 4 * 1e3, s["tpot_ms"]
    assert abs(s["itl_ms"]["mean"] - 20.0) <= TOL / 4 * 1e3 and within(s["itl_ms"]["p50"], 0.02), s["itl_ms"]
    records = sweep[0][1].records
    assert all(r.output_tokens == TOKENS and r.prompt_tokens == 7 and len(r.itl) == TOKENS - 1 for r in records)
    assert s["total_output_tokens"] == 5 * TOKENS
    assert s["output_throughput"] == pytest.approx(5 * TOKENS / s["duration_s"])
    assert within(s["duration_s"] * 1e3, 0.6 + (TOKENS - 1) * 0.02)  # all sent at 0: the slowest one


def test_attainment_and_both_goodputs(sweep):
    rounds, results = sweep
    attainment = [[e["attainment"] for e in r["summary"]["slo"]] for r in results["rounds"]]
    # A: round 2 loses its 600 ms TTFT; round 3 keeps only its first request (the third has a TPOT of
    # 200 ms). B: round 3 loses the 1.05 s TTFT and both HTTP errors.
    assert attainment == [[1.0, 1.0], [0.8, 1.0], [0.2, 0.4]]
    for result, r in zip(results["rounds"], rounds):
        for e in result["summary"]["slo"]:
            assert e["goodput_vllm"] == pytest.approx(e["good"] / r.duration_s)
    # The wall time of round 1 is its slowest request: 0.2 s + 4 x 20 ms.
    first = results["rounds"][0]["summary"]["slo"][0]["goodput_vllm"]
    assert 5 / (0.28 + TOL) <= first <= 5 / (0.28 - EARLY)
    a, b = results["goodput"]
    assert a["distserve"] == pytest.approx(1 + (1.0 - 0.9) / (1.0 - 0.8) * (2 - 1)) == pytest.approx(1.5)
    assert b["distserve"] == pytest.approx(2 + (1.0 - 0.9) / (1.0 - 0.4) * (4 - 2))
    assert a["distserve_how"] == b["distserve_how"] == "interpolated"
    best_a = max(r["summary"]["slo"][0]["goodput_vllm"] for r in results["rounds"])
    assert a["vllm_best"] == best_a


def test_500_and_429_are_counted_apart(sweep):
    s = sweep[1]["rounds"][2]["summary"]
    assert s["num_sent"] == 5 and s["num_completed"] == 3
    assert s["num_failed"] == 1 and s["num_rejected_429"] == 1
    assert s["errors"] == {"HTTP 500: scripted status 500": 1, "HTTP 429: scripted status 429": 1}
    assert s["retry_after_s"]["mean"] == 2.0
    rejected = [r for r in sweep[0][2].records if r.rejected]
    assert [(r.status, r.retry_after, r.success) for r in rejected] == [(429, 2.0, False)]


def test_request_body_asks_for_fixed_lengths_and_usage(scripted):
    scripted.bodies.clear()
    run(RequestOptions(scripted.url, MODEL), 1.0, samples("ttft=0"))
    (body,) = scripted.bodies
    assert body["model"] == MODEL and body["prompt"] == "ttft=0"
    assert body["max_tokens"] == body["min_tokens"] == TOKENS and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    run(RequestOptions(scripted.url, MODEL, ignore_eos=False, extra_body={"top_k": 3}), 1.0, samples("ttft=0"))
    assert "ignore_eos" not in scripted.bodies[-1] and "min_tokens" not in scripted.bodies[-1]
    assert scripted.bodies[-1]["top_k"] == 3


def test_chat_role_chunk_is_not_the_first_token(scripted):
    # The role chunk (empty content) arrives at half the TTFT; the first token at 0.2 s.
    result = run(RequestOptions(scripted.url, MODEL, endpoint="chat"), 1.0, samples("ttft=0.2 itl=0.01"))
    (r,) = result.records
    assert r.success and within(r.ttft * 1e3, 0.2) and r.output_tokens == TOKENS


def test_mid_stream_error_and_refused_connection_are_failures(scripted):
    result = run(RequestOptions(scripted.url, MODEL), 1.0, samples("error_after=2 itl=0.01", "ttft=0"))
    bad, good = result.records
    assert not bad.success and bad.error == "stream error: scripted failure mid-stream" and bad.status == 200
    assert good.success
    s = build_results(None, {}, {}, [result], [SLO(ttft_ms=1000)])["rounds"][0]["summary"]
    assert s["num_failed"] == 1 and s["slo"][0]["attainment"] == 0.5

    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    result = run(RequestOptions(dead_url, MODEL), 1.0, samples("ttft=0"))
    (r,) = result.records
    assert not r.success and r.status is None and r.error.startswith("ConnectError")


def test_kvferry_timings_are_aggregated_when_present(scripted):
    result = run(RequestOptions(scripted.url, MODEL), 1.0, samples("ttft=0.01 timings=1", "ttft=0.03 timings=1",
                                                                   "ttft=0.02"))
    s = build_results(None, {}, {}, [result], [SLO_A])["rounds"][0]["summary"]
    phases = s["kvferry_timings_ms"]
    assert set(phases) == {"prefill_compute", "decode"}
    assert phases["prefill_compute"]["mean"] == pytest.approx(50.0)
    assert phases["decode"]["mean"] == pytest.approx(20.0) and phases["decode"]["p50"] == pytest.approx(20.0)
    plain = run(RequestOptions(scripted.url, MODEL), 1.0, samples("ttft=0"))
    assert build_results(None, {}, {}, [plain], [SLO_A])["rounds"][0]["summary"]["kvferry_timings_ms"] == {}


def test_max_duration_cancels_what_is_in_flight(scripted):
    started = time.perf_counter()
    result = run(RequestOptions(scripted.url, MODEL), 1.0, samples("ttft=5", "ttft=0", "ttft=0"),
                 send_times=[0.0, 0.0, 3.0], max_duration_s=0.4)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.4 + 2 * TOL and 0.4 <= result.duration_s < 0.4 + TOL
    assert result.num_not_sent == 1 and len(result.records) == 2
    slow, fast = result.records
    assert not slow.success and slow.error == UNFINISHED and fast.success
    assert not math.isnan(result.duration_s)
