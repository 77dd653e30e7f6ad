"""Driving one request (one choice) through the workers, over gRPC.

Per request:
1. Place it: pick a decode worker by free KV and load (``WorkerRegistry.pick_decode``), decide whether
   it prefills the prompt itself (``placement.decide``: short, mostly cached, or prefill workers busy)
   or which prefill worker does (by queued prefill tokens), then ``DecodeWorker.Reserve`` blocks for
   the prompt. A refusal for
   lack of room (RESOURCE_EXHAUSTED) or an unreachable worker moves on to the next decode worker; when
   none can take it the request waits in the ``AdmissionQueue`` (bounded, with a timeout).
2. Subscribe to the decode worker's token ``Stream`` (before prefill, so nothing is missed).
3. ``PrefillWorker.Prefill`` with the reservation: the prefill worker computes the KV, pushes it to the
   decode worker and answers the first token; meanwhile the router renews the reservation's lease
   (``Renew``, every third of it), so a prompt queued behind a backlog keeps its blocks. A local prefill
   skips this (``prefill_locally``).
4. Merge the first token and the decode stream by output index (either may arrive first; duplicates
   are dropped) and yield ``WorkerEvent``s in order until a finish reason.
5. Leaving early (client gone, stop string found by the router, error) aborts the request on both
   workers; either way the decode worker's in-flight count is released.
6. A worker lost under the request (``WorkerLost``: its stream broke or ended unfinished, its lease
   expired, it reported an error or abort of its own, or the prefill worker failed) moves the request:
   placed again without the lost worker, and once tokens have streamed, resumed on another decode
   worker that prefills the prompt plus the tokens so far itself and goes on from the next output
   index (``resume_output_token_ids``). Token positions key the seeded random stream, so the client
   sees the same tokens an undisturbed run gives, none twice. At most ``max_migrations`` a request;
   then the client gets an error naming the last failure.
With a TTFT target (``ttft_slo_ms``) every Reserve (local prefill) and Prefill carries what is left of it
(``ttft_budget_ms``); a worker that cannot meet it any more refuses (RESOURCE_EXHAUSTED with refusal
metadata), and so does the admission queue once it has passed: the client gets a 429 with Retry-After.
The caller's ``RequestTimeline`` gets the placement, the Reserve's times and the prefilling worker's
durations on the way (timings.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import grpc

from kvferry.engine.sampling import SamplingParams
from kvferry.proto import generate_pb2, kv_transfer_pb2, worker_pb2, worker_pb2_grpc
from kvferry.proto.cluster_security import ClusterSecurity
from kvferry.proto.convert import prefill_timings_from_proto, refusal_from_metadata
from kvferry.router.admission import AdmissionQueue, TTFTExpired
from kvferry.router.placement import DisaggregationPolicy, PrefillDecision, decide
from kvferry.router.registry import Worker, WorkerRegistry, WorkerRole, prompt_block_hashes
from kvferry.router.request import APIError, TokenLogprob, slo_rejected
from kvferry.router.timings import RequestTimeline

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1
PREFILL_ATTEMPTS = 12  # ~15 s of backoff when every prefill worker's queue is full
DEFAULT_LEASE_S = 30.0  # a reservation's lease when the decode worker does not say (DecodeWorkerConfig)


@dataclass(frozen=True)
class DispatchConfig:
    rpc_timeout_s: float = 10.0  # Reserve, Abort, GetStats
    prefill_timeout_s: float = 300.0  # queueing + prefill + KV push
    stream_timeout_s: float = 3600.0  # the whole decode stream
    ttft_slo_ms: float = 0.0  # the profile's TTFT target: what is left of it goes to the workers; 0 = none
    max_migrations: int = 2  # times one request may move after a worker was lost under it


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
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # set on the last event: "stop" | "length" | "abort" | "error"
    error: str | None = None
    # Prompt tokens served from the prefilling worker's prefix cache, as known so far: 0 until that
    # worker says (a decode stream can end before the prefill worker's answer comes; then it stays 0).
    num_cached_tokens: int = 0


@dataclass(frozen=True)
class Placement:
    decode: Worker
    prefill: Worker | None  # None: the decode worker prefills itself
    reservation: worker_pb2.ReserveResponse
    num_blocks: int  # as counted by registry.on_reserved, handed back by on_released
    ticket: int
    decision: PrefillDecision
    failed: frozenset[str] = frozenset()  # ids of workers lost under this request earlier


@dataclass(frozen=True)
class TransferStats:
    kv_bytes: int
    transfer_seconds: float
    prefill_seconds: float


def sampling_to_proto(params: SamplingParams) -> generate_pb2.SamplingParams:
    """Workers get everything but ``stop`` strings and ``n``: those are the router's."""
    msg = generate_pb2.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        n=1,
    )
    if params.seed is not None:
        msg.seed = params.seed & _MASK64
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    return msg


