"""A stream resumed on another engine (request migration): the prompt plus the tokens produced so far
are prefilled together and generation goes on from the next output position, giving exactly the tokens
an undisturbed run gives — greedy, and seeded sampling with penalties too (its random stream is keyed
by seed and output position, and the penalties count the resumed tokens as output)."""

from __future__ import annotations

import pytest

from kvferry.engine.engine import RequestError
from kvferry.engine.llm import LLM
from kvferry.engine.sampling import SamplingParams

PROMPT = [1, 504, 3458, 282, 4649, 314, 1545, 284, 1930, 30, 8203, 1180, 28, 2270]


@pytest.fixture(scope="module")
def llm(default_model_file) -> LLM:
    return LLM(model=default_model_file, dtype="float32", weights="dequantized", enable_prefix_caching=False)


def run(llm: LLM, request_id: str, params: SamplingParams, resumed: list[int] = ()) -> tuple[list[int], list]:
    engine = llm.engine
    engine.add_request(request_id, PROMPT, params, output_token_ids=list(resumed))
    tokens, outputs = [], []
    for _ in range(params.max_tokens + 4):
        for out in engine.step():
            assert out.request_id == request_id
            tokens.extend(out.new_token_ids)
            outputs.append(out)
            if out.finished:
                assert engine.block_manager.num_used_blocks == 0
                return tokens, outputs
    raise AssertionError("the request did not finish")


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True,
                   presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2),
], ids=["greedy", "seeded-with-penalties"])
def test_resumed_stream_goes_on_with_the_undisturbed_tokens(llm, params):
    whole, _ = run(llm, "whole", params)
    assert len(whole) == 16
    for cut in (1, 7, 15):
        rest, outputs = run(llm, f"resumed-{cut}", params, whole[:cut])
        assert rest == whole[cut:], f"resumed after {cut} tokens"
        assert outputs[-1].num_output_tokens == 16 and outputs[-1].finish_reason == "length"
        assert outputs[0].prefill_timings is not None  # this engine prefilled it: its timings are reported


def test_resume_with_nothing_left_or_bad_ids_is_refused(llm):
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    with pytest.raises(RequestError, match="nothing left to generate"):
        llm.engine.add_request("done", PROMPT, params, output_token_ids=[5, 6, 7, 8])
    with pytest.raises(RequestError, match="resumed output token ids"):
        llm.engine.add_request("bad", PROMPT, params, output_token_ids=[10**9])
    assert not llm.engine.has_unfinished_requests()
