"""The benchmark's outputs: a text report per round and per sweep, and the results JSON.

The JSON holds ``label``, ``config`` (the command's settings), ``server`` (URL and model), ``rounds``
(per rate: its summary and every request's record) and ``goodput`` (per SLO pair, both definitions).
An ``inf`` rate is stored as the string ``"inf"`` so the file stays standard JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from kvferry.benchmark.metrics import SLO, summarize_round, sweep_goodput
from kvferry.benchmark.runner import RoundResult


def rate_text(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_round(summary: dict) -> str:
    s = summary
    lines = [
        f"--- rate {rate_text(s['rate'])} req/s: {s['num_completed']}/{s['num_sent']} completed in "
        f"{s['duration_s']:.1f} s, {s['num_failed']} failed, {s['num_rejected_429']} rejected (429)"
        + (f", {s['num_not_sent']} not sent (max duration)" if s["num_not_sent"] else ""),
        f"    throughput: {s['request_throughput']:.3f} req/s, {s['output_throughput']:.1f} output tok/s",
        f"    {'ms':<10}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for name in ("ttft", "tpot", "itl", "e2e"):
        d = s[f"{name}_ms"]
        lines.append(f"    {name.upper():<10}" + "".join(f"{_ms(d[k]):>10}" for k in ("mean", "p50", "p90", "p99")))
    for slo in s["slo"]:
        lines.append(f"    SLO {slo['slo']}: attainment {slo['attainment'] * 100:.1f}% "
                     f"({slo['good']}/{s['num_sent']}), goodput (vLLM) {slo['goodput_vllm']:.3f} req/s")
    if s["num_rejected_429"] and s["retry_after_s"]["mean"] is not None:
        lines.append(f"    429 Retry-After: mean {s['retry_after_s']['mean']:.1f} s")
    for error, count in s["errors"].items():
        lines.append(f"    error x{count}: {error}")
    if s["kvferry_timings_ms"]:
        lines.append(f"    kvferry phases (ms){'':<3}{'mean':>10}{'p50':>10}{'p90':>10}")
        for phase, d in s["kvferry_timings_ms"].items():
            lines.append(f"      {phase:<20}" + "".join(f"{_ms(d[k]):>10}" for k in ("mean", "p50", "p90")))
    return "\n".join(lines)


def format_goodput(goodput: list[dict], label: str = "") -> str:
    lines = [f"=== goodput{' of ' + label if label else ''} ==="]
    for g in goodput:
        how = {"below_sweep": " (the lowest rate already misses 90%)",
               "above_sweep": " (a lower bound: every rate of the sweep meets 90%)",
               "no_finite_rate": " (no finite rate in the sweep)"}.get(g["distserve_how"], "")
        best_rate = "-" if g["vllm_best_rate"] is None else rate_text(g["vllm_best_rate"])
        lines.append(f"SLO {g['slo']}: DistServe goodput {g['distserve']:.3f} req/s{how}; "
                     f"vLLM goodput {g['vllm_best']:.3f} req/s (best, at rate {best_rate})")
    return "\n".join(lines)


def build_results(label: str | None, config: dict, server: dict, rounds: list[RoundResult],
                  slos: list[SLO]) -> dict:
    summaries = [summarize_round(r, slos) for r in rounds]
    return {
        "label": label,
        "config": config,
        "server": server,
        "rounds": [
            {"rate": r.rate, "duration_s": r.duration_s, "num_not_sent": r.num_not_sent, "summary": s,
             "records": [dataclasses.asdict(rec) for rec in r.records]}
            for r, s in zip(rounds, summaries)
        ],
        "goodput": sweep_goodput(summaries, slos),
    }


def standard_json(value):
    """inf (a rate, an SLO without one of its targets) as "inf": json.dump would write Infinity."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: standard_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [standard_json(v) for v in value]
    return value


def save_results(results: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(standard_json(results), f, indent=1, allow_nan=False)


def load_results(path: str) -> dict:
    """A results file with its rates as floats again; its label defaults to the file's stem."""
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    if not isinstance(results, dict) or "rounds" not in results:
        raise ValueError(f"{path}: not a `kvferry bench serve --out` results file")
    results["label"] = results.get("label") or os.path.splitext(os.path.basename(path))[0]
    for r in results["rounds"]:
        r["rate"] = r["summary"]["rate"] = float(r["rate"])
    for g in results.get("goodput", []):
        g["ttft_ms"], g["tpot_ms"] = float(g["ttft_ms"]), float(g["tpot_ms"])
        if g.get("vllm_best_rate") is not None:
            g["vllm_best_rate"] = float(g["vllm_best_rate"])
    return results
