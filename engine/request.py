"""A request inside an engine: its tokens, its blocks and its state.

Progress is two numbers: ``num_tokens`` (prompt + output so far) and ``num_computed_tokens`` (how many
of those have K/V in the cache). Chunked prefill, prefix-cache hits, recompute after preemption and KV
received from a prefill worker all move ``num_computed_tokens``; the scheduler only ever asks each
request to catch up (``num_tokens - num_computed_tokens`` more tokens to compute).

Timestamps (``time.monotonic()`` of this process: arrival, first scheduled, first token) become
durations here (``prefill_timings``) before they leave the process; clocks of two processes are never
compared.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from kvferry.common.sampling import SamplingParams
from kvferry.common.timings import PrefillTimings


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued; needs compute (prefill, or recompute after preemption)
    RUNNING = "running"  # scheduled every step: prefill chunks, then decode
    WAITING_FOR_KV = "waiting_for_kv"  # decode role: blocks reserved, KV arriving from a prefill worker
    SENDING_KV = "sending_kv"  # prefill role: first token out, blocks held until the KV is acknowledged
    PREEMPTED = "preempted"  # blocks taken back; recomputed from scratch when room returns
    FINISHED_STOPPED = "finished_stopped"  # EOS, stop token or stop string
    FINISHED_LENGTH = "finished_length"  # max_tokens or the context limit
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_ERROR = "finished_error"
    FINISHED_REJECTED = "finished_rejected"  # refused while queued: its TTFT target could not be met

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
    RequestStatus.FINISHED_ERROR,
    RequestStatus.FINISHED_REJECTED,
}

FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
    RequestStatus.FINISHED_REJECTED: "rejected",
}


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_index: int = 0  # FIFO order; preempted requests keep theirs and go back to the front
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at the last allocation
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading blocks of block_table already registered in the prefix cache
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None  # the first step that computed any of its tokens
    first_token_time: float | None = None  # when this engine sampled its first output token
    ttft_deadline: float | None = None  # first token due by then (this process's clock); None: no target
    # Output tokens it arrived with (a stream resumed here after its first decode worker was lost): the
    # prompt and these are prefilled together, and the stream goes on from the next output position.
    num_resumed_tokens: int = 0

    @property
    def prefill_timings(self) -> PrefillTimings | None:
        """None unless this engine computed the prompt up to its first token (not for KV received)."""
        if self.first_scheduled_time is None or self.first_token_time is None:
            return None
        return PrefillTimings(
            self.first_scheduled_time - self.arrival_time, self.first_token_time - self.first_scheduled_time
        )

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)

    def token_id(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]
