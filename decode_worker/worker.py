"""The decode worker: a paged KV cache, reservations for incoming KV, and the continuous-batching loop.

Request lifecycle:
1. ``reserve``: the router asks for blocks for a prompt. The engine reserves them (WAITING_FOR_KV) or
   the worker refuses with ``NoRoom`` and a reason (no free blocks, batch full, draining): backpressure
   now instead of running out of memory later. The reservation holds a lease (``lease_s``).
2. ``subscribe``: the router opens the token stream; events produced before it are buffered.
3. The prefill worker pushes the KV through the receiver (a transport thread), layer by layer, straight
   into the reserved blocks. Any activity renews the lease.
4. When the trailer arrives the loop calls ``engine.commit_kv`` with the first token: the request joins
   the running batch and its first token (output index 0) goes to the stream.
5. The loop runs ``engine.step()`` while anything runs; each step's tokens go to their streams.
6. Finish (stop, length): the engine frees the blocks; the last event carries the finish reason.
7. Abort (RPC, or the subscriber went away), a failed transfer, or an expired lease (no KV, or no
   subscriber, within ``lease_s``): the receiver stops writing first, then the engine frees the blocks;
   the last event says why. So a dead prefill worker or router cannot strand blocks.
   An abort can overtake its own reservation (the router aborts a Reserve its client cancelled, and
   the two calls race to the loop): an abort of an unknown id is remembered for ``lease_s``, and a
   reservation arriving under it is refused, or it would hold a batch slot, unseen, until its lease ran out.
With ``prefill_locally`` (colocated mode) step 3-4 is an ordinary ``add_request``: this engine prefills.

Threads: every engine call happens on the loop thread (an ``EngineLoop`` running ``_turn``);
``reserve``/``abort`` hand it commands and wait (bounded), the receiver's thread posts commits and
failures to it. The receiver writes only into reserved blocks, which the engine does not touch before
commit.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from kvferry.common.sampling import SamplingParams, TokenLogprobs
from kvferry.common.timings import PrefillTimings
from kvferry.common.worker import NoRoom, WorkerRole, WorkerStats
from kvferry.engine.engine import LLMEngine, RequestOutput
from kvferry.engine.engine_loop import EngineLoop
from kvferry.transport.base import FirstToken, TransferError, TransferState
from kvferry.transport.receiver import KVReceiver
from kvferry.worker_common.stats import engine_stats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeWorkerConfig:
    lease_s: float = 30.0  # a reservation without KV activity (or a stream without subscriber) expires
    command_timeout_s: float = 10.0  # how long an RPC waits for the loop to run its command
    idle_wait_s: float = 0.05  # loop wait when nothing runs (lease checks happen at least this often)

    def __post_init__(self) -> None:
        if self.lease_s <= 0 or self.command_timeout_s <= 0 or self.idle_wait_s <= 0:
            raise ValueError("decode worker timeouts must be positive")


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    index: int  # output position of token_ids[0]; 0 = the first token (sampled by the prefill worker)
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" on the last event
    error: str | None = None
    num_prompt_tokens: int = 0
    prefill_timings: PrefillTimings | None = None  # first token of a prompt prefilled here (local)
    retry_after_s: float | None = None  # finish_reason "rejected" (a local prefill's TTFT target lost)
    num_cached_tokens: int | None = None  # with prefill_timings: prompt tokens the prefix cache served


@dataclass(frozen=True)
class Reservation:
    request_id: str
    block_ids: list[int]
    receiver_instance_id: str
    lease_s: float


@dataclass
class _Tracked:
    """What the worker keeps per request, beside the engine's own state."""

    request_id: str
    num_prompt_tokens: int
    lease_s: float
    waiting_for_kv: bool
    events: queue.Queue = field(default_factory=queue.Queue)  # TokenEvent; bounded by max_tokens
    next_index: int = 0
    subscribed: bool = False
    finished: bool = False
    deadline: float = 0.0  # lease: KV must arrive / a subscriber must come / the events be read by then


@dataclass
class WorkerCounters:
    leases_expired_total: int = 0
    transfers_failed_total: int = 0


