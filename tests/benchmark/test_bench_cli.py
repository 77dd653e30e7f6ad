"""`kvferry bench serve` end to end against the scripted server (results file, plot), and
`kvferry bench plot` comparing two results files."""

from __future__ import annotations

import json

from scripted_openai_server import MODEL
from kvferry.benchmark.report import load_results
from kvferry.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_serve_writes_results_and_plot(scripted, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"ttft={t} itl=0.01", "output_len": 4}) + "\n"
                               for t in (0.02, 0.05, 0.08, 0.6)))
    out, png = tmp_path / "disagg.json", tmp_path / "disagg.png"
    scripted.bodies.clear()
    code = main(["bench", "serve", "--base-url", scripted.url + "/v1/", "--dataset", "jsonl", "--dataset-path",
                 str(prompts), "--num-prompts", "4", "--request-rate", "20,inf", "--slo", "ttft:400,tpot:200",
                 "--slo", "ttft:2000", "--out", str(out), "--plot", str(png), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "--- rate 20 req/s: 4/4 completed" in printed and "--- rate inf req/s" in printed
    assert "SLO ttft<=400ms,tpot<=200ms: DistServe goodput 0.000 req/s (the lowest rate already misses" in printed
    assert "SLO ttft<=2000ms: DistServe goodput 20.000 req/s (a lower bound: every rate" in printed

    assert {b["model"] for b in scripted.bodies} == {MODEL}  # asked /v1/models
    assert len(scripted.bodies) == 1 + 8  # the warm-up, then 4 per rate
    raw = json.loads(out.read_text())  # standard JSON: inf is a string
    assert [r["rate"] for r in raw["rounds"]] == [20.0, "inf"] and raw["label"] is None
    assert raw["server"] == {"base_url": scripted.url, "model": MODEL, "endpoint": "completions"}
    assert raw["config"]["num_prompts"] == 4 and len(raw["rounds"][0]["records"]) == 4
    results = load_results(str(out))
    assert results["label"] == "disagg"
    for r in results["rounds"]:
        attainment = [e["attainment"] for e in r["summary"]["slo"]]
        assert attainment == [0.75, 1.0]  # the 600 ms TTFT misses the first pair only
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_plot_compares_several_results_files(scripted, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "ttft=0.01 itl=0.01", "output_len": 3}) + "\n")
    paths = []
    for label in ("kvferry", "vllm"):
        path = tmp_path / f"{label}-run.json"
        argv = ["bench", "serve", "--base-url", scripted.url, "--model", MODEL, "--dataset", "jsonl",
                "--dataset-path", str(prompts), "--num-prompts", "2", "--request-rate", "50,100",
                "--warmup-prompts", "0", "--out", str(path), "--no-progress"]
        assert main(argv + (["--label", label] if label == "kvferry" else [])) == 0
        paths.append(str(path))
    assert [load_results(p)["label"] for p in paths] == ["kvferry", "vllm-run"]  # --label, else the stem
    cmp = tmp_path / "cmp.png"
    assert main(["bench", "plot", *paths, "-o", str(cmp), "--title", "two systems"]) == 0
    assert cmp.read_bytes()[:8] == PNG_MAGIC and cmp.stat().st_size > 10_000


def test_bad_options_are_refused_before_any_traffic(scripted, capsys):
    scripted.bodies.clear()
    assert main(["bench", "serve", "--base-url", scripted.url, "--request-rate", "0"]) == 2
    assert main(["bench", "serve", "--base-url", scripted.url, "--slo", "ttft=3"]) == 2
    assert main(["bench", "serve", "--base-url", scripted.url, "--dataset", "jsonl"]) == 2
    assert "--dataset-path" in capsys.readouterr().err
    assert scripted.bodies == []
