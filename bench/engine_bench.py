"""Engine benchmark: kvferry vs transformers (and llama.cpp where installed) on the same model file,
dtype and machine, in one run.

Measures prefill tok/s (128, 512, 2048-token prompts) and decode tok/s at batch 1, 8, 32, 64 for
kvferry and transformers, prints kvferry/transformers ratios, and the ratio of kvferry's batch-1 decode
step to the memory-bandwidth floor: the bytes a step streams (each weight as it is held: the GGUF's
quantized blocks with ``--weights quantized``, else the dtype's; the tied embedding once, as the
lm_head) / the read bandwidth measured in this run. Where the ``llama_cpp`` package (llama-cpp-python)
is installed, llama.cpp runs the same GGUF file at batch 1 and the same prefill lengths, in a child
process (its AMX kernels cannot share OpenMP threads with oneDNN's: see ``LlamaCpp``).
Targets (issue 9): batch-1 decode >= 1.0x llama.cpp and within 2x of the floor; decode >= 3x
transformers at batch 1 and 2x at batch 64; prefill >= 1.0x transformers.

    python bench/engine_bench.py [--model PATH] [--dtype auto] [--weights auto] [--decode-steps 24]

The defaults run on any x86-64 (dtype auto: bf16 where the CPU has bf16 units, else fp32). The
engines are timed alternately per case, so machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time

import torch

from kvferry.engine.config import default_model_path, resolve_dtype
from kvferry.engine.llm import LLM
from kvferry.engine.model import QuantEmbedding, QuantLinear
from kvferry.engine.sampling import SamplingParams
from kvferry.kernels import cpu_features

PREFILL_LENS = (128, 512, 2048)
DECODE_BATCHES = (1, 8, 32, 64)
DECODE_CONTEXT = 128  # prompt length of each decoding stream


def measure_read_bandwidth(nbytes: int = 512 * 1024 * 1024, repeats: int = 5) -> float:
    """Bytes/s for a streaming read (a sum over a buffer far larger than the caches)."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    buf.sum()
    best = min(_timed(lambda: buf.sum()) for _ in range(repeats))
    return nbytes / best


