"""Continuous batching with chunked prefill and preemption by recompute. No I/O, no tensors.

Each step every scheduled request catches up by some number of tokens (``num_tokens -
num_computed_tokens``, cut to the step's token budget): a whole prompt, a chunk of one, or the single
newest token of a decoding request. Running requests go first, oldest first, so decodes are never
starved by new prompts; waiting requests are admitted while blocks, sequence slots and budget remain.
When a running request needs a block and none is free, the newest running request is preempted: its
blocks return and it will be recomputed from its prompt and output so far.

``schedule()`` returns a ``SchedulerOutput``; ``update()`` applies the step's sampled tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kvferry.engine.block_manager import BlockManager
from kvferry.engine.config import SchedulerConfig
from kvferry.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens computed this step, starting at request.num_computed_tokens

    @property
    def samples(self) -> bool:
        """True if this step brings the request level with its tokens, so it yields a next token."""
        req = self.request
        return req.num_computed_tokens + self.num_new_tokens == req.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]  # multi-token chunks first, then single-token steps
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        self.num_preemptions = 0  # since creation, for tests and metrics

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.block_manager.append_slots(req, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            if req.status is RequestStatus.RUNNING:
                scheduled.append(ScheduledRequest(req, n))
                budget -= n

        # Admit nothing in a step that had to preempt: the room just made belongs to running requests.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if self.block_manager.allocate(req) is None:
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = req.num_cached_tokens
            self.running.append(req)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            scheduled.append(ScheduledRequest(req, n))
            budget -= n

        scheduled.sort(key=lambda s: s.num_new_tokens == 1)  # stable: chunks first, then decodes
        return SchedulerOutput(scheduled, preempted)

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> None:
        """Advance computed counts; append each sampled token to its request's output."""
        for item in output.scheduled:
            req = item.request
            req.num_computed_tokens += item.num_new_tokens
            self.block_manager.mark_computed(req)
            token = sampled.get(req.request_id)
            if token is not None:
                req.output_token_ids.append(token)

    def finish(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request in any state and return its blocks; None if it is not (or no longer) here."""
        assert status.finished
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.block_manager.free(req)
        req.status = status
        return req

    # ---- disaggregation: requests whose KV is computed elsewhere ---------------------------------
    def reserve(self, request: Request) -> list[int] | None:
        """Decode role: hold blocks for a prompt whose KV a prefill worker will send; None if no room."""
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        # No prefix-cache sharing: the sender writes every block, and shared blocks must never be written.
        if self.block_manager.allocate(request, use_prefix_cache=False) is None:
            return None
        request.status = RequestStatus.WAITING_FOR_KV
        self.requests[request.request_id] = request
        return request.block_table

    def commit_kv(self, request_id: str, first_token_id: int) -> Request:
        """Decode role: the reserved blocks now hold the prompt's KV; the request starts decoding."""
        req = self.requests.get(request_id)
        if req is None or req.status is not RequestStatus.WAITING_FOR_KV:
            raise KeyError(f"no reservation waiting for KV under id {request_id!r}")
        req.num_computed_tokens = req.num_prompt_tokens
        req.output_token_ids.append(first_token_id)
        self.block_manager.mark_computed(req)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        return req

    def hold_for_sending(self, request: Request) -> None:
        """Prefill role: the request is done computing; keep its blocks until the KV is acknowledged."""
        self.running.remove(request)
        request.status = RequestStatus.SENDING_KV

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.block_manager.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
