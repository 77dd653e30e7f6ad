"""engine/request.py: a request's progress, finish reasons and the prefill timings it reports."""

from kvferry.common.sampling import SamplingParams
from kvferry.common.timings import PrefillTimings
from kvferry.engine.request import Request, RequestStatus


def make() -> Request:
    return Request("r", [1, 2, 3], SamplingParams(), arrival_time=10.0)


def test_tokens_are_the_prompt_then_the_output():
    r = make()
    r.output_token_ids += [7, 8]
    assert (r.num_prompt_tokens, r.num_output_tokens, r.num_tokens) == (3, 2, 5)
    assert r.all_token_ids == [1, 2, 3, 7, 8]
    assert [r.token_id(i) for i in range(5)] == [1, 2, 3, 7, 8]


def test_finished_states_name_their_reason():
    r = make()
    assert not r.is_finished and r.finish_reason is None
    for status, reason in ((RequestStatus.FINISHED_STOPPED, "stop"), (RequestStatus.FINISHED_LENGTH, "length"),
                           (RequestStatus.FINISHED_ABORTED, "abort"), (RequestStatus.FINISHED_ERROR, "error"),
                           (RequestStatus.FINISHED_REJECTED, "rejected")):
        r.status = status
        assert r.is_finished and r.finish_reason == reason
    for status in (RequestStatus.WAITING_FOR_KV, RequestStatus.SENDING_KV, RequestStatus.PREEMPTED):
        r.status = status
        assert not r.is_finished


def test_prefill_timings_are_durations_and_only_for_a_prompt_computed_here():
    r = make()
    assert r.prefill_timings is None  # KV received from a prefill worker: nothing computed here
    r.first_scheduled_time = 10.5
    assert r.prefill_timings is None
    r.first_token_time = 12.0
    assert r.prefill_timings == PrefillTimings(0.5, 1.5)
