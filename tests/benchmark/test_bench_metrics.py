"""Goodput interpolation, SLO checks and TPOT on hand-made data (exact numbers, no server)."""

from __future__ import annotations

import math

import pytest

from kvferry.benchmark.client import RequestRecord
from kvferry.benchmark.metrics import SLO, distribution, distserve_goodput, parse_slo, summarize_round, sweep_goodput
from kvferry.benchmark.runner import RoundResult


def record(ttft: float | None, e2e: float | None, tokens: int, success: bool = True, status: int = 200,
           error: str | None = None) -> RequestRecord:
    return RequestRecord(0, 10, tokens, 0.0, done=True, success=success, status=status, error=error, ttft=ttft,
                         e2e=e2e, output_tokens=tokens)


def test_distserve_goodput_interpolates_the_first_crossing():
    assert distserve_goodput([(1, 1.0), (2, 0.95), (4, 0.5)]) == (pytest.approx(2 + 0.05 / 0.45 * 2), "interpolated")
    # Points are sorted by rate first; an inf rate has no place on the axis.
    assert distserve_goodput([(4, 0.5), (math.inf, 0.0), (1, 1.0), (2, 0.95)])[0] == pytest.approx(2 + 0.05 / 0.45 * 2)
    # Exactly at the target counts as meeting it.
    assert distserve_goodput([(1, 0.9), (3, 0.5)]) == (1.0, "interpolated")
    # Not monotone: the first drop below 90% is the one that counts (a later recovery is noise).
    assert distserve_goodput([(1, 1.0), (2, 0.8), (3, 0.95), (4, 0.2)])[0] == pytest.approx(1.5)


def test_distserve_goodput_outside_the_sweep():
    assert distserve_goodput([(0.5, 0.89), (1, 0.5)]) == (0.0, "below_sweep")
    assert distserve_goodput([(0.5, 1.0), (1, 0.92)]) == (1.0, "above_sweep")
    assert distserve_goodput([(math.inf, 1.0)]) == (0.0, "no_finite_rate")


def test_tpot_is_vllms_definition():
    r = record(ttft=0.5, e2e=2.5, tokens=5)
    assert r.tpot == pytest.approx((2.5 - 0.5) / 4)
    assert record(ttft=0.5, e2e=0.5, tokens=1).tpot is None  # one token: no TPOT, meets that half of an SLO
    assert SLO(ttft_ms=600, tpot_ms=1).met_by(record(ttft=0.5, e2e=0.5, tokens=1))


def test_slo_met_by():
    slo = SLO(ttft_ms=1000, tpot_ms=100)
    assert slo.met_by(record(ttft=1.0, e2e=1.4, tokens=5))  # both exactly at the target
    assert not slo.met_by(record(ttft=1.001, e2e=1.1, tokens=5))
    assert not slo.met_by(record(ttft=0.1, e2e=0.5, tokens=4))  # TPOT 133 ms
    assert not slo.met_by(record(None, None, 0, success=False, status=500, error="HTTP 500: x"))


def test_parse_slo():
    assert parse_slo("ttft:3000,tpot:100") == SLO(3000, 100)
    assert parse_slo(" TPOT:50 ") == SLO(math.inf, 50)
    assert parse_slo("ttft:3000,tpot:100").label == "ttft<=3000ms,tpot<=100ms"
    for bad in ("ttft=3000", "ttft:3000,ttft:1", "e2e:5", "ttft:fast", "ttft:0"):
        with pytest.raises(ValueError):
            parse_slo(bad)


def test_summary_counts_and_percentiles_exactly():
    records = [record(0.1, 0.5, 5), record(0.2, 1.0, 5), record(0.3, 0.3, 1),
               record(None, None, 0, success=False, status=429, error="HTTP 429: busy"),
               record(None, None, 0, success=False, status=500, error="HTTP 500: boom"),
               record(None, None, 0, success=False, status=500, error="HTTP 500: boom")]
    records[3].retry_after = 4.0
    s = summarize_round(RoundResult(2.0, records, 4.0, 1), [SLO(250, 150), SLO(1000, 1000)])
    assert (s["num_sent"], s["num_not_sent"], s["num_completed"], s["num_failed"], s["num_rejected_429"]) == (6, 1, 3, 2, 1)
    assert s["errors"] == {"HTTP 500: boom": 2, "HTTP 429: busy": 1}
    assert s["retry_after_s"]["mean"] == 4.0
    assert s["ttft_ms"] == pytest.approx({"mean": 200.0, "p50": 200.0, "p90": 280.0, "p99": 298.0})
    assert s["tpot_ms"] == pytest.approx({"mean": 150.0, "p50": 150.0, "p90": 190.0, "p99": 199.0})  # 100, 200
    assert s["e2e_ms"]["p50"] == pytest.approx(500.0)
    assert s["request_throughput"] == 3 / 4.0 and s["output_throughput"] == 11 / 4.0
    # SLO 1: only the first (TTFT 100, TPOT 100); SLO 2: the three that completed.
    assert [(e["good"], e["attainment"], e["goodput_vllm"]) for e in s["slo"]] == [(1, 1 / 6, 0.25), (3, 0.5, 0.75)]
    assert distribution([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_sweep_goodput_reports_both_definitions():
    slo = SLO(1000, 1000)
    rounds = [RoundResult(rate, [record(0.1, 0.2, 2)] * good + [record(None, None, 0, False, 500, "x")] * (10 - good),
                          duration, 0)
              for rate, good, duration in ((1.0, 10, 10.0), (2.0, 8, 5.0), (4.0, 2, 4.0))]
    (g,) = sweep_goodput([summarize_round(r, [slo]) for r in rounds], [slo])
    assert g["distserve"] == pytest.approx(1.5) and g["distserve_how"] == "interpolated"
    assert g["vllm_best"] == pytest.approx(1.6) and g["vllm_best_rate"] == 2.0  # 8 good / 5 s
