"""Goodput of kvferry (disaggregated and colocated) against vLLM's CPU build, in one run on the same
cores and the same arrival sequence.

    python bench/goodput_bench.py                                  # mixed preset, default sweep
    python bench/goodput_bench.py --request-rate 0.1,0.2,0.4 --num-prompts 30 --max-duration-s 300
    python bench/goodput_bench.py --kvferry-args "--profile latency" --colocated-args "--tpot-slo-ms 100"
    python bench/goodput_bench.py --systems disagg --num-prompts 4 --request-rate 0.5   # a smoke run

1. Print the CPU (``lscpu`` model name and the flags that pick kvferry's and vLLM's paths: avx2,
   avx512f, avx512_bf16) and the cores this process may use; servers inherit them (pin with taskset).
2. Start every system, one after the other, each on its own loopback ports: ``kvferry serve`` (router,
   1 prefill + 1 decode worker), ``kvferry serve --colocated``, and vLLM's OpenAI server where
   ``--vllm-python`` exists (``.venv-vllm``, see docs/PERFORMANCE.md). vLLM does not load this GGUF
   through transformers 5, so the model is exported once as a Hugging Face directory from kvferry's own
   loader (``decode_step_bench.export_hf``; bf16 weights) and vLLM runs it in bf16 where the CPU has
   native bf16 (AVX512-BF16), fp32 elsewhere (emulated bf16 is ~10x slower there). Every system is
   warmed up (a short and a long prompt, then ``--warmup-prompts`` of the mixed preset at 2 req/s,
   not measured: without that round vLLM's first measured rate paid its per-shape compilation), and
   its CPU use while idle is printed: the idle ones must not steal from the one under test.
3. Sweep the request rates of the ``kvferry bench serve`` client (kvferry.benchmark) with the mixed
   preset (20% prompts of 700-1400 words, 80% of 40-200 words, 64 output tokens, ignore_eos), Poisson
   arrivals. Systems are interleaved rate by rate, the order alternating at each rate (A B C, C B A,
   ...), because the host steals CPU unevenly over time; every system gets the same prompts and send
   times at a rate. One system runs at a time.
4. Print, per SLO pair (TTFT <= 3 s, TPOT <= 100 ms) and (TTFT <= 5 s, TPOT <= 300 ms), each system's
   goodput both ways (DistServe: the rate where attainment crosses 90%; vLLM: good requests per second,
   the best rate's) and the ratios kvferry's best system / vLLM and disaggregated / colocated. Write
   one results file per system (the ``kvferry bench serve --out`` format: ``kvferry bench plot`` reads
   them), summary.json and the comparison plot goodput.png into ``--out-dir``.

Bounded in time: each server has a start timeout, each rate ``--max-duration-s`` per system, and the
whole sweep ``--deadline-s`` (rates that would not fit are skipped, for every system alike).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx

from kvferry.benchmark.arrivals import parse_rates
from kvferry.benchmark.client import RequestOptions, discover_model
from kvferry.benchmark.datasets import DatasetSpec, make_samples
from kvferry.benchmark.metrics import SLO, summarize_round
from kvferry.benchmark.plot import plot_results
from kvferry.benchmark.report import build_results, format_goodput, rate_text, save_results, standard_json
from kvferry.benchmark.runner import RoundResult, round_workload, run_round, warm_up

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOS = [SLO(ttft_ms=3000, tpot_ms=100), SLO(ttft_ms=5000, tpot_ms=300)]
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
KVFERRY_SYSTEMS = ("disagg", "colocated")


def cpu_info() -> dict:
    model, flags = "unknown", set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {"model": model, "flags": {f: f in flags for f in CPU_FLAGS},
            "cores": sorted(os.sched_getaffinity(0)), "cpu_count": os.cpu_count()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Server:
    """One system under test: a command that serves the OpenAI API on ``port``, started and stopped here."""

    name: str
    argv: list[str]
    port: int
    log_path: str
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    ready_text: str | None = None  # a line the server prints when it serves (else /health answering)
    process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        print(f"[{self.name}] starting: {shlex.join(self.argv)} (log: {self.log_path})", flush=True)
        log = open(self.log_path, "w")  # noqa: SIM115 (the child writes to it for its lifetime)
        self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                        start_new_session=True, cwd=REPO)
        log.close()

    def wait_ready(self, timeout_s: float) -> None:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"exited with code {self.process.returncode}; last lines:\n{self.tail()}")
            printed = self.ready_text is None or self.ready_text in self.tail(100_000)
            if printed and _http_ok(self.base_url + "/health") and _http_ok(self.base_url + "/v1/models"):
                print(f"[{self.name}] ready after {time.monotonic() - started:.0f} s", flush=True)
                return
            time.sleep(1.0)
        raise RuntimeError(f"not ready after {timeout_s:.0f} s; last lines:\n{self.tail()}")

    def tail(self, chars: int = 2000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGTERM (kvferry serve stops its router, then its workers); the whole session is killed
        after ``grace_s``."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            print(f"[{self.name}] did not stop in {grace_s:.0f} s: killing it", flush=True)
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def cpu_seconds(self) -> float:
        """CPU time of the server's whole process tree so far (0 without psutil)."""
        try:
            import psutil
        except ImportError:
            return 0.0
        try:
            root = psutil.Process(self.process.pid)
            total = 0.0
            for p in [root, *root.children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system
            return total
        except psutil.Error:
            return 0.0


def kvferry_server(name: str, colocated: bool, extra_args: list[str], model: str | None, log_dir: str) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "kvferry.cli", "serve", "--port", str(port), "--grpc-port", str(free_port()),
            "--shutdown-grace", "5"]
    if colocated:
        argv.append("--colocated")
    if model:
        argv += ["--model", model]
    return Server(name, argv + extra_args, port, os.path.join(log_dir, f"{name}.log"),
                  ready_text="kvferry is serving at")