def streamed_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every linear as it is held (quantized ones as their
    blocks), the norms, and the lm_head (a tied embedding once, as the lm_head; lookups read a few rows)."""
    total = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += module.qweight.nbytes + (module.bias.nbytes if module.bias is not None else 0)
        elif isinstance(module, QuantEmbedding):
            continue  # its blocks are the lm_head's (tied) or only looked up
        elif isinstance(module, torch.nn.Embedding):
            total += module.weight.nbytes if model.lm_head is None else 0
        else:
            total += sum(p.nbytes for p in module.parameters(recurse=False))
    return total


def describe_cpu() -> str:
    """The CPU model and the features kvferry picks its paths by (figures must say which CPU made them)."""
    name = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        pass
    return f"{name}; {cpu_features.describe() or 'no AVX2'}"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def prompt_ids(length: int, salt: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(1000 + length + salt)
    return torch.randint(100, 40000, (length,), generator=g).tolist()


# ---- kvferry -----------------------------------------------------------------------------------
def kvferry_prefill(llm: LLM, length: int, salt: int) -> float:
    engine = llm.engine
    engine.add_request(f"p{length}-{salt}", prompt_ids(length, salt), SamplingParams(max_tokens=1, temperature=0))
    elapsed = 0.0
    while engine.has_unfinished_requests():
        elapsed += _timed(engine.step)
    return elapsed


def kvferry_decode(llm: LLM, batch: int, steps: int, salt: int, prompt_len: int = DECODE_CONTEXT) -> float:
    """Median seconds per decode step with ``batch`` streams of ``prompt_len``-token prompts, all
    prompts already prefilled."""
    engine = llm.engine
    params = SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"d{batch}-{salt}-{i}", prompt_ids(prompt_len, salt * 1000 + i), params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()):
        engine.step()
    times = [_timed(engine.step) for _ in range(steps)]
    while engine.has_unfinished_requests():
        engine.step()
    return statistics.median(times)


# ---- transformers ------------------------------------------------------------------------------
def load_transformers(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    if path.endswith(".gguf"):
        # Dense weights in ``dtype``, transformers' fastest CPU path: recent versions otherwise keep a
        # GGUF in its blocks and cast every matmul's input and output (a batch-1 step ~40x slower).
        extra = {}
        try:
            from transformers import GgufConfig

            extra["quantization_config"] = GgufConfig(gguf_file=os.path.basename(path), dequantize=True)
        except ImportError:  # older versions always dequantize
            pass
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype, **extra
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval()


@torch.inference_mode()
def hf_prefill(model, length: int, salt: int) -> float:
    ids = torch.tensor([prompt_ids(length, salt)])
    return _timed(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1))


@torch.inference_mode()
def hf_decode(model, batch: int, steps: int, salt: int) -> float:
    from transformers import DynamicCache

    ids = torch.tensor([prompt_ids(DECODE_CONTEXT, salt * 1000 + i) for i in range(batch)])
    cache = DynamicCache()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- llama.cpp (llama-cpp-python), where installed ------------------------------------------------
# llama.cpp runs in a process of its own: its AMX kernels configure each OpenMP thread's tiles once and
# assume they stay configured, while oneDNN (and kvferry's AMX kernel) release them after each product;
# on the same threads (both use libgomp) llama.cpp then faults in ggml_backend_amx_mul_mat.
def _llama_cpp_worker(conn, path: str, threads: int, context: int) -> None:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=context, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    conn.send("ready")
    while (request := conn.recv()) is not None:
        kind, n, salt = request
        llm.reset()
        if kind == "prefill":
            conn.send(_timed(lambda: llm.eval(prompt_ids(n, salt))))
        else:  # median seconds per single-token eval after a DECODE_CONTEXT-token prompt
            llm.eval(prompt_ids(DECODE_CONTEXT, salt))
            tokens = prompt_ids(n, salt + 1)  # which tokens they are does not change the work
            conn.send(statistics.median(_timed(lambda t=t: llm.eval([t])) for t in tokens))


class LlamaCpp:
    """llama.cpp on the same GGUF file in a child process; calls are synchronous (one engine at a time)."""

    def __init__(self, path: str, threads: int, context: int):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_llama_cpp_worker, args=(child, path, threads, context), daemon=True)
        self._process.start()
        if not self._conn.poll(300) or self._conn.recv() != "ready":
            raise RuntimeError("llama.cpp did not load the model within 300 s")

    def _call(self, kind: str, n: int, salt: int) -> float:
        self._conn.send((kind, n, salt))
        if not self._conn.poll(600):
            raise RuntimeError(f"llama.cpp {kind} did not answer within 600 s")
        return self._conn.recv()

    def prefill(self, length: int, salt: int) -> float:
        return self._call("prefill", length, salt)

    def decode(self, steps: int, salt: int) -> float:
        return self._call("decode", steps, salt)

    def close(self) -> None:
        self._conn.send(None)
        self._process.join(timeout=30)


def load_llama_cpp(path: str, threads: int, context: int) -> LlamaCpp | None:
    """llama.cpp on the same GGUF file, or None (with the reason printed) where it cannot run."""
    if not path.endswith(".gguf"):
        print("llama.cpp: not compared (the model is not a GGUF file)")
        return None
    try:
        import llama_cpp  # noqa: F401  (checked here; loaded in the child)
    except ImportError:
        print("llama.cpp: not compared (pip install llama-cpp-python: see docs/PERFORMANCE.md)")
        return None
    return LlamaCpp(path, threads, context)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--weights", default="auto", help="auto, quantized or dequantized (GGUF)")
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even where installed")
    parser.add_argument("--decode-steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batches", default=",".join(map(str, DECODE_BATCHES)))
    parser.add_argument("--prefill-lens", default=",".join(map(str, PREFILL_LENS)))
    args = parser.parse_args()
    path = args.model or default_model_path()
    dtype = resolve_dtype(args.dtype, "cpu")
    llm = LLM(model=path, dtype=args.dtype, max_num_seqs=64, max_num_batched_tokens=2048,
              enable_prefix_caching=False, weights=None if args.weights == "auto" else args.weights)
    model = llm.engine.runner.model
    quantized = any(isinstance(m, QuantLinear) for m in model.modules())
    print(f"model {os.path.basename(path)}  dtype {dtype}  weights {'quantized' if quantized else 'dequantized'}"
          f"  threads {torch.get_num_threads()}")
    print(f"CPU {describe_cpu()}")
    hf = load_transformers(path, dtype)
    lengths = list(map(int, args.prefill_lens.split(",")))
    cpp = None if args.no_llama_cpp else load_llama_cpp(path, torch.get_num_threads(), max(lengths) + 64)
    weight_bytes = streamed_weight_bytes(model)
    bandwidth = measure_read_bandwidth()

    # warm-up both (first calls allocate and pick kernels)
    kvferry_prefill(llm, 64, 99)
    hf_prefill(hf, 64, 99)
    kvferry_decode(llm, 2, 4, 99)
    hf_decode(hf, 2, 4, 99)
    if cpp is not None:
        cpp.decode(4, 99)

    cpp_head = f"{'llama.cpp':>12}{'ratio':>8}" if cpp is not None else ""
    print(f"\n{'prefill':<14}{'kvferry tok/s':>15}{'transformers':>15}{'ratio':>8}{cpp_head}")
    for length in lengths:
        ours, theirs, cpps = [], [], []
        for r in range(args.repeats):
            ours.append(kvferry_prefill(llm, length, r))
            theirs.append(hf_prefill(hf, length, r))
            if cpp is not None:
                cpps.append(cpp.prefill(length, r))
        a, b = length / min(ours), length / min(theirs)
        extra = f"{length / min(cpps):>12.0f}{a * min(cpps) / length:>8.2f}x" if cpps else ""
        print(f"{length:>6} tokens {a:>15.0f}{b:>15.0f}{a / b:>8.2f}x{extra}")

    print(f"\n{'decode':<14}{'kvferry tok/s':>15}{'transformers':>15}{'ratio':>8}{'step ms':>9}")
    step_b1 = None
    cpps = []
    for batch in map(int, args.batches.split(",")):
        ours, theirs = [], []
        for r in range(args.repeats):
            ours.append(kvferry_decode(llm, batch, args.decode_steps, r))
            theirs.append(hf_decode(hf, batch, args.decode_steps, r))
            if batch == 1 and cpp is not None:
                cpps.append(cpp.decode(args.decode_steps, r))
        t_ours, t_theirs = min(ours), min(theirs)
        if batch == 1:
            step_b1 = t_ours
        print(f"batch {batch:>3}     {batch / t_ours:>15.1f}{batch / t_theirs:>15.1f}"
              f"{t_theirs / t_ours:>8.2f}x{t_ours * 1e3:>9.2f}")

    if cpps:
        t_cpp = min(cpps)
        line = f"llama.cpp batch 1: {1 / t_cpp:.1f} tok/s, step {t_cpp * 1e3:.2f} ms"
        if step_b1 is not None:
            line += f"; kvferry/llama.cpp {t_cpp / step_b1:.2f}x"
        print(line)

    floor = weight_bytes / bandwidth
    print(f"\nread bandwidth {bandwidth / 1e9:.1f} GB/s, weights streamed per step {weight_bytes / 1e6:.0f} MB, "
          f"floor {floor * 1e3:.2f} ms/step")
    if step_b1 is not None:
        print(f"batch-1 decode step {step_b1 * 1e3:.2f} ms = {step_b1 / floor:.2f}x the bandwidth floor")
    if cpp is not None:
        cpp.close()


if __name__ == "__main__":
    main()
