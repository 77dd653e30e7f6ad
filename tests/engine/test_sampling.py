import math
from collections import Counter

import pytest
import torch

from kvferry.engine.sampling import (
    greedy_tokens,
    SampleResult,
    _nucleus_threshold,
    Sampler,
    SamplingParams,
    SamplingParamsError,
    check_stop,
    stop_holdback,
)

VOCAB = 64


def _logits(num_seqs: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(num_seqs, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _sample(params: list[SamplingParams], logits: torch.Tensor, prompts=None, outputs=None,
            sampler: Sampler | None = None) -> SampleResult:
    sampler = sampler or Sampler(seed=0)
    states = [sampler.new_state(p, (prompts or {}).get(i, [1, 2]), (outputs or {}).get(i, ()))
              for i, p in enumerate(params)]
    return sampler.sample(logits, states)


# -- validation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,expect", [
    ("max_tokens", 0, ">= 1"), ("max_tokens", 1.5, ">= 1"), ("max_tokens", True, ">= 1"),
    ("temperature", -0.1, "[0, 2]"), ("temperature", 2.5, "[0, 2]"), ("temperature", math.nan, "[0, 2]"),
    ("temperature", "1", "[0, 2]"),
    ("top_p", 0.0, "(0, 1]"), ("top_p", 1.01, "(0, 1]"),
    ("top_k", -2, "-1 or 0"), ("top_k", 1.0, "-1 or 0"),
    ("min_p", -0.01, "[0, 1]"), ("min_p", 1.5, "[0, 1]"),
    ("seed", 2**64, "integer in"), ("seed", -(2**63) - 1, "integer in"), ("seed", 1.0, "integer in"),
    ("presence_penalty", 2.1, "[-2, 2]"), ("presence_penalty", -2.1, "[-2, 2]"),
    ("frequency_penalty", 3, "[-2, 2]"), ("frequency_penalty", -math.inf, "[-2, 2]"),
    ("repetition_penalty", 0.0, "(0, inf)"), ("repetition_penalty", -1.0, "(0, inf)"),
    ("repetition_penalty", math.inf, "(0, inf)"),
    ("stop", [""], "non-empty"), ("stop", [1], "list of str"), ("stop", 5, "list of str"),
    ("stop_token_ids", [-1], ">= 0"), ("stop_token_ids", ["a"], "list of int"), ("stop_token_ids", 3, "list of int"),
    ("stop", ["s"] * 10_000, "at most 32 stop strings"), ("stop", ["x" * 513], "at most 512 characters"),
    ("stop_token_ids", list(range(1_000_000)), "at most 256 stop token ids"),
    ("ignore_eos", 1, "boolean"), ("include_stop_str_in_output", None, "boolean"),
    ("logprobs", -1, "[0, 20]"), ("logprobs", 21, "[0, 20]"),
    ("n", 0, ">= 1"),
])
def test_validation_errors_name_field_and_range(field, value, expect):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**{field: value})
    assert isinstance(e.value, ValueError)
    assert e.value.param == field
    assert str(e.value).startswith(field) and expect in str(e.value)


def test_valid_params_and_normalisation():
    p = SamplingParams(temperature=0, top_k=0, seed=-5, stop="###", stop_token_ids=[7, 8], logprobs=0)
    assert p.greedy and p.stop == ("###",) and p.stop_token_ids == (7, 8)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc") and SamplingParams().max_stop_len == 0
    assert SamplingParams(temperature=1e-6).greedy and not SamplingParams().greedy
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1
    assert not SamplingParams().has_penalties and SamplingParams(repetition_penalty=1.1).has_penalties
    q = p.with_(temperature=0.5)
    assert q.temperature == 0.5 and q.stop == p.stop and p.temperature == 0
    with pytest.raises(SamplingParamsError):
        p.with_(top_p=0)
    hash(p)  # usable as a key


# -- greedy and seeded sampling -----------------------------------------------------------------------

def test_greedy_is_argmax_and_batch_fast_path():
    logits = _logits(5)
    result = _sample([SamplingParams(temperature=0)] * 5, logits)
    assert result.token_ids == logits.argmax(-1).tolist()
    assert result.logprobs == [None] * 5


def test_greedy_rows_mixed_with_random_rows():
    logits = _logits(4)
    params = [SamplingParams(temperature=0), SamplingParams(seed=1), SamplingParams(temperature=0, logprobs=1),
              SamplingParams(seed=2)]
    result = _sample(params, logits)
    assert result.token_ids[0] == logits[0].argmax() and result.token_ids[2] == logits[2].argmax()


