"""Structured output's cost per token: an engine decode step with and without a JSON-schema grammar mask,
same batch, same prompts, same machine, in alternating rounds.

    python bench/grammar_mask_bench.py [--batch 1 8] [--steps 32] [--repeats 3] [--quick]

Each round adds ``batch`` greedy requests (``--prompt-len``-token prompts), steps until every prompt is
prefilled and the grammar requests are past their first token, then times ``--steps`` decode steps.
Free requests run with ``ignore_eos``; grammar requests with a schema that cannot end within the steps
(an array of at least 1000 objects of strings, integers and enums), so the batch stays whole. Within
the grammar steps, the time in the mask itself (llguidance computing the allowed tokens of every row,
and the -inf fill) is measured apart. Reported per batch: median step without and with the grammar,
their ratio, and the mask's median cost per step and per token. The rounds alternate (free, grammar,
free, ...) because the host steals CPU from these VMs: figures from separate runs do not compare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine_bench import describe_cpu, prompt_ids  # noqa: E402
from kvferry.common.grammar import GrammarSpec  # noqa: E402
from kvferry.engine.config import CacheConfig, EngineConfig, SchedulerConfig, default_model_path  # noqa: E402
from kvferry.engine.engine import LLMEngine  # noqa: E402
from kvferry.engine.sampling import SamplingParams  # noqa: E402

ITEM = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}
SCHEMA = {"type": "object", "properties": {"people": {"type": "array", "items": ITEM, "minItems": 1000}},
          "required": ["people"], "additionalProperties": False}


class MaskTimer:
    """Wraps the sampler's grammar step to time it (the bench's own instrument, not the engine's)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.seconds = 0.0
        sampler = engine.sampler
        inner = sampler._apply_grammars

        def timed(logits, states):
            start = time.perf_counter()
            out = inner(logits, states)
            self.seconds += time.perf_counter() - start
            return out

        sampler._apply_grammars = timed


def round_(engine: LLMEngine, timer: MaskTimer, batch: int, steps: int, prompt_len: int, grammar: bool,
           salt: int) -> tuple[float, float]:
    """(median step seconds, median mask seconds per step) of one round."""
    if grammar:
        params = SamplingParams(max_tokens=steps + 8, temperature=0, grammar=GrammarSpec.json_schema(SCHEMA))
    else:
        params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    ids = [f"r{salt}-{i}" for i in range(batch)]
    for i, rid in enumerate(ids):
        engine.add_request(rid, prompt_ids(prompt_len, salt * 1000 + i), params)
    while any(r.num_output_tokens < 2 for r in engine.scheduler.requests.values()):
        engine.step()  # prefill and the first steps, where each request's matcher is built
    step_times, mask_times = [], []
    for _ in range(steps):
        timer.seconds = 0.0
        start = time.perf_counter()
        outputs = engine.step()
        step_times.append(time.perf_counter() - start)
        mask_times.append(timer.seconds)
        assert len(outputs) == batch and not any(o.finished for o in outputs), "the batch must stay whole"
    for rid in ids:
        engine.abort_request(rid)
    return statistics.median(step_times), statistics.median(mask_times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per round (default 32)")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per mode and batch (default 3)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: batch 2, 4 steps, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.repeats = [2], 4, 1
    config = EngineConfig(model=args.model or default_model_path(),
                          cache=CacheConfig(num_blocks=max(64, 4 * max(args.batch) * (args.prompt_len + args.steps) // 16)),
                          scheduler=SchedulerConfig(max_num_seqs=max(args.batch), max_model_len=2048))
    engine = LLMEngine(config)
    timer = MaskTimer(engine)
    print(f"cpu: {describe_cpu()}; torch threads {torch.get_num_threads()}; model {os.path.basename(config.model)}")
    print(f"{'batch':>5}  {'free ms/step':>12}  {'grammar ms/step':>15}  {'ratio':>6}  {'mask ms/step':>12}  "
          f"{'mask ms/token':>13}")
    salt = 0
    for batch in args.batch:
        free, masked, mask = [], [], []
        for _ in range(args.repeats):
            for grammar in (False, True):  # alternating: the same noise falls on both
                salt += 1
                step, mask_s = round_(engine, timer, batch, args.steps, args.prompt_len, grammar, salt)
                (masked if grammar else free).append(step)
                if grammar:
                    mask.append(mask_s)
        f, g, m = min(free) * 1e3, min(masked) * 1e3, statistics.median(mask) * 1e3
        print(f"{batch:>5}  {f:>12.2f}  {g:>15.2f}  {g / f:>6.3f}  {m:>12.3f}  {m / batch:>13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
