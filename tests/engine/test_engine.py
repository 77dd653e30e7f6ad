"""The engine as a whole: batch invariance, preemption, prefix caching, aborts, streaming, bad input."""

from __future__ import annotations

import random

import pytest

from kvferry.engine.engine import RequestError
from kvferry.engine.llm import LLM
from kvferry.engine.sampling import SamplingParams, SamplingParamsError

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(default_model_file) -> LLM:
    # Small token budget: longer prompts are prefilled in several chunks. Dequantized fp32 weights: the
    # invariances below (batch, preemption, prefix cache) hold there to the ulp; quantized weights round
    # activations to Q8, which turns an ulp into a flipped near tie (docs/KERNELS.md, quantized weights).
    return LLM(model=default_model_file, dtype="float32", max_num_batched_tokens=128,
               enable_prefix_caching=False, weights="dequantized")


def mixed_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(rng.choice([3, 17, 60, 150, 300]))] for _ in range(n)]


def assert_clean(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert not llm.engine.has_unfinished_requests()
    assert bm.num_used_blocks == 0, f"{bm.num_used_blocks} blocks still in use"
    bm.check_integrity()


@pytest.mark.slow
def test_batch_invariance_with_chunked_prefill(llm):
    prompts = mixed_prompts(32)
    batched = llm.generate(prompts, GREEDY)
    for prompt, got in zip(prompts[:8] + prompts[-4:], batched[:8] + batched[-4:]):
        alone = llm.generate([prompt], GREEDY)[0]
        assert alone.token_ids == got.token_ids
    assert_clean(llm)


def test_preempted_request_resumes_with_the_same_output(default_model_file, llm):
    rng = random.Random(1)
    prompts = [[rng.randrange(100, 40000) for _ in range(n)] for n in (150, 150, 60, 60, 17, 3)]
    expected = [c.token_ids for c in llm.generate(prompts, GREEDY)]
    # The first three fill all 24 blocks of 16 slots, so growing them forces preemption and recompute.
    tight = LLM(model=default_model_file, dtype="float32", num_blocks=24, max_num_batched_tokens=128,
                enable_prefix_caching=False, weights="dequantized")
    got = tight.generate(prompts, GREEDY)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [c.token_ids for c in got] == expected
    assert_clean(tight)


def test_prefix_cache_reuses_blocks_and_keeps_output(default_model_file, llm):
    rng = random.Random(2)
    prefix = [rng.randrange(100, 40000) for _ in range(1000)]
    first, second = prefix + [11, 12, 13], prefix + [21, 22]
    cached = LLM(model=default_model_file, dtype="float32", max_num_batched_tokens=512, weights="dequantized")
    cached.generate([first], GREEDY)
    hits_before = cached.engine.block_manager.num_prefix_hits
    got = cached.generate([second], GREEDY)[0]
    block_size = cached.engine.block_manager.block_size
    assert cached.engine.block_manager.num_prefix_hits - hits_before == 1000 // block_size
    assert got.num_cached_tokens == (1000 // block_size) * block_size
    assert got.token_ids == llm.generate([second], GREEDY)[0].token_ids  # same as with no cache at all
    assert_clean(cached)


def test_bf16_prompt_numerics_do_not_depend_on_cache_hits_or_chunks(default_model_file):
    # bf16 on the CPU: a step of a few tokens could take the skinny decode kernel, which rounds unlike
    # oneDNN, so the tail of a cached or chunked prompt came out with different logits (and, through
    # the cluster, a different greedy text the second time a chat prompt was sent).
    rng = random.Random(3)
    prompt = [rng.randrange(100, 40000) for _ in range(35)]  # 2 blocks of 16 cached, 3 tokens computed
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=0)
    cached = LLM(model=default_model_file, dtype="bfloat16")
    first = cached.generate([prompt], params)[0]
    again = cached.generate([prompt], params)[0]
    assert again.num_cached_tokens == 32
    chunked = LLM(model=default_model_file, dtype="bfloat16", max_num_batched_tokens=32,
                  enable_prefix_caching=False).generate([prompt], params)[0]  # chunks of 32 + 3 tokens
    for other in (again, chunked):
        assert other.token_ids == first.token_ids
        assert [lp.logprob for lp in other.logprobs] == [lp.logprob for lp in first.logprobs]


def test_same_seed_same_output_whatever_the_batch(llm):
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    prompt = "Tell me a story about a dragon"
    alone = llm.generate([prompt], params)[0].token_ids
    others = [SamplingParams(max_tokens=8, temperature=1.0, seed=i) for i in range(5)]
    in_batch = llm.generate(["Hi", prompt, "Once upon", "x y z", "Paris", "The"],
                            [others[0], params] + others[1:])[1].token_ids
    assert alone == in_batch
    assert llm.generate([prompt], params.with_(seed=99))[0].token_ids != alone


def test_leaving_a_stream_early_aborts_and_frees_blocks(llm):
    stream = llm.stream("Count to one hundred:", SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    assert_clean(llm)


def test_streamed_text_equals_final_text_with_stop_strings(llm):
    params = SamplingParams(max_tokens=40, temperature=0, stop=(" Paris",))
    pieces = [out.new_text for out in llm.stream("The capital of France is", params)]
    final = llm.generate(["The capital of France is"], params)[0]
    assert "".join(pieces) == final.text
    assert " Paris" not in final.text and final.finish_reason == "stop"


def test_bad_input_is_refused_and_nothing_leaks(llm):
    engine = llm.engine
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("e1", [], GREEDY)
    with pytest.raises(RequestError, match="context"):
        engine.add_request("e2", [5] * (engine.max_model_len + 1), GREEDY)
    with pytest.raises(RequestError, match="token ids"):
        engine.add_request("e3", [10**9], GREEDY)
    engine.add_request("dup", "hello", GREEDY)
    with pytest.raises(RequestError, match="duplicate"):
        engine.add_request("dup", "hello", GREEDY)
    assert engine.abort_request("dup")
    assert not engine.abort_request("dup")
    with pytest.raises(SamplingParamsError, match="temperature"):
        SamplingParams(temperature=-1)
    assert_clean(llm)


def test_thousand_random_requests_with_random_aborts(make_hf_checkpoint):
    """Random prompts, lengths, parameters and aborts at random moments: no block may leak."""
    tiny = LLM(model=make_hf_checkpoint("llama3"), dtype="float32", num_blocks=96, block_size=4,
               max_num_seqs=24, max_num_batched_tokens=64, max_model_len=256)
    engine, bm = tiny.engine, tiny.engine.block_manager
    rng = random.Random(3)
    added = finished = aborted = 0
    live: set[str] = set()
    for _ in range(20000):  # bounded: always far more steps than needed
        if added < 1000:
            for _ in range(rng.randint(0, 6)):
                if added == 1000:
                    break
                params = SamplingParams(
                    max_tokens=rng.randint(1, 24), temperature=rng.choice([0, 0.7, 1.0]),
                    top_k=rng.choice([-1, 5]), seed=rng.choice([None, 7]), ignore_eos=rng.random() < 0.5,
                )
                rid = f"r{added}"
                engine.add_request(rid, [rng.randrange(3, 40000) for _ in range(rng.randint(1, 120))], params)
                live.add(rid)
                added += 1
        if live and rng.random() < 0.3:
            rid = rng.choice(sorted(live))
            assert engine.abort_request(rid)
            live.discard(rid)
            aborted += 1
        for out in engine.step():
            if out.finished:
                live.discard(out.request_id)
                finished += 1
        bm.check_integrity(engine.scheduler.requests.values())
        if added == 1000 and not engine.has_unfinished_requests():
            break
    assert added == 1000 and finished + aborted == 1000 and aborted > 100
    assert engine.scheduler.num_preemptions > 0, "96 blocks should force preemptions under this load"
    assert_clean(tiny)