def vllm_server(python: str, model_dir: str, dtype: str, extra_args: list[str], log_dir: str) -> Server:
    port = free_port()
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--dtype", dtype,
            "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "4096", *extra_args]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    return Server("vllm", argv, port, os.path.join(log_dir, "vllm.log"), env=env)


def export_for_vllm(model: str | None, out_dir: str) -> None:
    """kvferry's loaded weights as a Hugging Face directory vLLM can serve (the same weights)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from decode_step_bench import export_hf

    from kvferry.engine.config import default_model_path
    from kvferry.engine.llm import LLM

    path = model or default_model_path()
    llm = LLM(model=path, dtype="float32")  # fp32 loads fast on any CPU; export_hf stores bf16
    export_hf(llm, path, out_dir)
    del llm
    gc.collect()


def summary_line(name: str, s: dict) -> str:
    attain = " ".join(f"{e['attainment'] * 100:5.1f}%" for e in s["slo"])
    ttft, tpot = s["ttft_ms"], s["tpot_ms"]
    fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    return (f"  {name:<12} rate {rate_text(s['rate']):>5}: attainment {attain}  TTFT p50/p90 {fmt(ttft['p50'])}/"
            f"{fmt(ttft['p90'])} ms  TPOT p50/p90 {fmt(tpot['p50'])}/{fmt(tpot['p90'])} ms  "
            f"{s['num_completed']}/{s['num_sent']} ok, {s['num_failed']} failed, {s['num_rejected_429']} x 429"
            + phases_line(s))


def phases_line(s: dict) -> str:
    """kvferry's own account of where the time went (p50 per phase), when the server sends it."""
    phases = s["kvferry_timings_ms"]
    if not phases:
        return ""
    return "\n" + " " * 16 + "phases p50 (ms): " + ", ".join(f"{k} {d['p50']:.0f}" for k, d in phases.items())


def ratio(a: float, b: float) -> str:
    if b > 0:
        return f"{a / b:.2f}x"
    return "n/a (both 0)" if a == 0 else "inf (denominator 0)"


def print_ratios(results: dict[str, dict], kinds: dict[str, str]) -> dict:
    """``kinds``: each kvferry system's kind (disagg / colocated); the best of each kind is compared."""
    ratios = {}
    kvferry = [n for n in results if n != "vllm"]
    print("\n=== ratios (DistServe goodput; vLLM-style in brackets) ===")
    for i, slo in enumerate(SLOS):
        g = {n: r["goodput"][i] for n, r in results.items()}
        entry = {}
        if kvferry and "vllm" in g:
            best = max(kvferry, key=lambda n: (g[n]["distserve"], g[n]["vllm_best"]))
            entry["kvferry_best"] = best
            entry["kvferry_best_over_vllm"] = [g[best]["distserve"], g["vllm"]["distserve"]]
            print(f"SLO {slo.label}: kvferry best ({best}) / vLLM = {ratio(g[best]['distserve'], g['vllm']['distserve'])}"
                  f" [{ratio(g[best]['vllm_best'], g['vllm']['vllm_best'])}]")
        best_of = {}
        for kind in KVFERRY_SYSTEMS:
            named = [n for n in kvferry if kinds.get(n) == kind]
            if named:
                best_of[kind] = max(named, key=lambda n: (g[n]["distserve"], g[n]["vllm_best"]))
        if len(best_of) == 2:
            d, c = best_of["disagg"], best_of["colocated"]
            entry["disagg_over_colocated"] = [d, c, g[d]["distserve"], g[c]["distserve"]]
            print(f"SLO {slo.label}: disaggregated ({d}) / colocated ({c}) = "
                  f"{ratio(g[d]['distserve'], g[c]['distserve'])} [{ratio(g[d]['vllm_best'], g[c]['vllm_best'])}]")
        ratios[slo.label] = entry
    if not any(ratios.values()):
        print("(nothing to compare: needs vLLM and a kvferry system, or both kvferry systems)")
    return ratios


