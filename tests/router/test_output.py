"""Router-side detokenization and stop handling, with the default model's real tokenizer."""

from kvferry.engine.sampling import SamplingParams
from kvferry.router.output import ChoiceState
from kvferry.common.sampling import TokenLogprobs


def feed_one_by_one(state, ids):
    deltas = []
    for t in ids:
        deltas.append(state.add([t], None))
        if state.finished:
            break
    return deltas


def test_streamed_text_equals_full_decode(served_model):
    tok = served_model.tokenizer
    ids = tok.encode(" Héllo, wörld! 東京 🚀 done", add_special_tokens=False)
    state = ChoiceState(0, tok, tok.encode("prompt"), SamplingParams(max_tokens=100))
    deltas = feed_one_by_one(state, ids)
    assert "".join(d.text for d in deltas) == tok.decode(ids)
    assert state.finish_reason is None


def test_stop_string_across_tokens_is_held_back_and_cut(served_model):
    tok = served_model.tokenizer
    ids = tok.encode(" one two three four five", add_special_tokens=False)
    state = ChoiceState(0, tok, [1], SamplingParams(max_tokens=100, stop=["three f"]))
    deltas = feed_one_by_one(state, ids)
    text = "".join(d.text for d in deltas)
    assert text == " one two " and state.finish_reason == "stop" and state.stop_reason == "three f"
    # The held-back " three" never leaked into an earlier delta.
    assert all("three" not in d.text for d in deltas)


def test_eos_text_is_trimmed_and_length_limit(served_model):
    tok = served_model.tokenizer
    eos = tok.eos_token_ids[0]
    ids = tok.encode(" hi", add_special_tokens=False)
    state = ChoiceState(0, tok, [1], SamplingParams(max_tokens=100))
    d = state.add(ids + [eos, 5, 6], None)  # tokens after EOS are dropped
    assert d.text == " hi" and d.finish_reason == "stop" and d.token_ids == ids + [eos]
    state = ChoiceState(1, tok, [1], SamplingParams(max_tokens=2, logprobs=1))
    d = state.add([100, 200, 300], [TokenLogprobs(100, -1.0, {}), TokenLogprobs(200, -2.0, {}), TokenLogprobs(300, -3.0, {})])
    assert d.finish_reason == "length" and d.token_ids == [100, 200] and len(d.logprobs) == 2


def test_worker_finish_flushes_held_text(served_model):
    tok = served_model.tokenizer
    state = ChoiceState(0, tok, [1], SamplingParams(max_tokens=100, stop=["xyz"]))
    d = state.add(tok.encode(" ab x", add_special_tokens=False), None)
    tail = state.finish("length")
    assert d.text + tail.text == tok.decode(tok.encode(" ab x", add_special_tokens=False))
