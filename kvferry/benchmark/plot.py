"""The sweep's picture: SLO attainment vs request rate (one panel per SLO pair), TTFT and TPOT p50/p90
vs request rate; one colour per system (results file), so several runs compare at a glance.

In the attainment panels the dotted line is the 90% target and each system's DistServe goodput is a
vertical line of its colour; in the latency panels (log scale) p50 is solid, p90 dashed and the SLO
targets are grey. ``inf`` rates have no place on the rate axis and are not drawn.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, and none is touched

import matplotlib.pyplot as plt  # noqa: E402

from kvferry.benchmark.metrics import ATTAINMENT_TARGET  # noqa: E402


def _finite_rounds(results: dict) -> list[dict]:
    return sorted((r["summary"] for r in results["rounds"] if not math.isinf(r["rate"])), key=lambda s: s["rate"])


def _slo_labels(all_results: list[dict]) -> list[str]:
    labels: list[str] = []
    for results in all_results:
        for g in results.get("goodput", []):
            if g["slo"] not in labels:
                labels.append(g["slo"])
    return labels


def plot_results(all_results: list[dict], out_path: str, title: str | None = None) -> None:
    slo_labels = _slo_labels(all_results)
    num_panels = len(slo_labels) + 2
    cols = 2 if num_panels in (2, 4) else 3  # 2 SLO pairs + TTFT + TPOT: a 2 x 2 grid
    rows = math.ceil(num_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False)
    flat = list(axes.flat)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    for k, results in enumerate(all_results):
        color = colors[k % len(colors)]
        label = results["label"]
        rounds = _finite_rounds(results)
        rates = [s["rate"] for s in rounds]
        goodput = {g["slo"]: g for g in results.get("goodput", [])}
        for i, slo in enumerate(slo_labels):
            ax = flat[i]
            points = [(s["rate"], e["attainment"] * 100) for s in rounds for e in s["slo"] if e["slo"] == slo]
            if not points:
                continue
            g = goodput.get(slo)
            legend = f"{label} (goodput {g['distserve']:.2f} req/s)" if g else label
            ax.plot(*zip(*points), marker="o", color=color, label=legend)
            if g and g["distserve"] > 0:
                ax.axvline(g["distserve"], color=color, linestyle=":", linewidth=1)
        for ax, metric in ((flat[-2], "ttft_ms"), (flat[-1], "tpot_ms")):
            for pct, style in (("p50", "-"), ("p90", "--")):
                points = [(r, s[metric][pct]) for r, s in zip(rates, rounds) if s[metric][pct] is not None]
                if points:
                    ax.plot(*zip(*points), linestyle=style, marker="o", markersize=4, color=color,
                            label=label if pct == "p50" else "_nolegend_")  # one legend entry per system

    for i, slo in enumerate(slo_labels):
        ax = flat[i]
        ax.axhline(ATTAINMENT_TARGET * 100, color="grey", linestyle=":", linewidth=1)
        ax.set(title=f"SLO attainment, {slo}", xlabel="request rate (req/s)", ylabel="requests within SLO (%)",
               ylim=(-3, 103))
    targets = {"ttft_ms": set(), "tpot_ms": set()}
    for results in all_results:
        for g in results.get("goodput", []):
            for key in targets:
                if not math.isinf(float(g[key])):
                    targets[key].add(float(g[key]))
    for ax, key, name in ((flat[-2], "ttft_ms", "TTFT"), (flat[-1], "tpot_ms", "TPOT")):
        for target in sorted(targets[key]):
            ax.axhline(target, color="grey", linestyle="--", linewidth=0.8)
        ax.set(title=f"{name} p50 (solid), p90 (dashed)", xlabel="request rate (req/s)", ylabel=f"{name} (ms)")
        ax.set_yscale("log")  # overload takes latencies from milliseconds to minutes
    for ax in flat[:num_panels]:
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in flat[num_panels:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
