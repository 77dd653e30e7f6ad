"""Engine benchmark: kvferry vs transformers on the same model, dtype and machine, in one run.

Measures prefill tok/s (128, 512, 2048-token prompts) and decode tok/s at batch 1, 8, 32, 64 for both,
prints kvferry/transformers ratios, and the ratio of kvferry's batch-1 decode step to the memory-bandwidth
floor (weight bytes / read bandwidth measured in this run). Targets (issue 2): decode >= 1.5x
transformers at batch 1 and 64, prefill >= 1.0x.

    python bench/engine_bench.py [--model PATH] [--dtype bfloat16] [--decode-steps 32]

The two engines are timed alternately per case, so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from kvferry.engine.config import default_model_path, resolve_dtype
from kvferry.engine.llm import LLM
from kvferry.engine.sampling import SamplingParams

PREFILL_LENS = (128, 512, 2048)
DECODE_BATCHES = (1, 8, 32, 64)
DECODE_CONTEXT = 128  # prompt length of each decoding stream


def measure_read_bandwidth(nbytes: int = 512 * 1024 * 1024, repeats: int = 5) -> float:
    """Bytes/s for a streaming read (a sum over a buffer far larger than the caches)."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    buf.sum()
    best = min(_timed(lambda: buf.sum()) for _ in range(repeats))
    return nbytes / best


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
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--decode-steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batches", default=",".join(map(str, DECODE_BATCHES)))
    parser.add_argument("--prefill-lens", default=",".join(map(str, PREFILL_LENS)))
    args = parser.parse_args()
    path = args.model or default_model_path()
    dtype = resolve_dtype(args.dtype, "cpu")
    print(f"model {os.path.basename(path)}  dtype {dtype}  threads {torch.get_num_threads()}")

    llm = LLM(model=path, dtype=args.dtype, max_num_seqs=64, max_num_batched_tokens=2048,
              enable_prefix_caching=False)
    hf = load_transformers(path, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.engine.runner.model.parameters())
    bandwidth = measure_read_bandwidth()

    # warm-up both (first calls allocate and pick kernels)
    kvferry_prefill(llm, 64, 99)
    hf_prefill(hf, 64, 99)
    kvferry_decode(llm, 2, 4, 99)
    hf_decode(hf, 2, 4, 99)

    print(f"\n{'prefill':<14}{'kvferry tok/s':>15}{'transformers':>15}{'ratio':>8}")
    for length in map(int, args.prefill_lens.split(",")):
        ours, theirs = [], []
        for r in range(args.repeats):
            ours.append(kvferry_prefill(llm, length, r))
            theirs.append(hf_prefill(hf, length, r))
        a, b = length / min(ours), length / min(theirs)
        print(f"{length:>6} tokens {a:>15.0f}{b:>15.0f}{a / b:>8.2f}x")

    print(f"\n{'decode':<14}{'kvferry tok/s':>15}{'transformers':>15}{'ratio':>8}{'step ms':>9}")
    step_b1 = None
    for batch in map(int, args.batches.split(",")):
        ours, theirs = [], []
        for r in range(args.repeats):
            ours.append(kvferry_decode(llm, batch, args.decode_steps, r))
            theirs.append(hf_decode(hf, batch, args.decode_steps, r))
        t_ours, t_theirs = min(ours), min(theirs)
        if batch == 1:
            step_b1 = t_ours
        print(f"batch {batch:>3}     {batch / t_ours:>15.1f}{batch / t_theirs:>15.1f}"
              f"{t_theirs / t_ours:>8.2f}x{t_ours * 1e3:>9.2f}")

    floor = weight_bytes / bandwidth
    print(f"\nread bandwidth {bandwidth / 1e9:.1f} GB/s, weights {weight_bytes / 1e6:.0f} MB, "
          f"floor {floor * 1e3:.2f} ms/step")
    if step_b1 is not None:
        print(f"batch-1 decode step {step_b1 * 1e3:.2f} ms = {step_b1 / floor:.2f}x the bandwidth floor")


if __name__ == "__main__":
    main()
