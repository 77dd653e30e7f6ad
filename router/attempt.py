"""One placement of one choice on its workers: stream, prefill, merge, abort (dispatch.py places it).

1. Open the decode worker's token ``Stream`` (before prefill, so nothing is missed).
2. ``PrefillWorker.Prefill`` with the reservation, retried on another prefill worker (or later) while
   their queues are full (the abort, the loss watch and the channel's count move to the worker that
   takes it); meanwhile the reservation's lease is renewed (``Renew``, every third of it), so a prompt
   queued behind a backlog keeps its blocks. A local prefill skips this. A Prefill that answers tells
   the registry the pair's KV arrives; a transfer that fails for the link's sake counts against the pair.
3. Merge the first token (from the prefill answer) and the decode stream by output index (either may
   come first; duplicates are dropped) into ``WorkerEvent``s in order, up to the finish reason.
4. At the end, however it came: abort on the workers whatever they still hold, let go of the channels,
   hand the blocks back to the registry's estimate.

The stream reader, the prefill and the dispatcher's loss notices put handler calls on one queue;
``events`` runs them on the request's task, so the state below has one writer. A
handler raises ``WorkerLost`` (a worker failed under the request: it may move) or ``APIError`` (a
refusal for the client).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from kvferry.common.sampling import TokenLogprobs
from kvferry.common.worker import SLORefusal
from kvferry.proto import generate_pb2, worker_pb2
from kvferry.proto.convert import logprobs_from_proto, prefill_timings_from_proto, refusal_from_metadata
from kvferry.router.pair_health import transfer_failure_reason
from kvferry.router.registry import Worker
from kvferry.router.request import slo_rejected
from kvferry.router.timings import RequestTimeline

if TYPE_CHECKING:  # the dispatcher builds attempts; only its type is needed here
    from kvferry.router.dispatch import Dispatcher, Placement

logger = logging.getLogger(__name__)

PREFILL_ATTEMPTS = 12  # ~15 s of backoff when every prefill worker's queue is full
DEFAULT_LEASE_S = 30.0  # a reservation's lease when the decode worker does not say (DecodeWorkerConfig)


class WorkerLost(Exception):
    """A worker failed under a request; it may go on elsewhere. ``cause`` ("decode_worker" or
    "prefill_worker") labels the metric; ``failed`` are the workers not to place it on again."""

    def __init__(self, cause: str, failed: list[Worker], message: str) -> None:
        super().__init__(message)
        self.cause = cause
        self.failed = failed


@dataclass
class WorkerEvent:
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # set on the last event: "stop" | "length" | "abort" | "error"
    error: str | None = None
    # Prompt tokens served from the prefilling worker's prefix cache, as known so far: 0 until that
    # worker says (a decode stream can end before the prefill worker's answer comes; then it stays 0).
    num_cached_tokens: int = 0


@dataclass(frozen=True)
class TransferStats:
    kv_bytes: int
    transfer_seconds: float
    prefill_seconds: float


def rpc_error(worker: Worker, exc: grpc.aio.AioRpcError) -> str:
    return f"{worker.role.name.lower()} worker {worker.address}: {exc.code().name}: {exc.details()}"


class TokenMerge:
    """Tokens by output index, as they arrive from two sources, passed on in order from ``next_index``."""

    def __init__(self, next_index: int) -> None:
        self.next_index = next_index
        self._tokens: dict[int, tuple[int, TokenLogprobs | None]] = {}
        self._end_index: int | None = None  # set by the finishing event: all tokens before it, then finish
        self.finish_reason: str | None = None
        self.finish_error: str | None = None

    def add(self, index: int, token_id: int, logprobs: TokenLogprobs | None) -> None:
        self._tokens.setdefault(index, (token_id, logprobs))  # the first to arrive wins

    def finish(self, end_index: int, reason: str, error: str | None) -> None:
        self._end_index, self.finish_reason, self.finish_error = end_index, reason, error

    def take(self) -> tuple[list[tuple[int, TokenLogprobs | None]], bool]:
        """The tokens now in order, and whether that is the end."""
        ready = []
        while self.next_index in self._tokens:
            ready.append(self._tokens.pop(self.next_index))
            self.next_index += 1
        done = self.finish_reason is not None and self._end_index is not None and self.next_index >= self._end_index
        return ready, done


class Attempt:
    def __init__(
        self,
        dispatcher: Dispatcher,
        request_id: str,
        prompt: tuple[int, ...],
        sampling: generate_pb2.SamplingParams,
        placement: Placement,
        timeline: RequestTimeline,
        resumed: tuple[int, ...] = (),
        on_transfer: Callable[[TransferStats], None] | None = None,
    ) -> None:
        self.dispatcher, self.registry = dispatcher, dispatcher.registry
        self.request_id, self.prompt, self.sampling = request_id, prompt, sampling
        self.placement, self.timeline, self.on_transfer = placement, timeline, on_transfer
        self.decode: Worker = placement.decode
        self.prefill: Worker | None = placement.prefill
        self.want_logprobs = sampling.HasField("logprobs")
        self.merge = TokenMerge(len(resumed))
        self.queue: asyncio.Queue[Callable[[], WorkerEvent | None]] = asyncio.Queue()  # see _put
        self.prefill_done = self.prefill is None
        self.prefill_started = False  # _run_prefill took over the accounting of the send counted in start
        self.finished = False  # the decode worker reported the end and every token was passed on
        self.pair_failed = False  # a KV-transfer failure of this attempt's pair was counted (once)
        self.ended = False  # ended early with an error event
        self.num_cached_tokens = 0

    # --- the flow, top to bottom ------------------------------------------------------------------

    async def events(self) -> AsyncIterator[WorkerEvent]:
        """Events from output index ``len(resumed)`` on; raises ``WorkerLost`` when a worker fails
        under the request (the end aborts what the workers still hold either way)."""
        self._start()
        try:
            while not (self.finished or self.ended):
                handle = await self.queue.get()
                event = handle()
                if event is not None:
                    yield event
        finally:
            self._end()

    def _start(self) -> None:
        if self.prefill is not None:
            # Picked again now and counted at once (no await between): the Reserve that came before
            # let other requests pick meanwhile, and a burst must not all land on one prefill worker.
            self.prefill = self.registry.pick_prefill(self.placement.failed, self.decode) or self.prefill
            self.registry.on_prefill_sent(self.prefill, len(self.prompt))
        self.dispatcher.use(self.decode, self.prefill)
        self.stream = self.dispatcher.decode_stub(self.decode).Stream(
            worker_pb2.StreamRequest(request_id=self.request_id), timeout=self.dispatcher.config.stream_timeout_s
        )
        self.watched = [self.decode] + ([self.prefill] if self.prefill is not None else [])
        self.dispatcher.watch(self.watched, self._notify_lost)
        self.tasks = [asyncio.create_task(self._read_stream())]
        if self.prefill is not None:
            self.tasks.append(asyncio.create_task(self._run_prefill()))
            self.tasks.append(asyncio.create_task(self._renew_lease()))

    def _end(self) -> None:
        decode, prefill = self.decode, self.prefill
        self.dispatcher.unwatch(self.watched, self._notify_lost)
        for task in self.tasks:
            task.cancel()
        self.stream.cancel()
        if prefill is not None and not self.prefill_started:  # cancelled before its first step
            self.registry.on_prefill_done(prefill)
        # Abort is idempotent on the workers; skip only what is known to be over.
        targets = ([decode] if not self.finished else []) + ([prefill] if prefill and not self.prefill_done else [])
        if targets:
            self.dispatcher.abort_later(self.request_id, targets, (decode, prefill))
        else:
            self.dispatcher.unuse(decode, prefill)
        self.registry.on_released(decode, self.placement.num_blocks, self.placement.ticket)

    # --- what puts items on the queue -------------------------------------------------------------

    def _put(self, handler: Callable[..., WorkerEvent | None], *args: object) -> None:
        self.queue.put_nowait(functools.partial(handler, *args))

    def _notify_lost(self, worker: Worker, reason: str) -> None:
        """The dispatcher's notice: ``worker`` missed its heartbeats or its engine is wedged."""
        self._put(self._on_lost, worker, f"{worker.role.name.lower()} worker {worker.address} {reason}")

    async def _read_stream(self) -> None:
        decode = self.decode
        try:
            async for event in self.stream:
                self._put(self._on_token_event, event)
                if event.finish_reason:
                    return  # the first token (from prefill) may still be on its way
            self._put(self._on_lost, decode, f"decode worker {decode.address} ended the stream unfinished")
        except grpc.aio.AioRpcError as exc:
            refusal = refusal_from_metadata(exc.trailing_metadata(), exc.details() or "")
            if refusal is not None:  # a local prefill refused for its TTFT target
                self._put(self._on_rejected, "decode_worker", refusal)
            elif exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                self._put(self._on_error, rpc_error(decode, exc))
            else:
                self._put(self._on_lost, decode, rpc_error(decode, exc))

    async def _run_prefill(self) -> None:
        self.prefill_started = True
        worker = self.prefill
        reservation = self.placement.reservation
        request = worker_pb2.PrefillRequest(
            request_id=self.request_id, prompt_token_ids=self.prompt, sampling=self.sampling,
            kv_address=reservation.kv_address or self.decode.target, block_ids=reservation.block_ids,
            receiver_instance_id=reservation.receiver_instance_id,
        )
        # A prefill worker whose queue is full says RESOURCE_EXHAUSTED before doing anything: try
        # another (or the same, later) while the decode reservation's lease holds. Bounded.
        for attempt in range(PREFILL_ATTEMPTS):
            if attempt:
                await asyncio.sleep(min(2.0, 0.05 * 2 ** (attempt - 1)))
                worker = self.registry.pick_prefill(self.placement.failed | {worker.worker_id}, self.decode) or worker
                self._move_prefill(worker)
                self.registry.on_prefill_sent(worker, len(self.prompt))
            request.ttft_budget_ms = self.dispatcher.ttft_budget_ms(self.timeline)
            try:
                response = await self.dispatcher.prefill_stub(worker).Prefill(
                    request, timeout=self.dispatcher.config.prefill_timeout_s)
                self.registry.pairs.record_success(worker.worker_id, self.decode.worker_id)  # its KV arrived
                self._put(self._on_first, response)
                return
            except grpc.aio.AioRpcError as exc:
                if not self._prefill_failed(worker, exc, last=attempt + 1 == PREFILL_ATTEMPTS):
                    return
            finally:
                self.registry.on_prefill_done(worker)

    def _move_prefill(self, worker: Worker) -> None:
        """The prompt goes to ``worker`` now (the last one refused it, holding nothing): the abort at the
        end, the loss watch and the channel's count of users follow it. Set before the Prefill is sent,
        on this task, so an end that comes meanwhile aborts the worker that may hold the prompt."""
        old = self.prefill
        if worker is old or old is None:
            return
        self.dispatcher.unwatch([old], self._notify_lost)
        self.dispatcher.watch([worker], self._notify_lost)
        self.dispatcher.use(worker)
        self.dispatcher.unuse(old)
        self.prefill = worker
        self.watched = [self.decode, worker]

    def _count_pair_failure(self, message: str) -> None:
        """A KV transfer between this attempt's prefill and decode workers failed for a reason of the
        link (pair_health.py): counted once per attempt, whichever side reported it first."""
        reason = transfer_failure_reason(message)
        if reason is None or self.pair_failed or self.prefill is None:
            return
        self.pair_failed = True
        self.dispatcher.pair_failed(self.prefill, self.decode, reason, message)

    def _prefill_failed(self, worker: Worker, exc: grpc.aio.AioRpcError, last: bool) -> bool:
        """Reports a failed Prefill; True when another try may follow (the worker's queue was full)."""
        refusal = refusal_from_metadata(exc.trailing_metadata(), exc.details() or "")
        if refusal is not None:  # its TTFT target is lost: answered 429, not retried elsewhere
            self._put(self._on_rejected, "prefill_worker", refusal)
        elif exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            self._put(self._on_error, rpc_error(worker, exc))
        elif exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or last:
            self._count_pair_failure(exc.details() or "")
            self._put(self._on_lost, worker, rpc_error(worker, exc))
        else:
            return True
        return False

    async def _renew_lease(self) -> None:
        """While the prompt waits or runs on the prefill worker, the reservation must not expire: a
        backlog is no failure. A dead router renews nothing, so the blocks still come back."""
        interval = max(0.1, (self.placement.reservation.lease_ms / 1000.0 or DEFAULT_LEASE_S) / 3)
        stub = self.dispatcher.decode_stub(self.decode)
        while True:
            await asyncio.sleep(interval)
            if self.prefill_done:
                return
            try:
                await stub.Renew(worker_pb2.RenewRequest(request_id=self.request_id), timeout=interval)
            except grpc.aio.AioRpcError as exc:  # the stream reports a dead worker; a late renewal is harmless
                logger.debug("renewing %s on %s: %s", self.request_id, self.decode.address, exc.code().name)

    # --- handlers (the request's task) ------------------------------------------------------------

    def _on_rejected(self, where: str, refusal: SLORefusal) -> None:
        """Nothing was streamed yet: a 429 for the client; the end aborts what the workers hold."""
        self.dispatcher.admission.rejections[where] += 1
        raise slo_rejected(f"the {where.replace('_', ' ')} refused it: {refusal.message}", refusal.retry_after_s)

    def _on_error(self, message: str) -> WorkerEvent:
        self.ended = True  # not `finished`: the end aborts whatever the workers still hold
        return WorkerEvent([], finish_reason="error", error=message)

    def _on_lost(self, worker: Worker, message: str) -> None:
        if worker is self.decode:
            raise WorkerLost("decode_worker", [worker], message)
        # A prefill worker lost after its answer is no loss, nor one that refused the prompt before
        # another took it (its notice may come after the move).
        if worker is self.prefill and not self.prefill_done:
            raise WorkerLost("prefill_worker", [worker], message)

    def _on_first(self, first: worker_pb2.PrefillResponse) -> WorkerEvent | None:
        self.prefill_done = True
        lp = logprobs_from_proto(first.first_logprobs, first.first_token_id) if self.want_logprobs else None
        self.merge.add(0, first.first_token_id, lp)
        self.timeline.prefill = prefill_timings_from_proto(first)
        self.num_cached_tokens = first.num_cached_tokens
        self.timeline.kv_transfer_seconds = first.transfer_seconds
        if self.on_transfer is not None:
            self.on_transfer(TransferStats(first.kv_bytes, first.transfer_seconds, first.prefill_seconds))
        return self._ready()

    def _on_token_event(self, event: worker_pb2.TokenEvent) -> WorkerEvent | None:
        if event.HasField("prefill_queue_seconds"):  # the decode worker prefilled it
            self.timeline.prefill = prefill_timings_from_proto(event)
            self.num_cached_tokens = event.num_cached_tokens
        if event.finish_reason in ("abort", "error"):
            # The router did not ask for it (it would not be reading): the worker failed the request —
            # a KV push that broke (the prefill worker's fault while it has not answered), its engine,
            # or its shutdown.
            culprit = self.decode if self.prefill_done else self.prefill
            if culprit is self.prefill:
                self._count_pair_failure(event.error)
            raise WorkerLost(
                "decode_worker" if culprit is self.decode else "prefill_worker", [culprit],
                f"decode worker {self.decode.address} ended the request: {event.error or event.finish_reason}",
            )
        if event.token_ids:
            self.prefill_done = True  # the KV is committed: the prefill worker did its part
        for j, token_id in enumerate(event.token_ids):
            lp = None
            if self.want_logprobs and j < len(event.logprobs):
                lp = logprobs_from_proto(event.logprobs[j], token_id)
            self.merge.add(event.index + j, token_id, lp)
        if event.finish_reason:
            self.merge.finish(event.index + len(event.token_ids), event.finish_reason, event.error or None)
        return self._ready()

    def _ready(self) -> WorkerEvent | None:
        """What the merge can pass on now, as one event (None: nothing yet)."""
        ready, done = self.merge.take()
        if not ready and not done:
            return None
        self.finished = done
        merge = self.merge
        return WorkerEvent(
            [t for t, _ in ready],
            [lp for _, lp in ready if lp is not None] if self.want_logprobs else None,
            merge.finish_reason if done else None,
            merge.finish_error if done else None,
            self.num_cached_tokens,
        )
