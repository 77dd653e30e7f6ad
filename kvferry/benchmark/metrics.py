"""From per-request records to the figures of a round and of a sweep.

Per round: TTFT, TPOT, ITL and end-to-end latency (mean and percentiles, in ms, over the requests that
succeeded; numpy's linear-interpolation percentiles), output tokens/s and requests/s over the round's
wall time, failures by error text, 429 rejections apart, and per SLO pair its attainment and vLLM's
goodput. Per sweep, per SLO pair, DistServe's goodput.

- A request meets an SLO pair when it succeeded, its TTFT <= the TTFT target and its TPOT <= the TPOT
  target (a one-token request has no TPOT and meets that half). A failed, rejected or unfinished
  request misses. Attainment = requests that meet it / requests sent.
- vLLM's goodput at a rate: requests that meet the pair / the round's wall time (req/s).
- DistServe's goodput: the highest request rate whose attainment is still >= 90%, read off the sweep by
  linear interpolation between the last rate at or above 90% and the next one below it. 0 when even the
  lowest rate misses 90%; the highest rate (a lower bound) when no rate does. Rates are taken in
  ascending order; an ``inf`` rate (everything at once) has no place on that axis and is left out.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from kvferry.benchmark.client import RequestRecord
from kvferry.benchmark.runner import RoundResult

ATTAINMENT_TARGET = 0.9
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class SLO:
    """A TTFT and a TPOT target, in milliseconds (either may be inf: no target)."""

    ttft_ms: float = math.inf
    tpot_ms: float = math.inf

    def __post_init__(self) -> None:
        if not (self.ttft_ms > 0 and self.tpot_ms > 0):
            raise ValueError(f"SLO targets must be positive, got ttft {self.ttft_ms} ms, tpot {self.tpot_ms} ms")

    @property
    def label(self) -> str:
        parts = [f"{name}<={value:g}ms" for name, value in (("ttft", self.ttft_ms), ("tpot", self.tpot_ms))
                 if not math.isinf(value)]
        return ",".join(parts) or "none"

    def met_by(self, record: RequestRecord) -> bool:
        if not record.success or record.ttft * 1e3 > self.ttft_ms:
            return False
        tpot = record.tpot
        return tpot is None or tpot * 1e3 <= self.tpot_ms


def parse_slo(text: str) -> SLO:
    """``"ttft:3000,tpot:100"`` (milliseconds; one of the two may be left out)."""
    targets: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition(":")
        name = name.strip().lower()
        if not sep or name not in ("ttft", "tpot") or name in targets:
            raise ValueError(f"--slo {text!r}: expected ttft:MS,tpot:MS")
        try:
            targets[name] = float(value)
        except ValueError:
            raise ValueError(f"--slo {text!r}: {value!r} is not a number of milliseconds") from None
    return SLO(targets.get("ttft", math.inf), targets.get("tpot", math.inf))


def distribution(values: list[float], scale: float = 1e3) -> dict[str, float | None]:
    """mean, p50, p90, p99 of ``values`` (seconds) times ``scale`` (default: in ms); None when empty."""
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    a = np.asarray(values, dtype=np.float64) * scale
    return {"mean": float(a.mean()), **{f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES}}


def summarize_round(result: RoundResult, slos: list[SLO]) -> dict:
    records = result.records
    ok = [r for r in records if r.success]
    duration = result.duration_s
    rejected = [r for r in records if r.rejected]
    retry_after = [r.retry_after for r in rejected if r.retry_after is not None]
    phases: dict[str, list[float]] = {}
    for r in ok:
        for name, seconds in (r.timings or {}).items():
            phases.setdefault(name, []).append(seconds)
    per_slo = []
    for slo in slos:
        good = sum(slo.met_by(r) for r in records)
        per_slo.append({
            "slo": slo.label, "ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "good": good,
            "attainment": good / len(records) if records else 0.0,
            "goodput_vllm": good / duration if duration > 0 else 0.0,
        })
    return {
        "rate": result.rate,
        "num_sent": len(records),
        "num_not_sent": result.num_not_sent,
        "num_completed": len(ok),
        "num_failed": sum(not r.success and not r.rejected for r in records),
        "num_rejected_429": len(rejected),
        "retry_after_s": distribution(retry_after, scale=1.0),
        "errors": dict(Counter(r.error for r in records if r.error).most_common()),
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": sum(r.output_tokens for r in ok) / duration if duration > 0 else 0.0,
        "total_output_tokens": sum(r.output_tokens for r in ok),
        "ttft_ms": distribution([r.ttft for r in ok]),
        "tpot_ms": distribution([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": distribution([gap for r in ok for gap in r.itl]),
        "e2e_ms": distribution([r.e2e for r in ok]),
        "slo": per_slo,
        "kvferry_timings_ms": {name: distribution(v) for name, v in phases.items()},  # the server's order
    }


def distserve_goodput(points: list[tuple[float, float]], target: float = ATTAINMENT_TARGET) -> tuple[float, str]:
    """(rate, attainment) points -> (goodput, how): how is "interpolated", "below_sweep" (0: the lowest
    rate misses) or "above_sweep" (every rate meets it: the highest rate, a lower bound)."""
    finite = sorted((r, a) for r, a in points if not math.isinf(r))
    if not finite:
        return 0.0, "no_finite_rate"
    if finite[0][1] < target:
        return 0.0, "below_sweep"
    for (r0, a0), (r1, a1) in zip(finite, finite[1:]):
        if a1 < target:  # the first drop below the target; a0 >= target here
            return r0 + (a0 - target) / (a0 - a1) * (r1 - r0), "interpolated"
    return finite[-1][0], "above_sweep"


def sweep_goodput(summaries: list[dict], slos: list[SLO]) -> list[dict]:
    """Per SLO pair: DistServe's goodput over the sweep and the best vLLM-style goodput of any rate."""
    out = []
    for i, slo in enumerate(slos):
        points = [(s["rate"], s["slo"][i]["attainment"]) for s in summaries]
        value, how = distserve_goodput(points)
        best = max(summaries, key=lambda s: s["slo"][i]["goodput_vllm"], default=None)
        out.append({
            "slo": slo.label, "ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms,
            "distserve": value, "distserve_how": how,
            "vllm_best": best["slo"][i]["goodput_vllm"] if best else 0.0,
            "vllm_best_rate": best["rate"] if best else None,
        })
    return out
