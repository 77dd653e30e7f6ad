"""Prefill timings: the engine stamps arrival, first scheduled step and first token on each request and
reports them as durations on the first token's output, for prompts it computed itself only."""

from __future__ import annotations

from kvferry.engine.llm import LLM
from kvferry.engine.sampling import SamplingParams

PARAMS = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)


def test_first_token_output_carries_queue_and_compute_durations(make_hf_checkpoint):
    # A 16-token budget: the 40-token prompt takes three steps, and the second prompt waits for room.
    engine = LLM(model=make_hf_checkpoint("llama3"), dtype="float32", block_size=4, num_blocks=64,
                 max_num_batched_tokens=16).engine
    engine.add_request("long", list(range(100, 140)), PARAMS)
    engine.add_request("short", list(range(200, 208)), PARAMS)
    timings, later = {}, []
    for _ in range(50):
        for out in engine.step():
            (timings.setdefault(out.request_id, out.prefill_timings) if out.request_id not in timings
             else later.append(out.prefill_timings))
        if not engine.has_unfinished_requests():
            break
    long, short = timings["long"], timings["short"]
    assert long is not None and short is not None and later == [None] * 4  # only on the first token
    assert long.queue_seconds >= 0 and long.compute_seconds > 0 and short.compute_seconds > 0
    assert short.queue_seconds > long.queue_seconds  # it waited for the long prompt's chunks


def test_kv_received_from_a_prefill_worker_has_no_prefill_timings(make_hf_checkpoint):
    decode = LLM(model=make_hf_checkpoint("llama3"), dtype="float32", block_size=4, num_blocks=64).engine
    assert decode.reserve("r", list(range(100, 110)), PARAMS) is not None
    assert decode.commit_kv("r", 42).prefill_timings is None
    assert decode.get_request("r").prefill_timings is None