def test_sample_does_not_modify_inputs():
    logits = _logits(3)
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=1.5, frequency_penalty=1.0, seed=1, top_p=0.5, top_k=5,
                             min_p=0.1, logprobs=3)] * 3
    sampler = Sampler(seed=0)
    states = [sampler.new_state(p, [1, 2, 3], [4, 4]) for p in params]
    first = sampler.sample(logits, states)
    assert torch.equal(logits, before)
    assert sampler.sample(logits, states) == first  # states untouched: same step, same draw


def test_same_seed_same_tokens_whatever_the_batch():
    target = SamplingParams(seed=1234, temperature=1.0, top_p=0.95)
    steps = 20
    row_logits = [_logits(1, seed=100 + k)[0] for k in range(steps)]

    def run(batch_size: int, position: int, others_seed: int) -> list[int]:
        sampler = Sampler(seed=others_seed)
        others = [SamplingParams(temperature=0.7 + 0.1 * j, seed=None if j % 2 else j, top_k=10)
                  for j in range(batch_size - 1)]
        params = others[:position] + [target] + others[position:]
        states = [sampler.new_state(p, [5, 6]) for p in params]
        tokens = []
        for k in range(steps):
            logits = _logits(batch_size, seed=others_seed * 1000 + k)
            logits[position] = row_logits[k]
            result = sampler.sample(logits, states)
            tokens.append(result.token_ids[position])
            for s, t in zip(states, result.token_ids):
                s.append(t)
        return tokens

    alone = run(1, 0, 7)
    assert run(4, 0, 8) == alone
    assert run(4, 3, 9) == alone
    assert run(7, 2, 10) == alone
    assert len(set(alone)) > 1  # really sampling, not argmax


def test_seeded_stream_continues_on_another_sampler():
    # A decode worker receiving the request after its first token continues the same stream.
    params = SamplingParams(seed=42)
    logits = [_logits(1, seed=k) for k in range(10)]
    a = Sampler(seed=1)
    sa = a.new_state(params, [1])
    tokens = []
    for x in logits:
        tokens.append(a.sample(x, [sa]).token_ids[0])
        sa.append(tokens[-1])
    b = Sampler(seed=2)
    sb = b.new_state(params, [1], output_token_ids=tokens[:1])
    rest = []
    for x in logits[1:]:
        rest.append(b.sample(x, [sb]).token_ids[0])
        sb.append(rest[-1])
    assert rest == tokens[1:]
    # An unseeded request continues too when its state's seed travels with it.
    unseeded = a.new_state(SamplingParams(), [1])
    moved = b.new_state(SamplingParams(), [1], seed=unseeded.seed)
    assert a.sample(logits[0], [unseeded]) == b.sample(logits[0], [moved])


def test_different_seeds_differ():
    logits = torch.zeros(1, VOCAB)  # uniform: any two streams of 10 collide with prob 64**-10
    streams = []
    for seed in (1, 2, 3):
        sampler = Sampler()
        state = sampler.new_state(SamplingParams(seed=seed), [0])
        stream = []
        for _ in range(10):
            stream.append(sampler.sample(logits, [state]).token_ids[0])
            state.append(stream[-1])
        streams.append(stream)
    assert streams[0] != streams[1] != streams[2] != streams[0]


def test_unseeded_requests_follow_the_engine_seed():
    logits = torch.zeros(8, VOCAB)
    a = _sample([SamplingParams()] * 8, logits, sampler=Sampler(seed=5)).token_ids
    b = _sample([SamplingParams()] * 8, logits, sampler=Sampler(seed=5)).token_ids
    c = _sample([SamplingParams()] * 8, logits, sampler=Sampler(seed=6)).token_ids
    assert a == b and a != c


# -- truncation ---------------------------------------------------------------------------------------

def test_top_k_1_and_tiny_top_p_equal_greedy():
    logits = _logits(6, seed=3)
    argmax = logits.argmax(-1).tolist()
    params = [SamplingParams(seed=i, top_k=1, temperature=2.0) for i in range(3)]
    params += [SamplingParams(seed=i, top_p=1e-6, temperature=2.0) for i in range(3)]
    for step in range(5):
        sampler = Sampler()
        states = [sampler.new_state(p, [0], [0] * step) for p in params]
        assert sampler.sample(logits, states).token_ids == argmax


