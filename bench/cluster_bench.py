"""The cost of disaggregation on one box: `kvferry serve` against the single-process engine, same prompts.

    python bench/cluster_bench.py                      # 1 prefill + 1 decode worker vs LLM in-process
    python bench/cluster_bench.py --colocated          # also: one colocated worker behind the router
    python bench/cluster_bench.py --num-prompts 32 --max-tokens 64
    python bench/cluster_bench.py --ttft-prompt-len 2048 --kv-transport shm --single-requests 7

Measures, for each system, on the same token-id prompts (greedy, ``ignore_eos`` so every request makes
exactly ``--max-tokens`` tokens):
- single stream: TTFT (request sent -> first token received) and TPOT ((last - first token time) /
  (tokens - 1)), medians over ``--single-requests`` requests, one at a time;
- throughput: all ``--num-prompts`` requests at once, output tokens / wall time.
The cluster is measured through its HTTP API with streaming (what a client sees); the engine through
``LLM.stream`` / ``LLM.generate`` in this process. Single-stream requests alternate between the two so
that other load on the machine hits both alike. Prints both, the ratios, and whether the greedy outputs
agree. Target: single-stream TPOT through the cluster within 10% of the single-process engine.

``--ttft-prompt-len N`` measures only single-stream TTFT, on distinct prompts of exactly N tokens (no
prefix-cache hits), every one prefilled by the prefill worker (``--local-prefill never``) and its KV
sent over ``--kv-transport``; engine and cluster alternate, and which goes first alternates too.
Target (docs/KV_TRANSFER.md): with shm, a 2,048-token prompt's TTFT at most 5% above the engine's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time

import httpx
import torch

from kvferry.engine.llm import LLM
from kvferry.engine.sampling import SamplingParams
from kvferry.router import launch_serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_prompts(n: int, min_len: int, max_len: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(100, 40000, (length,), generator=g).tolist() for length in lengths]


# --- single-process engine ---------------------------------------------------------------------------
def engine_single(llm: LLM, prompt: list[int], max_tokens: int) -> tuple[float, float, str]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    first = last = None
    num_tokens, text = 0, ""
    for out in llm.stream(prompt, params):
        last = time.perf_counter()
        first = first or last
        num_tokens += len(out.new_token_ids)
        text += out.new_text
    return first - start, (last - first) / max(1, num_tokens - 1), text


def engine_throughput(llm: LLM, prompts: list[list[int]], max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return sum(len(r.token_ids) for r in results) / elapsed


# --- cluster over HTTP ---------------------------------------------------------------------------------
def _body(prompt: list[int], max_tokens: int, stream: bool) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def cluster_single(client: httpx.Client, url: str, prompt: list[int], max_tokens: int) -> tuple[float, float, str]:
    """Times of the SSE chunks that carry text; the token count comes from the final usage chunk. One
    client serves every request, as an OpenAI client keeps its connection (creating an httpx client
    takes ~17 ms: that is not the server's time)."""
    start = time.perf_counter()
    first = last = None
    text, num_tokens = "", 0
    with client.stream("POST", url + "/v1/completions", json=_body(prompt, max_tokens, True), timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                num_tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["text"]:
                    last = time.perf_counter()
                    first = first or last
                    text += choice["text"]
    return first - start, (last - first) / max(1, num_tokens - 1), text


async def _cluster_all(url: str, prompts: list[list[int]], max_tokens: int) -> int:
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        async def one(prompt: list[int]) -> int:
            r = await client.post(url + "/v1/completions", json=_body(prompt, max_tokens, False))
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        return sum(await asyncio.gather(*(one(p) for p in prompts)))


def cluster_throughput(url: str, prompts: list[list[int]], max_tokens: int) -> float:
    start = time.perf_counter()
    tokens = asyncio.run(_cluster_all(url, prompts, max_tokens))
    return tokens / (time.perf_counter() - start)


def start_cluster(args: argparse.Namespace, colocated: bool, extra: tuple[str, ...] = ()) -> launch_serve.Cluster:
    """`kvferry serve` with these flags, parsed by its own parser (every default as the command has it)."""
    parser = argparse.ArgumentParser()
    launch_serve.add_arguments(parser)
    argv = ["--port", str(free_port()), "--grpc-port", str(free_port()), "--threads", str(args.threads),
            "--shutdown-grace", "10", *extra]
    if args.model:
        argv += ["--model", args.model]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    if colocated:
        argv.append("--colocated")
    if args.kv_transport:
        argv += ["--kv-transport", args.kv_transport]
    ns = parser.parse_args(argv)
    cluster = launch_serve.build_cluster(ns)
    cluster.start(ns.startup_timeout)
    return cluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the engine and of each worker (default 1: with 2+ threads on a "
                             "busy shared machine, OpenMP barriers make step times swing 10x; use 2+ on a "
                             "dedicated box)")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--single-requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--min-prompt-len", type=int, default=64)
    parser.add_argument("--max-prompt-len", type=int, default=512)
    parser.add_argument("--colocated", action="store_true", help="also measure the colocated baseline")
    parser.add_argument("--kv-transport", default=None, help="the cluster's KV data plane (default: auto)")
    parser.add_argument("--ttft-prompt-len", type=int, default=None,
                        help="measure only single-stream TTFT on prompts of exactly this many tokens")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.ttft_prompt_len:
        return ttft_main(args)

    prompts = make_prompts(args.num_prompts, args.min_prompt_len, args.max_prompt_len)
    llm = LLM(model=args.model, dtype=args.dtype)
    systems = {"disaggregated": start_cluster(args, colocated=False)}
    if args.colocated:
        systems["colocated"] = start_cluster(args, colocated=True)
    client = httpx.Client(timeout=600)
    try:
        results: dict[str, dict[str, float]] = {name: {} for name in ["engine", *systems]}
        single: dict[str, list[tuple[float, float]]] = {name: [] for name in results}
        agree = {name: 0 for name in systems}
        engine_single(llm, prompts[0][:16], 4)  # warm-up
        for cluster in systems.values():
            cluster_single(client, cluster.http_url, prompts[0][:16], 4)
        for prompt in prompts[: args.single_requests]:
            ttft, tpot, reference = engine_single(llm, prompt, args.max_tokens)
            single["engine"].append((ttft, tpot))
            for name, cluster in systems.items():
                ttft, tpot, text = cluster_single(client, cluster.http_url, prompt, args.max_tokens)
                single[name].append((ttft, tpot))
                agree[name] += text == reference
        for name, pairs in single.items():
            results[name]["ttft_ms"] = 1000 * statistics.median(p[0] for p in pairs)
            results[name]["tpot_ms"] = 1000 * statistics.median(p[1] for p in pairs)
        results["engine"]["throughput"] = engine_throughput(llm, prompts, args.max_tokens)
        for name, cluster in systems.items():
            results[name]["throughput"] = cluster_throughput(cluster.http_url, prompts, args.max_tokens)
    finally:
        client.close()
        for cluster in systems.values():
            cluster.stop()

    lens = [len(p) for p in prompts]
    print(f"\n{args.num_prompts} prompts of {min(lens)}-{max(lens)} tokens, {args.max_tokens} output tokens each, "
          f"greedy; single stream = median of {args.single_requests}; torch threads here: {torch.get_num_threads()}")
    print(f"{'':16}{'TTFT ms':>10}{'TPOT ms':>10}{'tok/s (all)':>13}")
    for name, r in results.items():
        print(f"{name:16}{r['ttft_ms']:10.1f}{r['tpot_ms']:10.2f}{r['throughput']:13.1f}")
    e = results["engine"]
    for name in systems:
        r = results[name]
        print(f"{name} / engine: TTFT x{r['ttft_ms'] / e['ttft_ms']:.2f}, TPOT x{r['tpot_ms'] / e['tpot_ms']:.3f} "
              f"(target <= 1.10), throughput x{r['throughput'] / e['throughput']:.2f}; greedy outputs equal on "
              f"{agree[name]}/{args.single_requests}")
    return 0


def ttft_main(args: argparse.Namespace) -> int:
    n = args.ttft_prompt_len
    prompts = make_prompts(2 * args.single_requests + 2, n, n)  # distinct: nothing is in a prefix cache
    llm = LLM(model=args.model, dtype=args.dtype)
    cluster = start_cluster(args, colocated=False, extra=("--local-prefill", "never"))
    ttft: dict[str, list[float]] = {"engine": [], "cluster": []}
    max_tokens = 2
    client = httpx.Client(timeout=600)
    try:
        engine_single(llm, prompts[0], max_tokens)  # warm-up at full length: allocations, kernels
        cluster_single(client, cluster.http_url, prompts[1], max_tokens)
        for i in range(args.single_requests):
            runs = [("engine", lambda p: engine_single(llm, p, max_tokens)),
                    ("cluster", lambda p: cluster_single(client, cluster.http_url, p, max_tokens))]
            for name, run in runs if i % 2 == 0 else runs[::-1]:
                prompt = prompts[2 + 2 * i + (name == "cluster")]
                ttft[name].append(run(prompt)[0])
    finally:
        client.close()
        cluster.stop()
    e, c = statistics.median(ttft["engine"]), statistics.median(ttft["cluster"])
    print(f"\nsingle-stream TTFT, {n}-token prompts, median of {args.single_requests} (alternating), torch threads "
          f"{args.threads} in the engine and in each worker, --kv-transport {args.kv_transport or 'auto'}:")
    for name, times in ttft.items():
        print(f"{name:8} {statistics.median(times) * 1e3:9.1f} ms   (all: {', '.join(f'{t * 1e3:.0f}' for t in times)})")
    print(f"cluster / engine: x{c / e:.3f} (target <= 1.05: {'met' if c <= 1.05 * e else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
