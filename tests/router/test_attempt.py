"""The merge of one choice's two token sources (router/attempt.py): the first token from the prefill
worker's answer and the decode worker's stream, in either order, each index once, up to the finish."""

from kvferry.common.sampling import TokenLogprobs
from kvferry.router.attempt import TokenMerge


def test_tokens_pass_on_in_index_order_whichever_source_comes_first():
    merge = TokenMerge(0)
    merge.add(1, 11, None)  # the decode stream got ahead of the prefill worker's answer
    assert merge.take() == ([], False)
    merge.add(0, 10, None)
    assert merge.take() == ([(10, None), (11, None)], False)
    assert merge.next_index == 2


def test_a_token_seen_twice_is_passed_on_once_the_first_arrival_winning():
    merge = TokenMerge(0)
    lp = TokenLogprobs(10, -0.5, {10: -0.5})
    merge.add(0, 10, lp)
    merge.add(0, 99, None)
    assert merge.take() == ([(10, lp)], False)
    merge.add(0, 10, None)  # after it was passed on: dropped
    assert merge.take() == ([], False)


def test_the_end_waits_for_every_token_before_it():
    merge = TokenMerge(0)
    merge.add(1, 11, None)
    merge.finish(2, "length", None)
    assert merge.take() == ([], False)  # token 0 is still on its way
    merge.add(0, 10, None)
    assert merge.take() == ([(10, None), (11, None)], True)
    assert (merge.finish_reason, merge.finish_error) == ("length", None)


def test_a_resumed_stream_starts_after_the_tokens_it_already_produced():
    merge = TokenMerge(3)
    merge.add(3, 13, None)
    merge.finish(4, "stop", None)
    assert merge.take() == ([(13, None)], True)