def test_top_k_limits_to_k_best():
    logits = _logits(1, seed=4)
    best = set(logits[0].topk(3).indices.tolist())
    sampler = Sampler()
    state = sampler.new_state(SamplingParams(seed=0, top_k=3, temperature=2.0), [0])
    seen = set()
    for _ in range(200):
        seen.add(sampler.sample(logits, [state]).token_ids[0])
        state.append(0)
    assert seen == best


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    sampler = Sampler()
    for top_p, allowed in [(0.45, {0}), (0.6, {0, 1}), (0.79, {0, 1}), (0.85, {0, 1, 2}), (0.99, {0, 1, 2, 3})]:
        for top_k in (-1, 3):  # the top-k-then-sort-only-k path gives the same set
            state = sampler.new_state(SamplingParams(seed=1, top_p=top_p, top_k=top_k), [0])
            seen = set()
            for _ in range(200):
                seen.add(sampler.sample(logits, [state]).token_ids[0])
                state.append(0)
            assert seen == (allowed if top_k == -1 else allowed - {3}), (top_p, top_k)


def test_nucleus_threshold_matches_full_sort_at_every_candidate_level():
    vocab = 6000
    # Sharper to flatter rows: nuclei within the top 256, within 2048, and wider (the full sort).
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(0))
    logits *= torch.tensor([[8.0], [4.0], [2.0], [1.0], [0.3], [0.0]])
    probs = logits.softmax(-1)
    top_p = torch.tensor([0.9, 0.95, 0.9, 0.9, 0.99, 0.7])
    sorted_probs = probs.sort(-1, descending=True).values
    num_kept = ((sorted_probs.cumsum(-1) - sorted_probs) < top_p[:, None]).sum(-1)
    assert num_kept.min() < 256 and num_kept.max() > 2048 and ((num_kept > 256) & (num_kept < 2048)).any()
    expected = sorted_probs.gather(1, (num_kept - 1)[:, None]).squeeze(1)
    assert torch.equal(_nucleus_threshold(probs, top_p, vocab), expected)
    # With top-k applied first only k tokens are candidates.
    masked = probs.masked_fill(probs < probs.topk(300).values[:, -1:], 0.0)
    sorted_masked = masked.sort(-1, descending=True).values
    n = ((sorted_masked.cumsum(-1) - sorted_masked) < top_p[:, None] * masked.sum(-1, keepdim=True)).sum(-1)
    tau = _nucleus_threshold(masked / masked.sum(-1, keepdim=True), top_p, 300)
    assert torch.allclose(tau * masked.sum(-1), sorted_masked.gather(1, (n - 1)[:, None]).squeeze(1))


def test_top_p_and_min_p_together():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    sampler = Sampler()
    for top_p, min_p, allowed in [(0.85, 0.6, {0, 1}), (0.6, 0.2, {0, 1}), (0.99, 0.2, {0, 1, 2, 3})]:
        state = sampler.new_state(SamplingParams(seed=5, top_p=top_p, min_p=min_p), [0])
        seen = set()
        for _ in range(300):
            seen.add(sampler.sample(probs.log(), [state]).token_ids[0])
            state.append(0)
        assert seen == allowed, (top_p, min_p)


def test_min_p_filters_relative_to_max():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    sampler = Sampler()
    state = sampler.new_state(SamplingParams(seed=3, min_p=0.45), [0])  # keeps p >= 0.18
    seen = set()
    for _ in range(300):
        seen.add(sampler.sample(probs.log(), [state]).token_ids[0])
        state.append(0)
    assert seen == {0, 1, 2}


def test_temperature_statistics_on_three_tokens():
    probs = torch.tensor([0.6, 0.3, 0.1])
    sampler = Sampler()
    counts = {}
    for temperature in (1.0, 0.5):
        state = sampler.new_state(SamplingParams(seed=2024, temperature=temperature), [0])
        c = Counter()
        for _ in range(3000):
            c[sampler.sample(probs.log().unsqueeze(0), [state]).token_ids[0]] += 1
            state.append(0)
        counts[temperature] = c
    # T=1: expected 1800/900/300, sd <= 27; bounds are > 4 sd and the seed is fixed.
    assert 1680 <= counts[1.0][0] <= 1920 and 800 <= counts[1.0][1] <= 1000 and 230 <= counts[1.0][2] <= 370
    # T=0.5 squares the probabilities: 0.36/0.09/0.01 -> 0.783/0.196/0.022.
    assert 2230 <= counts[0.5][0] <= 2470 and 480 <= counts[0.5][1] <= 700 and 30 <= counts[0.5][2] <= 110


# -- penalties ----------------------------------------------------------------------------------------

