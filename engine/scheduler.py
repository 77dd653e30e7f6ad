"""Continuous batching with chunked prefill, preemption by recompute, and latency targets. No I/O, no
tensors.

Each step every scheduled request catches up by some number of tokens (``num_tokens -
num_computed_tokens``, cut to the step's token budget): a whole prompt, a chunk of one, or the single
newest token of a decoding request. Decodes go first (a token each), then the chunks of prompts already
started, then waiting requests are admitted while blocks, sequence slots and budget remain. When a
decoding request needs a block and none is free, the newest running request is preempted: its blocks
return and it will be recomputed from its prompt and output so far.

The profile (engine/profiles.py) and the step-time model (engine/step_time.py) shape each step:
- with a TPOT target, no request joins a batch whose predicted decode step would exceed it
  (``batch_cap``), and a step that carries decode rows gets only the prefill tokens (chunk) that keep
  its predicted time within what its streams can spend and still meet their mean TPOT
  (``decode_step_budget``); without one, batches are as wide as ``max_num_seqs`` and blocks allow;
- with a TTFT target, a prefill-only step is kept to a fraction of it, waiting prompts are taken
  shortest first (``prefill_order="shortest"``) unless that would make one miss its deadline while
  going first would not (those go first, earliest deadline first; without a TTFT target there is no
  such bound, so the order stays first come first served), and a waiting request whose first
  token can no longer come by its ``ttft_deadline`` is refused (``SchedulerOutput.rejected``) with a
  retry-after of the queue's predicted drain time. Requests without a deadline are never refused.

``schedule(now)`` returns a ``SchedulerOutput``; ``update()`` applies the step's sampled tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from collections import deque
from dataclasses import dataclass, field

from kvferry.common.worker import SLORefusal
from kvferry.engine.block_manager import BlockManager
from kvferry.engine.config import SchedulerConfig
from kvferry.engine.request import Request, RequestStatus
from kvferry.engine.step_time import StepShape, StepTimeModel


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens computed this step, starting at request.num_computed_tokens

    @property
    def samples(self) -> bool:
        """True if this step brings the request level with its tokens, so it yields a next token."""
        req = self.request
        return req.num_computed_tokens + self.num_new_tokens == req.num_tokens


@dataclass(frozen=True)
class Rejection:
    request: Request  # already finished (FINISHED_REJECTED) and out of the scheduler
    refusal: SLORefusal


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]  # multi-token chunks first, then single-token steps
    preempted: list[Request]
    rejected: list[Rejection] = field(default_factory=list)
    shape: StepShape = field(default_factory=StepShape)  # what the step carries, for the step-time model

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


def step_shape(scheduled: list[ScheduledRequest]) -> StepShape:
    """The step-time model's view of a batch (before ``update`` moves the computed counts)."""
    decodes = prefill = context = attention = 0
    for s in scheduled:
        start = s.request.num_computed_tokens
        if s.num_new_tokens == 1:
            decodes += 1
            context += start + 1
        else:
            prefill += s.num_new_tokens
            attention += s.num_new_tokens * (start + s.num_new_tokens)
    return StepShape(decodes, prefill, context, attention)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        step_model: StepTimeModel | None = None,
        decodes_here: bool = True,
    ):
        """``decodes_here``: False on a prefill worker, whose requests leave after their first token
        (no decode rows, so TPOT does not bound its steps or its batch)."""
        self.config = config
        self.block_manager = block_manager
        self.step_model = step_model or StepTimeModel()
        self.decodes_here = decodes_here
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        self.num_preemptions = 0  # since creation, for tests and metrics
        self.num_rejected = 0  # refused for their TTFT target, since creation

    @property
    def profile(self):
        return self.config.profile

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- the step ----------------------------------------------------------------------------------
    def schedule(self, now: float | None = None) -> SchedulerOutput:
        now = time.monotonic() if now is None else now
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        for req in list(self.running):  # decode rows first: a token each, oldest first
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING or req.num_tokens - req.num_computed_tokens != 1:
                continue
            while not self.block_manager.append_slots(req, 1):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            if req.status is RequestStatus.RUNNING:
                scheduled.append(ScheduledRequest(req, 1))
                budget -= 1
        num_decodes = len(scheduled)
        context = sum(s.request.num_computed_tokens + 1 for s in scheduled)
        decode_target = self.decode_step_budget([s.request for s in scheduled], now, context)

        started = [r for r in self.running if r.num_tokens - r.num_computed_tokens > 1]
        chunk_start = started[0].num_computed_tokens if started else 0
        chunk = min(budget, self.chunk_budget(num_decodes, context, chunk_start, decode_target))
        order, rejected = self._plan_prompts(now, num_decodes, context, started, decode_target)
        cap = self.batch_cap()
        # Admit nothing in a step that had to preempt: the room just made belongs to running requests.
        admitting = not preempted
        for req in order:
            if chunk == 0:
                break
            if req.status is RequestStatus.RUNNING:  # a prompt already started: blocks cover all of it
                n = min(req.num_tokens - req.num_computed_tokens, chunk)
                if self.block_manager.append_slots(req, n):
                    scheduled.append(ScheduledRequest(req, n))
                    chunk -= n
                continue
            # Waiting requests join in order: once one cannot, none after it may (no overtaking).
            admitting = admitting and len(self.running) < cap and self.block_manager.allocate(req) is not None
            if not admitting:
                continue
            self.waiting.remove(req)
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = req.num_cached_tokens
            self.running.append(req)
            n = min(req.num_tokens - req.num_computed_tokens, chunk)
            scheduled.append(ScheduledRequest(req, n))
            chunk -= n

        scheduled.sort(key=lambda s: s.num_new_tokens == 1)  # stable: chunks first, then decodes
        return SchedulerOutput(scheduled, preempted, rejected, step_shape(scheduled))

    def update(self, output: SchedulerOutput, sampled: dict[str, int], now: float | None = None) -> None:
        """Advance computed counts; append each sampled token to its request's output. ``now``: when
        the tokens were sampled (a request's first one starts its TPOT clock)."""
        now = time.monotonic() if now is None else now
        for item in output.scheduled:
            req = item.request
            req.num_computed_tokens += item.num_new_tokens
            self.block_manager.mark_computed(req)
            token = sampled.get(req.request_id)
            if token is not None:
                req.output_token_ids.append(token)
                if req.first_token_time is None:
                    req.first_token_time = now

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

    # ---- the profile's decisions -----------------------------------------------------------------
    def decode_step_budget(self, decoding: list[Request], now: float, context_tokens: int = 0) -> float | None:
        """How long a step carrying these decode rows may take: the TPOT target is a mean over a
        stream's tokens, so a stream that runs faster than its target banks time a prefill chunk may
        spend. A row that has produced ``k + 1`` tokens, the first at ``t0``, keeps its mean at or
        under the plan (``step_headroom`` x the target) through the next token if the step takes at
        most ``plan x (k + 1) - (now - t0)``. A request of known length (``ignore_eos``, no stop
        strings or ids: ``max_tokens`` tokens exactly) is planned over all of them instead, with the
        steps still to come at this batch's predicted step time with a minimal chunk. The step gets
        the least of the rows' budgets, and never more than ``max_stall_factor`` x the target (one
        stall stays short enough to read as a pause). None without a TPOT target."""
        profile = self.profile
        plan = profile.decode_step_target_s
        if plan is None or not decoding:
            return plan
        # The steps still to come, as this batch with a minimal chunk riding along: new prompts keep
        # arriving, and a plan that counted bare decode steps would spend slack the stream never gets.
        chunk = profile.min_chunk_tokens
        later_step_s = self.step_model.predict(StepShape(len(decoding), chunk, context_tokens, chunk * chunk))
        budgets = []
        for req in decoding:
            if req.first_token_time is None:
                budgets.append(plan)
                continue
            done = req.num_output_tokens  # intervals after the token this step samples
            total = max(req.params.max_tokens - 1, done) if _fixed_length(req) else done
            budgets.append(plan * total - (now - req.first_token_time) - (total - done) * later_step_s)
        return min(max(min(budgets), 0.0), profile.max_stall_factor * profile.tpot_s)

    def chunk_budget(
        self, num_decodes: int, context_tokens: int, chunk_start: int = 0, decode_target: float | None = None
    ) -> int:
        """Prefill tokens a step may carry beside ``num_decodes`` rows attending ``context_tokens``;
        ``decode_target``: the rows' step budget (``decode_step_budget``; default the per-step plan)."""
        profile, model = self.profile, self.step_model
        if decode_target is None:
            decode_target = profile.decode_step_target_s
        hard = max(self.config.max_num_batched_tokens - num_decodes, 0)
        budget = hard
        targets = []
        if profile.prefill_step_target_s is not None:
            targets.append(profile.prefill_step_target_s)  # a short prompt is never held long behind
        if num_decodes and self.decodes_here and decode_target is not None:
            targets.append(decode_target)  # the decode rows' TPOT
        for target in targets:
            def fits(n: int, target=target) -> bool:
                shape = StepShape(num_decodes, n, context_tokens, n * (chunk_start + n))
                return model.predict(shape) <= target
            budget = min(budget, _largest(fits, budget))
        return max(budget, min(profile.min_chunk_tokens, hard))

    def batch_cap(self, new_context: int = 0) -> int:
        """How many sequences the batch may hold: ``max_num_seqs``, or fewer where the TPOT target
        says so (a decode-only step at the running requests' mean context: prefill chunks ride along
        only as far as the streams' banked time allows, ``decode_step_budget``).
        ``new_context``: the context of a request about to join (a decode worker's reservation)."""
        cap = self.config.max_num_seqs
        target = self.profile.decode_step_target_s
        if target is None or not self.decodes_here:
            return cap
        contexts = [r.num_tokens for r in self.running]
        if new_context:
            contexts.append(new_context)
        elif not contexts and self.waiting:
            contexts.append(self.waiting[0].num_tokens)
        mean_context = sum(contexts) / len(contexts) if contexts else 1.0
        model = self.step_model

        def fits(b: int) -> bool:
            return model.predict(StepShape(b, 0, int(b * mean_context), 0)) <= target

        return max(1, _largest(fits, cap))

    def prefill_seconds(self, num_tokens: int, num_decodes: int = 0, context_tokens: int = 0) -> float:
        """Predicted time to compute ``num_tokens`` queued prompt tokens, chunk by chunk, beside
        ``num_decodes`` decode rows: when the last of them would be done if started now."""
        return self._drain_time(num_decodes, context_tokens)(num_tokens)

    def _drain_time(
        self, num_decodes: int, context_tokens: int, decode_target: float | None = None
    ) -> Callable[[int], float]:
        """tokens -> seconds at this step's chunk size (computed once: it is called per waiting request)."""
        chunk = max(self.chunk_budget(num_decodes, context_tokens, 0, decode_target), 1)
        model = self.step_model
        full_step = model.predict(StepShape(num_decodes, chunk, context_tokens, chunk * chunk // 2))

        def seconds(num_tokens: int) -> float:
            if num_tokens <= 0:
                return 0.0
            full, rest = divmod(num_tokens, chunk)
            total = full * full_step
            if rest:
                total += model.predict(StepShape(num_decodes, rest, context_tokens, rest * rest // 2))
            return total

        return seconds

    def _plan_prompts(
        self, now: float, num_decodes: int, context: int, started: list[Request], decode_target: float | None
    ) -> tuple[list[Request], list[Rejection]]:
        """The prompts in the order they get this step's prefill tokens: prompts already started
        (running, part computed) and waiting requests, after refusing those whose TTFT target is lost.
        First come first served: started prompts, then the waiting in order. Shortest first (with a
        TTFT target): by tokens left to compute, started prompts included (a short prompt need not
        wait out a long one's remaining chunks), except that a request that would miss its deadline
        behind the shorter ones but not if it went first goes first (earliest deadline first among
        them), so a long prompt is never starved by a stream of short ones."""
        profile = self.profile
        preempted = [r for r in self.waiting if r.status is RequestStatus.PREEMPTED]  # already streaming
        fresh = [r for r in self.waiting if r.status is not RequestStatus.PREEMPTED]
        if not fresh:
            return preempted + started, []

        if profile.prefill_order == "fcfs" and all(r.ttft_deadline is None for r in fresh):
            return started + preempted + fresh, []  # the untargeted path: nothing to predict
        drain = self._drain_time(num_decodes, context, decode_target)

        def left(req: Request) -> int:
            return req.num_tokens - (req.num_computed_tokens if req.status is RequestStatus.RUNNING else 0)

        def eta(tokens_ahead: int, req: Request) -> float:
            return drain(tokens_ahead + left(req))

        if profile.prefill_order == "shortest" and profile.ttft_s is not None:
            candidates = sorted(started + fresh, key=lambda r: (left(r), r.arrival_index))
            # Requests without a deadline of their own are ordered as if the profile's target applied.
            urgent, rest, ahead = [], [], 0
            for req in candidates:
                deadline = req.ttft_deadline or req.arrival_time + profile.ttft_s
                if now + eta(ahead, req) > deadline >= now + eta(0, req):
                    urgent.append(req)
                else:
                    rest.append(req)
                    ahead += left(req)
            urgent.sort(key=lambda r: (r.ttft_deadline or r.arrival_time + profile.ttft_s, r.arrival_index))
            prompts = preempted + urgent + rest
        else:
            prompts = started + preempted + fresh

        rejected: list[Rejection] = []
        if any(r.ttft_deadline is not None for r in fresh):
            per_token_s = self.step_model.coefficients[2]
            # Refusal asks whether a request can still make its deadline, so beside decode rows it counts the
            # largest chunk those rows may ever let ride along (one stall of max_stall_factor x TPOT), not this
            # step's: a fresh batch has banked nothing yet, and its chunk would refuse long prompts that the
            # next steps' banked time lets through (a colocated worker refused 1,000-token prompts at 2 req/s,
            # predicting 4-8 s for what took ~0.4 s).
            best_drain = drain
            if num_decodes and profile.tpot_s is not None:
                best_drain = self._drain_time(num_decodes, context, profile.max_stall_factor * profile.tpot_s)

            def best_eta(tokens_ahead: int, req: Request) -> float:
                return best_drain(tokens_ahead + left(req))

            def lost(req: Request, ahead: int) -> bool:
                """Refused only if even a queue `reject_margin` times the predicted one would be late. On an
                idle engine only the prompt's own per-token cost counts, not the steps' fixed cost: that is the
                term a warm-up on a busy box over-estimates most (once 2 s a step, which refused every request,
                so no step ever ran to correct it)."""
                if req.ttft_deadline is None or now + profile.reject_margin * best_eta(ahead, req) <= req.ttft_deadline:
                    return False
                if ahead > 0 or num_decodes > 0:
                    return True
                return now + per_token_s * left(req) > req.ttft_deadline

            kept, late, ahead = [], [], 0
            for req in prompts:
                if req.status is RequestStatus.WAITING and lost(req, ahead):
                    late.append((req, ahead))
                    continue
                kept.append(req)
                if req.status is not RequestStatus.PREEMPTED:
                    ahead += left(req)
            if late:
                retry_after = max(drain(ahead), 0.1)
                for req, before in late:
                    waited = now - req.arrival_time
                    message = (
                        f"the time-to-first-token target cannot be met: {waited:.1f} s waited, "
                        f"{max(req.ttft_deadline - now, 0.0):.1f} s left, about "
                        f"{best_eta(before, req):.1f} s to prefill its {req.num_tokens} tokens here "
                        f"behind {before} queued prompt tokens"
                    )
                    self.finish(req.request_id, RequestStatus.FINISHED_REJECTED)
                    self.num_rejected += 1
                    rejected.append(Rejection(req, SLORefusal(message, retry_after)))
            prompts = kept
        return prompts, rejected

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
        req.first_token_time = time.monotonic()  # its TPOT clock starts here (the client has the token)
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


def _fixed_length(req: Request) -> bool:
    """Whether the request produces exactly ``max_tokens`` tokens (nothing can stop it earlier)."""
    p = req.params
    return p.ignore_eos and not p.stop and not p.stop_token_ids


def _largest(fits, upper: int) -> int:
    """The largest n in [0, upper] with fits(n) (fits is monotone: true up to some n); 0 if none."""
    if upper <= 0 or not fits(1):
        return 0
    if fits(upper):
        return upper
    lo, hi = 1, upper  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
