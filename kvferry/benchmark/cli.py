"""`kvferry bench serve` (a goodput sweep against an OpenAI-compatible URL) and `kvferry bench plot`
(results files -> one comparison picture). docs/BENCHMARKING.md explains every figure.

    kvferry bench serve --base-url http://127.0.0.1:8000 --dataset mixed --request-rate 0.1,0.2,0.4 \\
        --num-prompts 50 --slo ttft:3000,tpot:100 --slo ttft:5000,tpot:300 --out run.json --plot run.png
    kvferry bench plot disagg.json colocated.json vllm.json -o cmp.png
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys

from kvferry.benchmark.arrivals import parse_rates
from kvferry.benchmark.client import RequestOptions, discover_model, normalize_base_url
from kvferry.benchmark.datasets import DATASETS, DEFAULT_INPUT_LEN, DatasetSpec, Sample, make_samples
from kvferry.benchmark.metrics import SLO, parse_slo, summarize_round
from kvferry.benchmark.report import build_results, format_goodput, format_round, load_results, save_results
from kvferry.benchmark.runner import round_workload, run_round, warm_up

DEFAULT_SLOS = ("ttft:3000,tpot:100", "ttft:5000,tpot:300")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", required=True)
    add_serve_arguments(sub.add_parser("serve", help="goodput sweep against an OpenAI-compatible server"))
    plot = sub.add_parser("plot", help="draw one or more `bench serve --out` results files into one picture")
    plot.add_argument("results", nargs="+", help="results JSON files (one line per file)")
    plot.add_argument("-o", "--out", required=True, help="PNG to write")
    plot.add_argument("--title", default=None, help="title of the picture (default: none)")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="the server (http://host:port, with or without /v1); nothing else is ever contacted")
    p.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                   help="/v1/completions or /v1/chat/completions (default completions)")
    p.add_argument("--dataset", choices=DATASETS, default="synthetic",
                   help="synthetic: random words; mixed: 20%% 700-1400 words, 80%% 40-200 words, 64 tokens out; "
                        "jsonl / sharegpt: --dataset-path")
    p.add_argument("--dataset-path", default=None, help="the file of --dataset jsonl or sharegpt")
    p.add_argument("--input-len", type=int, default=DEFAULT_INPUT_LEN, help="synthetic prompt length in words")
    p.add_argument("--output-len", type=int, default=None,
                   help="output tokens per request (default: 128 synthetic, 64 mixed, the file's own)")
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="synthetic lengths uniform in len*(1-r)..len*(1+r)")
    p.add_argument("--num-prompts", type=int, default=100, help="requests per rate")
    p.add_argument("--request-rate", default="inf", help="req/s, a comma-separated list for a sweep (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps: 1 is Poisson")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and the arrival times (default 0)")
    p.add_argument("--max-duration-s", type=float, default=600.0,
                   help="per rate: stop sending and cancel what is in flight after this many seconds")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight (default none)")
    p.add_argument("--slo", action="append", default=None, metavar="ttft:MS,tpot:MS",
                   help=f"an SLO pair, repeatable (default: {' and '.join(DEFAULT_SLOS)})")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let requests stop at EOS (output lengths then vary)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature sent (default 0: greedy)")
    p.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    p.add_argument("--request-timeout-s", type=float, default=600.0,
                   help="HTTP timeout of each request: seconds for its connection and each read (default 600)")
    p.add_argument("--warmup-prompts", type=int, default=1, help="short requests sent and awaited first")
    p.add_argument("--label", default=None, help="name of this run in plots (default: the --out file's stem)")
    p.add_argument("--out", default=None, help="results JSON: config, per-request records, summaries")
    p.add_argument("--plot", default=None, help="PNG of this run's sweep")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def serve_config(args: argparse.Namespace) -> tuple[DatasetSpec, RequestOptions, list[float], list[SLO]]:
    """Every option checked before any traffic; ValueError names the bad one."""
    spec = DatasetSpec(args.dataset, args.dataset_path, args.input_len, args.output_len, args.range_ratio)
    rates = parse_rates(args.request_rate)
    slos = [parse_slo(s) for s in (args.slo or DEFAULT_SLOS)]
    if args.num_prompts < 1 or args.max_duration_s <= 0 or args.request_timeout_s <= 0:
        raise ValueError("--num-prompts, --max-duration-s and --request-timeout-s must be positive")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be at least 1")
    extra = json.loads(args.extra_body) if args.extra_body else {}
    if not isinstance(extra, dict):
        raise ValueError("--extra-body must be a JSON object")
    base_url = normalize_base_url(args.base_url)
    options = RequestOptions(base_url, args.model or "", args.endpoint, args.ignore_eos, args.temperature,
                             min(args.request_timeout_s, args.max_duration_s), extra)
    return spec, options, rates, slos


def warmup_sample(seed: int) -> Sample:
    return make_samples(DatasetSpec("synthetic", input_len=32, output_len=8), 1, seed, round_index=10**6)[0]


async def serve_sweep(args: argparse.Namespace) -> dict:
    spec, options, rates, slos = serve_config(args)
    if not options.model:
        options = dataclasses.replace(options, model=discover_model(options.base_url))
    print(f"benchmarking {options.url} (model {options.model}), dataset {spec.name}, "
          f"{args.num_prompts} prompts per rate, SLOs {', '.join(s.label for s in slos)}", flush=True)
    for _ in range(args.warmup_prompts):
        await warm_up(options, warmup_sample(args.seed), min(args.max_duration_s, args.request_timeout_s))
    rounds = []
    for i, rate in enumerate(rates):
        samples, times = round_workload(spec, args.num_prompts, rate, args.burstiness, args.seed, i)
        rounds.append(await run_round(options, rate, samples, times, args.max_duration_s,
                                      args.max_concurrency, args.progress))
        print(format_round(summarize_round(rounds[-1], slos)), flush=True)
    config = {k: v for k, v in vars(args).items() if not k.startswith("_") and not callable(v)}
    server = {"base_url": options.base_url, "model": options.model, "endpoint": options.endpoint}
    return build_results(args.label, config, server, rounds, slos)


def run(args: argparse.Namespace) -> int:
    if args.bench_command == "plot":
        return run_plot(args)
    try:
        results = asyncio.run(serve_sweep(args))
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"kvferry bench serve: {exc}", file=sys.stderr)
        return 2
    print(format_goodput(results["goodput"], results["label"] or ""))
    if args.out:
        save_results(results, args.out)
        print(f"results: {args.out}")
    if args.plot:
        from kvferry.benchmark.plot import plot_results  # matplotlib only when a picture is asked for

        results["label"] = results["label"] or os.path.splitext(os.path.basename(args.out or args.plot))[0]
        plot_results([results], args.plot)
        print(f"plot: {args.plot}")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from kvferry.benchmark.plot import plot_results

    try:
        all_results = [load_results(path) for path in args.results]
    except (ValueError, OSError, KeyError) as exc:
        print(f"kvferry bench plot: {exc}", file=sys.stderr)
        return 2
    plot_results(all_results, args.out, args.title)
    for results in all_results:
        print(format_goodput(results.get("goodput", []), results["label"]))
    print(f"plot: {args.out}")
    return 0