def _processed_logits(params: SamplingParams, logits: torch.Tensor, prompt, output) -> torch.Tensor:
    sampler = Sampler()
    return sampler._apply_penalties(logits, [sampler.new_state(params, prompt, output)])


def test_repetition_penalty_hf_semantics():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 3.0]])
    got = _processed_logits(SamplingParams(repetition_penalty=2.0), logits, prompt=[0, 1], output=[2, 3, 3])
    assert torch.allclose(got, torch.tensor([[1.0, -4.0, 0.5, -2.0, 0.5, 3.0]]))
    got = _processed_logits(SamplingParams(repetition_penalty=0.5), logits, prompt=[5], output=[])
    assert torch.allclose(got, torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 6.0]]))


def test_frequency_and_presence_penalties_openai_semantics():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 3.0]])
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=1.5)
    got = _processed_logits(params, logits, prompt=[0, 1], output=[2, 3, 3, 3])  # the prompt does not count
    expected = logits.clone()
    expected[0, 2] -= 0.5 * 1 + 1.5
    expected[0, 3] -= 0.5 * 3 + 1.5
    assert torch.allclose(got, expected)


def test_penalties_combined_against_direct_computation():
    vocab = 10
    logits = _logits(3, seed=9, vocab=vocab)
    prompts = {0: [1, 2], 1: [3], 2: [0, 9]}
    outputs = {0: [2, 4, 4], 1: [], 2: [5, 5, 5, 0]}
    params = [SamplingParams(repetition_penalty=1.3, frequency_penalty=0.2, presence_penalty=-0.4),
              SamplingParams(temperature=0),  # no penalties: row untouched
              SamplingParams(repetition_penalty=0.8, presence_penalty=2.0)]
    sampler = Sampler()
    states = [sampler.new_state(p, prompts[i], outputs[i]) for i, p in enumerate(params)]
    got = sampler._apply_penalties(logits, states)
    expected = logits.clone()
    for i, p in enumerate(params):
        c = Counter(outputs[i])
        for t in range(vocab):
            x = expected[i, t].item()
            if t in set(prompts[i]) | set(outputs[i]):
                x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
            x -= p.frequency_penalty * c[t] + p.presence_penalty * (c[t] > 0)
            expected[i, t] = x
    assert torch.allclose(got, expected, atol=1e-6)


def test_penalties_change_greedy_choice():
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    assert _sample([SamplingParams(temperature=0)], logits, outputs={0: [0]}).token_ids == [0]
    assert _sample([SamplingParams(temperature=0, frequency_penalty=2.0)], logits, outputs={0: [0]}).token_ids == [1]
    assert _sample([SamplingParams(temperature=0, repetition_penalty=1.5)], logits,
                   prompts={0: [0]}).token_ids == [1]


def test_append_keeps_counts_incrementally():
    sampler = Sampler()
    state = sampler.new_state(SamplingParams(repetition_penalty=1.2, frequency_penalty=1.0), [1, 1, 2])
    for t in (3, 3, 5):
        state.append(t)
    assert state.num_output_tokens == 3
    ids, counts = state.penalty_tokens()
    assert dict(zip(ids.tolist(), counts.tolist())) == {1: 0, 2: 0, 3: 2, 5: 1}
    for t in range(100):  # the buffers grow
        state.append(t)
    ids, counts = state.penalty_tokens()
    assert sorted(ids.tolist()) == list(range(100)) and counts.sum() == 103
    assert dict(zip(ids.tolist(), counts.tolist()))[3] == 3
    # Without a repetition penalty the prompt is not tracked; without penalties nothing is.
    state = sampler.new_state(SamplingParams(presence_penalty=1.0), [1, 2], [4, 4])
    assert [a.tolist() for a in state.penalty_tokens()] == [[4], [2.0]]
    assert [len(a) for a in sampler.new_state(SamplingParams(), [1], [2]).penalty_tokens()] == [0, 0]


# -- logprobs -----------------------------------------------------------------------------------------

def test_logprobs_are_raw_log_softmax_with_ordered_top_n():
    logits = _logits(3, seed=11)
    params = [SamplingParams(logprobs=5, seed=1, temperature=0.3, repetition_penalty=1.5),
              SamplingParams(), SamplingParams(logprobs=0, temperature=0)]
    result = _sample(params, logits, prompts={0: list(range(20))})
    raw = logits.log_softmax(-1)
    lp0 = result.logprobs[0]
    assert lp0.token_id == result.token_ids[0]
    assert lp0.logprob == pytest.approx(raw[0, lp0.token_id].item(), abs=1e-6)
    top = raw[0].topk(5)
    assert list(lp0.top_logprobs) == top.indices.tolist()  # highest first
    assert list(lp0.top_logprobs.values()) == pytest.approx(top.values.tolist(), abs=1e-6)
    assert result.logprobs[1] is None
    lp2 = result.logprobs[2]
    assert lp2.top_logprobs == {} and lp2.logprob == pytest.approx(raw[2].max().item(), abs=1e-6)