class DecodeWorker:
    def __init__(
        self,
        engine: LLMEngine,
        config: DecodeWorkerConfig | None = None,
        worker_id: str = "decode",
        clock: Callable[[], float] = time.monotonic,
    ):
        self.engine = engine
        self.config = config or DecodeWorkerConfig()
        self.worker_id = worker_id
        self.clock = clock
        self.fingerprint = engine.fingerprint
        self.receiver = KVReceiver(
            engine.kv_caches, self.fingerprint, receiver_id=worker_id, on_transfer_end=self._on_transfer_end
        )
        self.max_num_seqs = engine.config.scheduler.max_num_seqs
        self.counters = WorkerCounters()
        self._tracked: dict[str, _Tracked] = {}  # touched by the loop thread only (reads elsewhere)
        self._aborted_unknown: OrderedDict[str, float] = OrderedDict()  # id -> until when (loop thread)
        self._draining = False
        self._loop = EngineLoop(self._turn, self._on_loop_error, f"{worker_id}-loop", self.config.command_timeout_s)

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop.start()

    def drain(self) -> None:
        """Refuse new reservations; running requests continue."""
        self._draining = True

    def drain_wait(self, timeout_s: float) -> bool:
        """Drain, then wait up to ``timeout_s`` for every request to finish; True if all did."""
        self.drain()
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if not any(not t.finished for t in list(self._tracked.values())):
                return True
            time.sleep(0.05)
        return False

    def stop(self, timeout_s: float = 5.0) -> None:
        """Abort everything still here (blocks return, streams end with "abort"), then end the loop."""
        self._draining = True
        self._loop.stop(timeout_s, last=self._abort_all)
        self.receiver.close()

    @property
    def instance_id(self) -> str:
        return self.receiver.instance_id

    # ---- API (any thread) ------------------------------------------------------------------------
    def reserve(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        lease_s: float | None = None,
        prefill_locally: bool = False,
        ttft_deadline: float | None = None,
        resume_output_token_ids: list[int] | tuple[int, ...] = (),
    ) -> Reservation:
        """Raises NoRoom (try elsewhere), ValueError (bad request: the message names the problem).
        ``ttft_deadline`` (``time.monotonic()``, local prefill only): the first token is due by then,
        or the stream ends with finish reason "rejected". ``resume_output_token_ids`` (local prefill
        only): a stream migrated here; its events go on from output index ``len(...)``."""
        if not request_id:
            raise ValueError("request_id is empty")
        if lease_s is not None and lease_s <= 0:
            raise ValueError(f"lease must be positive, got {lease_s}")
        if resume_output_token_ids and not prefill_locally:
            raise ValueError("a resumed stream (resume_output_token_ids) must be prefilled locally")
        lease = lease_s or self.config.lease_s
        prompt, resumed = list(prompt_token_ids), list(resume_output_token_ids)
        return self._loop.call(
            lambda: self._reserve(request_id, prompt, params, lease, prefill_locally, ttft_deadline, resumed)
        )

    def subscribe(self, request_id: str) -> queue.Queue:
        """The request's event queue (TokenEvent, last one with finish_reason). KeyError if unknown."""
        tracked = self._tracked.get(request_id)
        if tracked is None:
            raise KeyError(f"no request {request_id!r} on this decode worker (never reserved, or over)")
        if tracked.subscribed:
            raise ValueError(f"request {request_id!r} already has a subscriber")
        tracked.subscribed = True
        return tracked.events

    def unsubscribed(self, request_id: str) -> None:
        """The subscriber is gone (it read the last event, or it disconnected: then abort)."""
        self._loop.post(lambda: self._finish_subscription(request_id))

    def renew(self, request_id: str) -> bool:
        """Restart the lease of a reservation still waiting for its KV (its prompt is queued or running
        on a prefill worker); False if there is none under that id."""
        return self._loop.call(lambda: self._renew(request_id))

    def abort(self, request_id: str, reason: str = "aborted") -> bool:
        return bool(self._loop.call(lambda: self._abort(request_id, "abort", reason)))

    def stats(self) -> WorkerStats:
        tracked = list(self._tracked.values())
        reserved = sum(1 for t in tracked if t.waiting_for_kv and not t.finished)
        r = self.receiver
        return engine_stats(
            self.engine,
            self._loop,
            WorkerRole.DECODE,
            self.instance_id,
            running_requests=sum(1 for t in tracked if not t.waiting_for_kv and not t.finished),
            waiting_requests=reserved,
            queued_prefill_tokens=self._queued_local_prefill_tokens(tracked),
            kv_bytes_received_total=r.bytes_received_total,
            kv_transfer_seconds_total=r.transfer_seconds_total,
            kv_transfers_total=r.transfers_total,
            kv_transfer_failures_total=self.counters.transfers_failed_total,
            leases_expired_total=self.counters.leases_expired_total,
        )

    def _queued_local_prefill_tokens(self, tracked: list[_Tracked]) -> int:
        """Prompt tokens of local prefills (``prefill_locally``) not computed yet: the router weighs
        them before prefilling more here."""
        total = 0
        for t in tracked:
            request = None if t.waiting_for_kv or t.finished else self.engine.get_request(t.request_id)
            if request is not None and request.num_output_tokens == 0:
                total += max(0, request.num_prompt_tokens - request.num_computed_tokens)
        return total

    # ---- the loop (its thread) -------------------------------------------------------------------
    def _turn(self) -> float:
        """After the queued commands: expire leases, step, stream the tokens. Returns the loop's wait."""
        self._expire_leases()
        outputs = self.engine.step() if self.engine.has_schedulable_requests() else []
        for output in outputs:
            self._publish(output)
        return 0.0 if self.engine.has_schedulable_requests() else self.config.idle_wait_s

    def _on_loop_error(self) -> None:
        # a bug here must not leave streams hanging: end them all, keep serving
        logger.exception("decode loop iteration failed; aborting its requests")
        for request_id in list(self._tracked):
            self._abort(request_id, "error", "internal error in the decode loop")

    # ---- commands (loop thread) ------------------------------------------------------------------
    def _reserve(
        self, request_id: str, prompt: list[int], params: SamplingParams, lease_s: float, local: bool,
        ttft_deadline: float | None = None,
        resumed: list[int] | None = None,
    ) -> Reservation:
        if self._draining:
            raise NoRoom("the decode worker is draining (shutting down)")
        if request_id in self._tracked:
            raise ValueError(f"duplicate request id {request_id!r}")
        if self._aborted_unknown.pop(request_id, None) is not None:
            raise ValueError(f"request {request_id!r} was aborted before its reservation arrived")
        active = sum(1 for t in self._tracked.values() if not t.finished)
        if active >= self.max_num_seqs:
            raise NoRoom(f"batch full: {active} of {self.max_num_seqs} sequences in use")
        # KV from a prefill worker joins the batch the moment it lands, so the profile's TPOT cap is
        # checked here; a prompt prefilled here waits in the engine's queue, whose admission applies
        # the same cap (refusing it here would park it in the router until the next heartbeat).
        cap = self.engine.batch_cap(len(prompt))  # the profile's TPOT target, at the batch's context
        if not local and active >= cap:
            raise NoRoom(f"batch full for the TPOT target: {active} sequences, {cap} fit a step's target")
        if local:
            self.engine.add_request(request_id, prompt, params, ttft_deadline, output_token_ids=resumed or ())
            block_ids: list[int] = []
        else:
            blocks = self.engine.reserve(request_id, prompt, params)
            if blocks is None:
                bm = self.engine.block_manager
                raise NoRoom(
                    f"no room for the KV cache: the prompt needs {bm.blocks_for(len(prompt))} blocks, "
                    f"{bm.num_free_blocks} of {bm.num_blocks} free"
                )
            block_ids = list(blocks)
            self.receiver.expect(request_id, block_ids)
        self._tracked[request_id] = _Tracked(
            request_id, len(prompt), lease_s, waiting_for_kv=not local, deadline=self.clock() + lease_s,
            next_index=len(resumed or ()),
        )
        return Reservation(request_id, block_ids, self.instance_id, lease_s)

    def _renew(self, request_id: str) -> bool:
        tracked = self._tracked.get(request_id)
        if tracked is None or tracked.finished or not tracked.waiting_for_kv:
            return False
        tracked.deadline = self.clock() + tracked.lease_s
        return True

    def _commit(self, request_id: str, first_token: FirstToken) -> None:
        tracked = self._tracked.get(request_id)
        if tracked is None or tracked.finished or not tracked.waiting_for_kv:
            return  # aborted or expired while the trailer was in flight: already freed
        tracked.waiting_for_kv = False
        try:
            output = self.engine.commit_kv(request_id, first_token.token_id, first_token.logprobs)
        except (KeyError, ValueError) as exc:  # ValueError: a first token id out of the vocabulary
            self._abort(request_id, "error", f"commit failed: {exc}")
            return
        self._publish(output)

    def _transfer_failed(self, request_id: str, error: TransferError) -> None:
        self.counters.transfers_failed_total += 1
        self._abort(request_id, "error", f"KV transfer failed: {error}")

    def _abort(self, request_id: str, reason: str, message: str) -> bool:
        tracked = self._tracked.get(request_id)
        self.receiver.cancel(request_id)  # first: no write may touch the blocks once they are freed
        found = self.engine.abort_request(request_id)
        if tracked is None and not found:  # its reservation may still be on the way: refuse it then
            self._aborted_unknown[request_id] = self.clock() + self.config.lease_s
        if tracked is None or tracked.finished:
            return found
        tracked.finished = True
        tracked.events.put(
            TokenEvent(request_id, tracked.next_index, [], None, reason, message, tracked.num_prompt_tokens)
        )
        self._after_finish(tracked)
        return True

    def _abort_all(self) -> None:
        for request_id in list(self._tracked):
            self._abort(request_id, "abort", "the decode worker is shutting down")

    def _finish_subscription(self, request_id: str) -> None:
        tracked = self._tracked.get(request_id)
        if tracked is None:
            return
        if not tracked.finished:
            self._abort(request_id, "abort", "the subscriber went away")
        self._tracked.pop(request_id, None)

    def _after_finish(self, tracked: _Tracked) -> None:
        # Kept until its subscriber has read the last event (it unsubscribes), or for a late subscriber
        # until the lease runs out.
        tracked.deadline = self.clock() + tracked.lease_s

    def _publish(self, output: RequestOutput) -> None:
        tracked = self._tracked.get(output.request_id)
        if tracked is None or tracked.finished:
            return
        tokens = list(output.new_token_ids)
        if tokens or output.finished:
            tracked.events.put(
                TokenEvent(
                    output.request_id,
                    tracked.next_index,
                    tokens,
                    list(output.new_logprobs) if output.new_logprobs is not None else None,
                    output.finish_reason if output.finished else None,
                    output.error,
                    tracked.num_prompt_tokens,
                    output.prefill_timings,
                    output.retry_after_s,
                    output.num_cached_tokens if output.prefill_timings is not None else None,
                )
            )
            tracked.next_index += len(tokens)
        if output.finished:
            tracked.finished = True
            self._after_finish(tracked)

    def _expire_leases(self) -> None:
        now = self.clock()
        while self._aborted_unknown and next(iter(self._aborted_unknown.values())) < now:
            self._aborted_unknown.popitem(last=False)  # oldest first: each entry lives lease_s
        for tracked in list(self._tracked.values()):
            if tracked.finished:
                if now > tracked.deadline and not tracked.subscribed:
                    self._tracked.pop(tracked.request_id, None)  # nobody came for the events
                continue
            if tracked.waiting_for_kv:
                activity = self.receiver.last_activity(tracked.request_id)
                deadline = max(tracked.deadline, (activity or 0.0) + tracked.lease_s)
                if now > deadline:
                    self.counters.leases_expired_total += 1
                    self._abort(tracked.request_id, "error", f"lease expired: no KV within {tracked.lease_s:g}s")
            elif not tracked.subscribed and now > tracked.deadline:
                self.counters.leases_expired_total += 1
                self._abort(tracked.request_id, "abort", f"no subscriber within {tracked.lease_s:g}s")

    # ---- transport thread ----------------------------------------------------------------------
    def _on_transfer_end(
        self, request_id: str, state: TransferState, first_token: FirstToken | None, error: TransferError | None
    ) -> None:
        if state is TransferState.DONE:
            self._loop.post(lambda: self._commit(request_id, first_token))
        else:
            self._loop.post(lambda: self._transfer_failed(request_id, error))