def logprob_from_proto(token_id: int, msg: kv_transfer_pb2.TokenLogprobs) -> TokenLogprob:
    return TokenLogprob(token_id, msg.logprob, tuple(zip(msg.top_token_ids, msg.top_logprobs)))


def _rpc_error(worker: Worker, exc: grpc.aio.AioRpcError) -> str:
    return f"{worker.role.name.lower()} worker {worker.address}: {exc.code().name}: {exc.details()}"


class Dispatcher:
    def __init__(
        self,
        registry: WorkerRegistry,
        admission: AdmissionQueue,
        config: DispatchConfig = DispatchConfig(),
        on_transfer: Callable[[TransferStats], None] | None = None,
        policy: DisaggregationPolicy = DisaggregationPolicy(),
        security: ClusterSecurity = ClusterSecurity(),  # the cluster token and TLS of every worker channel
    ) -> None:
        self.security = security
        self.registry = registry
        self.admission = admission
        self.config = config
        self.on_transfer = on_transfer
        self.policy = policy
        self.prefill_decisions: Counter[tuple[str, str]] = Counter()  # (local|remote, reason) -> requests
        self.migrations: Counter[str] = Counter()  # cause (or "exhausted": none left) -> requests moved
        self._watchers: dict[str, set[Callable[[Worker, str], None]]] = {}  # address -> its requests
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._users: dict[str, int] = {}  # address -> requests in flight on its channel
        self._retired: set[str] = set()  # addresses of workers that left: close once unused
        self._background: set[asyncio.Task] = set()

    # --- channels ---------------------------------------------------------------------------------

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = self.security.aio_channel(address)
            self._retired.discard(address)
        return channel

    async def forget(self, address: str) -> None:
        """A worker left: close its channel, but only once no request uses it. A worker that merely
        missed heartbeats (an overloaded box) keeps streaming what it already has."""
        if self._users.get(address, 0):
            self._retired.add(address)
            return
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close(grace=None)

    def worker_lost(self, worker: Worker, reason: str) -> None:
        """``worker`` missed its heartbeats (dead, stopped) or its engine is wedged: its requests move
        now, not when their streams time out."""
        for on_lost in list(self._watchers.get(worker.address, ())):
            on_lost(worker, reason)

    def _watch(self, workers: list[Worker], on_lost: Callable[[Worker, str], None]) -> None:
        for w in workers:
            self._watchers.setdefault(w.address, set()).add(on_lost)

    def _unwatch(self, workers: list[Worker], on_lost: Callable[[Worker, str], None]) -> None:
        for w in workers:
            watchers = self._watchers.get(w.address)
            if watchers is not None:
                watchers.discard(on_lost)
                if not watchers:
                    del self._watchers[w.address]

    def _use(self, *workers: Worker | None) -> None:
        for w in workers:
            if w is not None:
                self._users[w.address] = self._users.get(w.address, 0) + 1

    def _unuse(self, *workers: Worker | None) -> None:
        for w in workers:
            if w is None:
                continue
            left = self._users.get(w.address, 1) - 1
            if left > 0:
                self._users[w.address] = left
                continue
            self._users.pop(w.address, None)
            if w.address in self._retired:
                self._retired.discard(w.address)
                channel = self._channels.pop(w.address, None)
                if channel is not None:
                    self._spawn(channel.close(grace=None))

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=self.config.rpc_timeout_s)
        for channel in self._channels.values():
            await channel.close(grace=None)
        self._channels.clear()

    def decode_stub(self, worker: Worker) -> worker_pb2_grpc.DecodeWorkerStub:
        return worker_pb2_grpc.DecodeWorkerStub(self.channel(worker.address))

    def prefill_stub(self, worker: Worker) -> worker_pb2_grpc.PrefillWorkerStub:
        return worker_pb2_grpc.PrefillWorkerStub(self.channel(worker.address))

    # --- one request ------------------------------------------------------------------------------

    async def run(
        self,
        request_id: str,
        prompt_token_ids: tuple[int, ...],
        params: SamplingParams,
        timeline: RequestTimeline | None = None,
    ) -> AsyncIterator[WorkerEvent]:
        if params.seed is None:
            # Prefill samples token 0 and decode the rest: one seed makes them one random stream.
            params = params.with_(seed=random.getrandbits(63))
        num_blocks = self.registry.blocks_for(len(prompt_token_ids) + 1)
        largest = self.registry.largest_decode_blocks()
        if largest and num_blocks > largest:
            raise APIError(
                f"the prompt needs {num_blocks} KV blocks; the largest decode worker has {largest}",
                param="prompt", code="context_length_exceeded",
            )
        sampling = sampling_to_proto(params)
        timeline = timeline or RequestTimeline.now()
        hashes = prompt_block_hashes(prompt_token_ids, self.registry.block_size)
        produced: list[int] = []  # tokens passed on so far: a migrated stream resumes after them
        failed: set[str] = set()  # ids of the workers lost under this request
        last_loss = ""
        for migration in range(self.config.max_migrations + 1):
            # Each placement its own id on the workers: a lost worker may still hold the old one.
            attempt_id = request_id if not migration else f"{request_id}~m{migration}"
            resumed = tuple(produced)
            context = self.registry.max_model_len
            if resumed and (len(resumed) >= params.max_tokens or
                            (context and len(prompt_token_ids) + len(resumed) >= context)):
                yield WorkerEvent([], finish_reason="length")  # lost with every token out, before its end
                return
            blocks = self.registry.blocks_for(len(prompt_token_ids) + len(resumed) + 1)
            try:
                placement = await self.admission.admit(
                    lambda: self._try_place(attempt_id, prompt_token_ids, sampling, blocks, hashes, timeline,
                                            resumed, frozenset(failed)),
                    lambda: self._describe(blocks) + (f"; before that, {last_loss}" if last_loss else ""),
                    None if resumed else self._ttft_deadline(timeline),  # the first token is out already
                )
            except TTFTExpired as exc:
                raise slo_rejected(str(exc), exc.retry_after_s) from None
            try:
                async with contextlib.aclosing(
                    self._generate(attempt_id, prompt_token_ids, sampling, placement, timeline, resumed)
                ) as events:
                    async for event in events:
                        produced.extend(event.token_ids)
                        yield event
                return
            except WorkerLost as lost:
                failed.update(w.worker_id for w in lost.failed)
                last_loss = str(lost)
                if migration == self.config.max_migrations:
                    self.migrations["exhausted"] += 1
                    logger.warning("request %s: %s; no migrations left (%d made)", request_id, lost, migration)
                    yield WorkerEvent([], finish_reason="error", error=f"{lost} (after {migration} migrations)")
                    return
                self.migrations[lost.cause] += 1
                logger.warning("request %s: %s; moving it after %d tokens", request_id, lost, len(produced))

    def _ttft_deadline(self, timeline: RequestTimeline) -> float | None:
        return timeline.start + self.config.ttft_slo_ms / 1000.0 if self.config.ttft_slo_ms else None

    def _ttft_budget_ms(self, timeline: RequestTimeline) -> int:
        """What is left of the TTFT target now (arrival to now subtracted); 0: no target. At least 1 ms
        once it is spent: the worker then refuses at once, with its own retry-after."""
        deadline = self._ttft_deadline(timeline)
        if deadline is None:
            return 0
        return max(1, int((deadline - time.monotonic()) * 1000))

    def _describe(self, num_blocks: int) -> str:
        decode = self.registry.live(WorkerRole.DECODE, WorkerRole.COLOCATED)
        prefill = self.registry.live(WorkerRole.PREFILL)
        if not decode:
            return "no decode worker is registered"
        free = ", ".join(f"{w.address}: {w.free_blocks_estimate} free" for w in decode)
        text = f"the request needs {num_blocks} KV blocks ({free})"
        if not prefill and any(w.role is WorkerRole.DECODE for w in decode):
            text += "; no prefill worker is registered"
        return text

    def _decide(
        self, decode: Worker, num_prompt_tokens: int, hashes: list[int], failed: frozenset[str] = frozenset()
    ) -> PrefillDecision:
        cached = decode.recent_blocks.num_cached_blocks(hashes) * self.registry.block_size
        if decode.role is WorkerRole.COLOCATED:
            return PrefillDecision(True, "colocated", cached)
        # Prefill workers lost under this request do not count: with none left it is prefilled locally.
        prefill = [w for w in self.registry.live(WorkerRole.PREFILL) if w.worker_id not in failed]
        return decide(self.policy, decode, prefill, num_prompt_tokens, cached)

    async def _try_place(
        self,
        request_id: str,
        prompt: tuple[int, ...],
        sampling: generate_pb2.SamplingParams,
        num_blocks: int,
        hashes: list[int],
        timeline: RequestTimeline,
        resumed: tuple[int, ...] = (),
        failed: frozenset[str] = frozenset(),
    ) -> Placement | None:
        """``resumed``: tokens a lost decode worker streamed; the new one prefills them with the prompt.
        ``failed``: workers lost under this request, not tried again."""
        exclude: set[str] = set(failed)
        for _ in range(len(self.registry.workers) + 1):  # each pass excludes one more worker
            decode = self.registry.pick_decode(num_blocks, frozenset(exclude))
            if decode is None:
                return None
            if resumed:
                decision = PrefillDecision(True, "migrated")
            else:
                decision = self._decide(decode, len(prompt), hashes, failed)
            prefill = None if decision.local else self.registry.pick_prefill(failed)
            if prefill is None and not decision.local:
                if not failed:
                    return None  # wait for a prefill worker to join
                # Moved once already: prefilled by its decode worker rather than kept waiting, whatever
                # the policy says.
                decision = PrefillDecision(True, "prefill_worker_lost", decision.num_cached_tokens)
            request = worker_pb2.ReserveRequest(
                request_id=request_id, prompt_token_ids=prompt, sampling=sampling, prefill_locally=decision.local,
                ttft_budget_ms=self._ttft_budget_ms(timeline) if decision.local and not resumed else 0,
                resume_output_token_ids=resumed,
            )
            # Counted before the Reserve call, not after: requests placed while it is in flight must
            # see this one, or a burst would all pick the same worker. Undone if the worker says no.
            ticket = self.registry.on_reserved(decode, num_blocks)
            timeline.reserve_start = time.monotonic()
            try:
                reservation = await self.decode_stub(decode).Reserve(request, timeout=self.config.rpc_timeout_s)
            except asyncio.CancelledError:  # the client left mid-Reserve: it may have reserved anyway
                self._use(decode)
                self._spawn(self._abort(request_id, [decode], (decode, None)))
                self.registry.on_released(decode, num_blocks, ticket)
                raise
            except grpc.aio.AioRpcError as exc:
                self.registry.on_released(decode, num_blocks, ticket)
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise APIError(exc.details() or "invalid request", code="invalid_value") from None
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    logger.warning("reserve failed: %s", _rpc_error(decode, exc))
                self.registry.on_refused(decode)
                exclude.add(decode.worker_id)
                continue
            timeline.reserve_end = time.monotonic()
            timeline.placement = f"{decision.label} ({decision.reason})"
            self.prefill_decisions[decision.label, decision.reason] += 1
            # Prefilled here or pushed here, the prompt's KV lands in this worker's prefix cache.
            decode.recent_blocks.record(hashes, decode.capacity.total_kv_blocks)
            if decision.local and decode.role is WorkerRole.DECODE:
                self.registry.on_local_prefill(decode, len(prompt) + len(resumed) - decision.num_cached_tokens)
            return Placement(decode, prefill, reservation, num_blocks, ticket, decision, failed)
        return None

    async def _generate(
        self,
        request_id: str,
        prompt: tuple[int, ...],
        sampling: generate_pb2.SamplingParams,
        placement: Placement,
        timeline: RequestTimeline,
        resumed: tuple[int, ...] = (),
    ) -> AsyncIterator[WorkerEvent]:
        """Events from output index ``len(resumed)`` on; raises ``WorkerLost`` when a worker fails
        under the request (the finally aborts what the workers still hold either way)."""
        decode, prefill = placement.decode, placement.prefill
        if prefill is not None:
            # Picked again now and counted at once (no await between): the Reserve that came before
            # let other requests pick meanwhile, and a burst must not all land on one prefill worker.
            prefill = self.registry.pick_prefill(placement.failed) or prefill
            self.registry.on_prefill_sent(prefill, len(prompt))
        self._use(decode, prefill)
        want_logprobs = sampling.HasField("logprobs")
        queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        stream = self.decode_stub(decode).Stream(
            worker_pb2.StreamRequest(request_id=request_id), timeout=self.config.stream_timeout_s
        )

        def on_lost(worker: Worker, reason: str) -> None:
            queue.put_nowait(("lost", (worker, f"{worker.role.name.lower()} worker {worker.address} {reason}")))

        watched = [decode] + ([prefill] if prefill is not None else [])
        self._watch(watched, on_lost)

        async def read_stream() -> None:
            try:
                async for event in stream:
                    queue.put_nowait(("event", event))
                    if event.finish_reason:
                        return  # the first token (from prefill) may still be on its way
                queue.put_nowait(("lost", (decode, f"decode worker {decode.address} ended the stream unfinished")))
            except grpc.aio.AioRpcError as exc:
                refusal = refusal_from_metadata(exc.trailing_metadata(), exc.details() or "")
                if refusal is not None:  # a local prefill refused for its TTFT target
                    queue.put_nowait(("rejected", ("decode_worker", refusal)))
                elif exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    queue.put_nowait(("error", _rpc_error(decode, exc)))
                else:
                    queue.put_nowait(("lost", (decode, _rpc_error(decode, exc))))

        prefill_started = False  # run_prefill took over the accounting of the send counted above

        async def run_prefill(worker: Worker) -> None:
            nonlocal prefill_started
            prefill_started = True
            request = worker_pb2.PrefillRequest(
                request_id=request_id,
                prompt_token_ids=prompt,
                sampling=sampling,
                kv_address=placement.reservation.kv_address or decode.target,
                block_ids=placement.reservation.block_ids,
                receiver_instance_id=placement.reservation.receiver_instance_id,
            )
            # A prefill worker whose queue is full says RESOURCE_EXHAUSTED before doing anything: try
            # another (or the same, later) while the decode reservation's lease holds. Bounded.
            for attempt in range(PREFILL_ATTEMPTS):
                if attempt:
                    await asyncio.sleep(min(2.0, 0.05 * 2 ** (attempt - 1)))
                    worker = self.registry.pick_prefill(placement.failed | {worker.worker_id}) or worker
                    self.registry.on_prefill_sent(worker, len(prompt))
                request.ttft_budget_ms = self._ttft_budget_ms(timeline)
                try:
                    response = await self.prefill_stub(worker).Prefill(request, timeout=self.config.prefill_timeout_s)
                    queue.put_nowait(("first", response))
                    return
                except grpc.aio.AioRpcError as exc:
                    refusal = refusal_from_metadata(exc.trailing_metadata(), exc.details() or "")
                    if refusal is not None:  # its TTFT target is lost: answered 429, not retried elsewhere
                        queue.put_nowait(("rejected", ("prefill_worker", refusal)))
                        return
                    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                        queue.put_nowait(("error", _rpc_error(worker, exc)))
                        return
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt + 1 == PREFILL_ATTEMPTS:
                        queue.put_nowait(("lost", (worker, _rpc_error(worker, exc))))
                        return
                finally:
                    self.registry.on_prefill_done(worker)

        async def renew_lease() -> None:
            """While the prompt waits or runs on the prefill worker, the reservation must not expire: a
            backlog is no failure. A dead router renews nothing, so the blocks still come back."""
            interval = max(0.1, (placement.reservation.lease_ms / 1000.0 or DEFAULT_LEASE_S) / 3)
            stub = self.decode_stub(decode)
            while True:
                await asyncio.sleep(interval)
                if prefill_done:
                    return
                try:
                    await stub.Renew(worker_pb2.RenewRequest(request_id=request_id), timeout=interval)
                except grpc.aio.AioRpcError as exc:  # the stream reports a dead worker; a late renewal is harmless
                    logger.debug("renewing %s on %s: %s", request_id, decode.address, exc.code().name)

        tasks = [asyncio.create_task(read_stream())]
        if prefill is not None:
            tasks.append(asyncio.create_task(run_prefill(prefill)))
            tasks.append(asyncio.create_task(renew_lease()))
        prefill_done = prefill is None
        finished = False  # the decode worker reported the end and every token was passed on
        tokens: dict[int, tuple[int, TokenLogprob | None]] = {}  # output index -> token, by arrival
        next_index = len(resumed)
        end_index: int | None = None  # set by the finishing event: all tokens before it, then finish
        finish_reason: str | None = None
        finish_error: str | None = None
        num_cached_tokens = 0
        try:
            while not finished:
                kind, item = await queue.get()
                if kind == "rejected":  # nothing was streamed yet: a 429 for the client; the finally aborts
                    where, refusal = item  # type: ignore[misc]
                    self.admission.rejections[where] += 1
                    raise slo_rejected(f"the {where.replace('_', ' ')} refused it: {refusal.message}",
                                       refusal.retry_after_s)
                if kind == "error":  # not `finished`: the finally aborts whatever the workers still hold
                    yield WorkerEvent([], finish_reason="error", error=str(item))
                    return
                if kind == "lost":
                    worker, message = item  # type: ignore[misc]
                    if worker is decode or not prefill_done:  # a prefill worker lost after its answer is no loss
                        cause = "decode_worker" if worker is decode else "prefill_worker"
                        raise WorkerLost(cause, [worker], message)
                    continue
                if kind == "first":
                    prefill_done = True
                    first: worker_pb2.PrefillResponse = item  # type: ignore[assignment]
                    lp = logprob_from_proto(first.first_token_id, first.first_logprobs) if want_logprobs else None
                    tokens.setdefault(0, (first.first_token_id, lp))
                    timeline.prefill = prefill_timings_from_proto(first)
                    num_cached_tokens = first.num_cached_tokens
                    timeline.kv_transfer_seconds = first.transfer_seconds
                    if self.on_transfer is not None:
                        self.on_transfer(TransferStats(first.kv_bytes, first.transfer_seconds, first.prefill_seconds))
                else:
                    event: worker_pb2.TokenEvent = item  # type: ignore[assignment]
                    if event.HasField("prefill_queue_seconds"):  # the decode worker prefilled it
                        timeline.prefill = prefill_timings_from_proto(event)
                        num_cached_tokens = event.num_cached_tokens
                    if event.finish_reason in ("abort", "error"):
                        # The router did not ask for it (it would not be reading): the worker failed
                        # the request — a KV push that broke (the prefill worker's fault while it has
                        # not answered), its engine, or its shutdown.
                        culprit = decode if prefill_done else prefill
                        raise WorkerLost(
                            "decode_worker" if culprit is decode else "prefill_worker", [culprit],
                            f"decode worker {decode.address} ended the request: {event.error or event.finish_reason}",
                        )
                    if event.token_ids:
                        prefill_done = True  # the KV is committed: the prefill worker did its part
                    for j, token_id in enumerate(event.token_ids):
                        lp = None
                        if want_logprobs and j < len(event.logprobs):
                            lp = logprob_from_proto(token_id, event.logprobs[j])
                        tokens.setdefault(event.index + j, (token_id, lp))
                    if event.finish_reason:
                        finish_reason, finish_error = event.finish_reason, event.error or None
                        end_index = event.index + len(event.token_ids)
                ready: list[tuple[int, TokenLogprob | None]] = []
                while next_index in tokens:
                    ready.append(tokens.pop(next_index))
                    next_index += 1
                done = finish_reason is not None and end_index is not None and next_index >= end_index
                if ready or done:
                    finished = done
                    yield WorkerEvent(
                        [t for t, _ in ready],
                        [lp for _, lp in ready if lp is not None] if want_logprobs else None,
                        finish_reason if done else None,
                        finish_error if done else None,
                        num_cached_tokens,
                    )
        finally:
            self._unwatch(watched, on_lost)
            for task in tasks:
                task.cancel()
            stream.cancel()
            if prefill is not None and not prefill_started:  # cancelled before its first step
                self.registry.on_prefill_done(prefill)
            # Abort is idempotent on the workers; skip only what is known to be over.
            targets = ([decode] if not finished else []) + ([prefill] if prefill and not prefill_done else [])
            if targets:
                self._spawn(self._abort(request_id, targets, (decode, prefill)))
            else:
                self._unuse(decode, prefill)
            self.registry.on_released(decode, placement.num_blocks, placement.ticket)

    async def _abort(self, request_id: str, targets: list[Worker], used: tuple[Worker, Worker | None]) -> None:
        """Abort on ``targets``, in a task of its own (the request's task is being cancelled), then let
        go of the channels the request ``used``."""
        try:
            for worker in targets:
                stub = self.decode_stub(worker) if worker.role is not WorkerRole.PREFILL else self.prefill_stub(worker)
                try:
                    await stub.Abort(worker_pb2.AbortRequest(request_id=request_id), timeout=self.config.rpc_timeout_s)
                except grpc.aio.AioRpcError as exc:
                    logger.warning("abort of %s on %s failed: %s", request_id, worker.address, exc.details())
        finally:
            self._unuse(*used)