# -- stop conditions ----------------------------------------------------------------------------------

EOS = (0,)


def test_stop_on_length_eos_and_stop_tokens():
    p = SamplingParams(max_tokens=3, stop_token_ids=(7,))
    assert not check_stop([5], 5, "a", p, EOS, 1).finished
    d = check_stop([5, 5, 5], 5, "aaa", p, EOS, 1)
    assert (d.finished, d.reason, d.trim_text_to) == (True, "length", None)
    d = check_stop([5, 0], 0, "a</s>", p, EOS, 4)
    assert (d.reason, d.trim_text_to, d.stop_reason) == ("stop", 1, None)
    d = check_stop([5, 5, 7], 7, "aa", p, EOS, 0)  # a stop on the last allowed token is a 'stop'
    assert (d.reason, d.trim_text_to, d.stop_reason) == ("stop", None, 7)
    assert not check_stop([0], 0, "", p.with_(ignore_eos=True), EOS, 0).finished
    d = check_stop([7], 7, "<x>", p.with_(ignore_eos=True, include_stop_str_in_output=True), EOS, 3)
    assert (d.reason, d.trim_text_to) == ("stop", None)


def test_stop_string_spanning_tokens():
    p = SamplingParams(stop=("END", "\n\n"))
    text = ""
    decisions = []
    for piece in ["Hello E", "N", "D and more"]:
        text += piece
        decisions.append(check_stop([1] * len(decisions), 1, text, p, EOS, len(piece)))
    assert [d.finished for d in decisions] == [False, False, True]
    d = decisions[-1]
    assert (d.reason, d.stop_reason) == ("stop", "END") and text[:d.trim_text_to] == "Hello "
    d = check_stop([1], 1, text, p.with_(include_stop_str_in_output=True), EOS, 10)
    assert text[:d.trim_text_to] == "Hello END"
    # The earliest match wins when one token completes two stop strings.
    d = check_stop([1], 1, "ab\n\nEND", p, EOS, 7)
    assert d.stop_reason == "\n\n" and d.trim_text_to == 2
    # Only the tail is searched: an old occurrence (say, held in include mode) is not matched again.
    assert not check_stop([1], 1, "END then x", p, EOS, 1).finished
    assert check_stop([1], 1, "END then x", p, EOS, None).finished


def test_holdback():
    p = SamplingParams(stop=("</answer>", "STOP"))
    assert stop_holdback("text </ans", p) == 5
    assert stop_holdback("text <", p) == 1
    assert stop_holdback("ST", p) == 2
    assert stop_holdback("no match", p) == 0
    assert stop_holdback("", p) == 0
    assert stop_holdback("text </ans", p.with_(include_stop_str_in_output=True)) == 0
    assert stop_holdback("abc", SamplingParams()) == 0


@pytest.mark.parametrize("pieces", [
    ["The answer", " is 4", "2</", "ans", "wer> trailing"],
    ["<", "/", "answer", ">"],
    ["a<", "b</answer", ">"],
    ["no stop here", " at all"],
    ["ST", "OP"],
    ["S", "T", "x", "STO", "P!"],
])
def test_streaming_with_holdback_never_emits_stopped_text(pieces):
    p = SamplingParams(stop=("</answer>", "STOP"), max_tokens=100)
    text, emitted, final = "", "", None
    for i, piece in enumerate(pieces):
        text += piece
        d = check_stop([1] * (i + 1), 1, text, p, EOS, len(piece))
        if d.finished:
            final = text[:d.trim_text_to] if d.trim_text_to is not None else text
            break
        safe = len(text) - stop_holdback(text, p)
        emitted += text[len(emitted):safe]
        assert final is None
    final = text if final is None else final
    assert final.startswith(emitted)
    assert "</answer>" not in final and "STOP" not in final


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_take_the_first_maximum_as_argmax_does(dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (16, 4099), generator=g).to(dtype)  # many ties per row
    logits[5, 17] = logits[5, 900] = float("nan")  # a NaN is the maximum, the first one wins
    logits[7] = -float("inf")
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))
    assert greedy_tokens(logits)[5] == 17 and greedy_tokens(logits)[7] == 0