async def sweep(servers: list[Server], options: dict[str, RequestOptions], args: argparse.Namespace,
                rates: list[float]) -> dict[str, list[RoundResult]]:
    spec = DatasetSpec("mixed")
    rounds: dict[str, list[RoundResult]] = {s.name: [] for s in servers}
    deadline = time.monotonic() + args.deadline_s
    for i, rate in enumerate(rates):
        needed = len(servers) * args.max_duration_s
        if time.monotonic() + needed > deadline:
            print(f"--deadline-s: rates from {rate_text(rate)} on skipped (a rate may take {needed:.0f} s)")
            break
        samples, times = round_workload(spec, args.num_prompts, rate, 1.0, args.seed, i)
        order = servers if i % 2 == 0 else servers[::-1]
        print(f"\nrate {rate_text(rate)} req/s ({args.num_prompts} prompts, order {' '.join(s.name for s in order)})",
              flush=True)
        for server in order:
            result = await run_round(options[server.name], rate, samples, times, args.max_duration_s,
                                     progress=not args.no_progress)
            rounds[server.name].append(result)
            print(summary_line(server.name, summarize_round(result, SLOS)), flush=True)
    return rounds


async def warm(server: Server, options: RequestOptions, seed: int, num_prompts: int, timeout_s: float) -> None:
    """A short and a long prompt (first-use costs of both shapes), then ``num_prompts`` of the mixed
    preset at 2 req/s, not measured: a server that compiles per batch shape (vLLM's CPU build) or
    fits its step times online (kvferry) meets the first measured rate in its steady state."""
    for words in (32, 1000):
        sample = make_samples(DatasetSpec("synthetic", input_len=words, output_len=8), 1, seed, 10**6 + words)[0]
        await warm_up(options, sample, 600.0)
    if num_prompts:
        samples, times = round_workload(DatasetSpec("mixed"), num_prompts, 2.0, 1.0, seed + 10**6, 0)
        result = await run_round(options, 2.0, samples, times, timeout_s, progress=False)
        ok = sum(r.success for r in result.records)
        print(f"[{server.name}] warm-up round: {ok}/{num_prompts} served", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", default="disagg,colocated,vllm",
                        help="comma-separated, from disagg, colocated, vllm (vllm only where installed)")
    parser.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--kvferry-args", default="", help="extra `kvferry serve` args for both kvferry systems")
    parser.add_argument("--disagg-args", default="", help="extra args for the disaggregated system only")
    parser.add_argument("--colocated-args", default="", help="extra args for the colocated system only")
    parser.add_argument("--extra-system", action="append", default=[], metavar="NAME=KIND:ARGS",
                        help="one more kvferry configuration, KIND disagg or colocated, e.g. "
                             "'balanced5s=colocated:--profile balanced --ttft-slo-ms 5000' (repeatable)")
    parser.add_argument("--warmup-prompts", type=int, default=8,
                        help="mixed-preset requests sent to each system at 2 req/s before measuring (0: none)")
    parser.add_argument("--vllm-python", default=os.path.join(REPO, ".venv-vllm", "bin", "python"))
    parser.add_argument("--vllm-args", default="", help="extra vLLM server args")
    parser.add_argument("--vllm-dtype", default=None, help="default: bfloat16 with AVX512-BF16, else float32")
    parser.add_argument("--request-rate", default="0.1,0.2,0.3,0.45,0.6,0.8")
    parser.add_argument("--num-prompts", type=int, default=30, help="requests per rate per system")
    parser.add_argument("--max-duration-s", type=float, default=300.0, help="per rate per system")
    parser.add_argument("--deadline-s", type=float, default=4 * 3600.0, help="bound on the whole sweep")
    parser.add_argument("--startup-timeout-s", type=float, default=600.0, help="per kvferry server")
    parser.add_argument("--vllm-startup-timeout-s", type=float, default=900.0, help="vLLM compiles the model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=os.path.join(REPO, "out", "goodput"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - {*KVFERRY_SYSTEMS, "vllm"}
    if unknown or not systems:
        parser.error(f"--systems: unknown {', '.join(sorted(unknown))}" if unknown else "--systems: none given")
    kinds = {name: name for name in systems if name in KVFERRY_SYSTEMS}
    extra_args: dict[str, list[str]] = {}
    for spec in args.extra_system:
        name, _, rest = spec.partition("=")
        kind, _, extra = rest.partition(":")
        if not name or kind not in KVFERRY_SYSTEMS or name in kinds or name == "vllm":
            parser.error(f"--extra-system {spec!r}: want NAME=disagg:ARGS or NAME=colocated:ARGS, a new NAME")
        kinds[name], extra_args[name] = kind, shlex.split(extra)
        systems.insert(len(kinds) - 1, name)
    rates = parse_rates(args.request_rate)
    cpu = cpu_info()
    flags = ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in cpu["flags"].items())
    print(f"CPU: {cpu['model']}; {flags}; cores {cpu['cores']} of {cpu['cpu_count']}")
    print(f"SLOs: {', '.join(s.label for s in SLOS)}; rates {', '.join(map(rate_text, rates))}; "
          f"{args.num_prompts} prompts per rate per system; mixed preset, Poisson arrivals, seed {args.seed}")
    os.makedirs(args.out_dir, exist_ok=True)
    log_dir = tempfile.mkdtemp(prefix="kvferry-goodput-")

    if "vllm" in systems and not os.path.exists(args.vllm_python):
        print(f"vLLM: not compared: {args.vllm_python} does not exist (docs/PERFORMANCE.md, 'vLLM CPU')")
        systems.remove("vllm")
    servers: list[Server] = []
    for name in systems:
        if name in kinds:
            own = extra_args[name] if name in extra_args else shlex.split(getattr(args, f"{name}_args"))
            extra = shlex.split(args.kvferry_args) + own
            servers.append(kvferry_server(name, kinds[name] == "colocated", extra, args.model, log_dir))
        else:
            model_dir = os.path.join(log_dir, "hf-model")
            export_for_vllm(args.model, model_dir)
            dtype = args.vllm_dtype or ("bfloat16" if cpu["flags"]["avx512_bf16"] else "float32")
            servers.append(vllm_server(args.vllm_python, model_dir, dtype, shlex.split(args.vllm_args), log_dir))

    started: list[Server] = []
    # A SIGTERM (timeout, pkill) must stop the servers too, not leave them serving and taking CPU from
    # whatever runs next: exit through the finally below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        options: dict[str, RequestOptions] = {}
        for server in servers:
            server.start()
            started.append(server)
            timeout = args.vllm_startup_timeout_s if server.name == "vllm" else args.startup_timeout_s
            try:
                server.wait_ready(timeout)
            except RuntimeError as exc:
                print(f"[{server.name}] left out: {exc}", flush=True)
                server.stop(10)
                continue
            model = discover_model(server.base_url)
            opts = RequestOptions(server.base_url, model, timeout_s=args.max_duration_s)
            try:
                asyncio.run(warm(server, opts, args.seed, args.warmup_prompts, args.max_duration_s))
            except RuntimeError as exc:  # one system that cannot serve the warm-up must not end the sweep
                print(f"[{server.name}] left out: {exc}", flush=True)
                server.stop(10)
                continue
            options[server.name] = opts
        up = [s for s in servers if s.name in options]
        if not up:
            print("no system started")
            return 1
        before = {s.name: s.cpu_seconds() for s in up}
        time.sleep(5.0)
        for s in up:
            idle = (s.cpu_seconds() - before[s.name]) / 5.0
            print(f"[{s.name}] idle CPU use: {idle * 100:.1f}% of a core"
                  + ("  (high: it takes CPU from the system under test)" if idle > 0.05 else ""))

        rounds = asyncio.run(sweep(up, options, args, rates))
    finally:
        for server in started:
            server.stop()

    results = {}
    for s in up:
        config = {"system": s.name, "argv": s.argv, "cpu": cpu, "dataset": "mixed", "num_prompts": args.num_prompts,
                  "seed": args.seed, "max_duration_s": args.max_duration_s}
        server_info = {"base_url": s.base_url, "model": options[s.name].model, "endpoint": "completions"}
        results[s.name] = build_results(s.name, config, server_info, rounds[s.name], SLOS)
        save_results(results[s.name], os.path.join(args.out_dir, f"{s.name}.json"))
    print()
    for name, r in results.items():
        print(format_goodput(r["goodput"], name))
    ratios = print_ratios(results, kinds)
    plot_path = os.path.join(args.out_dir, "goodput.png")
    plot_results(list(results.values()), plot_path, title=f"goodput, mixed preset — {cpu['model']}")
    summary = {"cpu": cpu, "rates": [rate_text(r) for r in rates],
               "goodput": {n: r["goodput"] for n, r in results.items()}, "ratios": ratios,
               "argv": sys.argv[1:] if argv is None else argv}
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        json.dump(standard_json(summary), f, indent=1)
    print(f"\nresults: {args.out_dir}/{{{','.join(results)}}}.json, summary.json; plot: {plot_path}; "
          f"server logs: {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
