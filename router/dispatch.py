"""Driving one request (one choice) through the workers, over gRPC.

Per request:
1. Place it: pick a decode worker by free KV and load (``WorkerRegistry.pick_decode``), decide whether
   it prefills the prompt itself (``placement.decide``: short, mostly cached, or prefill workers busy)
   or which prefill worker does (by queued prefill tokens), then ``DecodeWorker.Reserve`` blocks for
   the prompt. A refusal for
   lack of room (RESOURCE_EXHAUSTED) or an unreachable worker moves on to the next decode worker; when
   none can take it the request waits in the ``AdmissionQueue`` (bounded, with a timeout).
2. Run it there (``attempt.py``): subscribe to the decode worker's token ``Stream``, send
   ``PrefillWorker.Prefill`` with the reservation (renewing its lease meanwhile) unless the decode worker
   prefills it itself (``prefill_locally``), and merge the first token with the stream into
   ``WorkerEvent``s. Leaving early (client gone, stop string found by the router, error) aborts the
   request on both workers; either way the decode worker's in-flight count is released.
3. A worker lost under the request (``WorkerLost``: its stream broke or ended unfinished, its lease
   expired, it reported an error or abort of its own, or the prefill worker failed) moves the request:
   placed again without the lost worker, and once tokens have streamed, resumed on another decode
   worker that prefills the prompt plus the tokens so far itself and goes on from the next output
   index (``resume_output_token_ids``). Token positions key the seeded random stream, so the client
   sees the same tokens an undisturbed run gives, none twice. At most ``max_migrations`` a request;
   then the client gets an error naming the last failure. A failed KV transfer also counts against its
   (prefill, decode) pair; a pair that keeps failing is left out of placement for a cool-down
   (pair_health.py), and a decode worker no prefill worker reaches then prefills locally if the policy
   allows, or is passed over.
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

from kvferry.common.sampling import SamplingParams
from kvferry.common.worker import WorkerRole
from kvferry.proto import generate_pb2, worker_pb2, worker_pb2_grpc
from kvferry.proto.cluster_security import ClusterSecurity
from kvferry.proto.convert import sampling_to_proto
from kvferry.router.admission import AdmissionQueue, TTFTExpired
from kvferry.router.attempt import Attempt, TransferStats, WorkerEvent, WorkerLost, rpc_error
from kvferry.router.placement import DisaggregationPolicy, PrefillDecision, decide
from kvferry.router.registry import Worker, WorkerRegistry, prompt_block_hashes
from kvferry.router.request import APIError, slo_rejected
from kvferry.router.timings import RequestTimeline

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DispatchConfig:
    rpc_timeout_s: float = 10.0  # Reserve, Abort, GetStats
    prefill_timeout_s: float = 300.0  # queueing + prefill + KV push
    stream_timeout_s: float = 3600.0  # the whole decode stream
    ttft_slo_ms: float = 0.0  # the profile's TTFT target: what is left of it goes to the workers; 0 = none
    max_migrations: int = 2  # times one request may move after a worker was lost under it


@dataclass(frozen=True)
class Placement:
    decode: Worker
    prefill: Worker | None  # None: the decode worker prefills itself
    reservation: worker_pb2.ReserveResponse
    num_blocks: int  # as counted by registry.on_reserved, handed back by on_released
    ticket: int
    decision: PrefillDecision
    failed: frozenset[str] = frozenset()  # ids of workers lost under this request earlier


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

    def pair_failed(self, prefill: Worker, decode: Worker, reason: str, message: str) -> None:
        """A KV transfer from ``prefill`` to ``decode`` failed (``reason``: the transport's code); after
        enough in a row the pair gets no requests for a while (pair_health.py)."""
        pairs = self.registry.pairs
        if pairs.record_failure(prefill.worker_id, prefill.name, decode.worker_id, decode.name, reason):
            logger.warning("KV of prefill worker %s cannot reach decode worker %s (%s; %s): no requests on this "
                           "pair for %.0f s", prefill.name, decode.name, reason, message,
                           pairs.cooldown_s(prefill.worker_id, decode.worker_id))

    def watch(self, workers: list[Worker], on_lost: Callable[[Worker, str], None]) -> None:
        for w in workers:
            self._watchers.setdefault(w.address, set()).add(on_lost)

    def unwatch(self, workers: list[Worker], on_lost: Callable[[Worker, str], None]) -> None:
        for w in workers:
            watchers = self._watchers.get(w.address)
            if watchers is not None:
                watchers.discard(on_lost)
                if not watchers:
                    del self._watchers[w.address]

    def use(self, *workers: Worker | None) -> None:
        for w in workers:
            if w is not None:
                self._users[w.address] = self._users.get(w.address, 0) + 1

    def unuse(self, *workers: Worker | None) -> None:
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
                attempt = Attempt(self, attempt_id, prompt_token_ids, sampling, placement, timeline, resumed,
                                  self.on_transfer)
                async with contextlib.aclosing(attempt.events()) as events:
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

    def ttft_budget_ms(self, timeline: RequestTimeline) -> int:
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
        # Both limits a decode worker refuses on: KV blocks, and sequences (its batch cap) as last reported.
        free = ", ".join(f"{w.address}: {w.free_blocks_estimate} free, "
                         f"{w.capacity.running_requests + w.capacity.waiting_requests} of {w.max_running} sequences"
                         for w in decode)
        text = f"the request needs {num_blocks} KV blocks ({free})"
        if not prefill and any(w.role is WorkerRole.DECODE for w in decode):
            text += "; no prefill worker is registered"
        excluded = self.registry.pairs.excluded_pairs()
        if excluded:
            text += "; KV cannot reach: " + ", ".join(f"{p.prefill} -> {p.decode} ({p.reason})" for p in excluded)
        return text

    def _decide(
        self, decode: Worker, num_prompt_tokens: int, hashes: list[int], failed: frozenset[str] = frozenset()
    ) -> PrefillDecision:
        cached = decode.recent_blocks.num_cached_blocks(hashes) * self.registry.block_size
        if decode.role is WorkerRole.COLOCATED:
            return PrefillDecision(True, "colocated", cached)
        # Prefill workers lost under this request do not count, nor those whose KV cannot reach this
        # decode worker (pair_health.py): with none left it is prefilled locally, if the policy allows.
        prefill = self.registry.reachable_prefill(decode, failed)
        decision = decide(self.policy, decode, prefill, num_prompt_tokens, cached)
        if decision.reason == "no_prefill_worker" and self._cut_off(decode, failed):
            decision = PrefillDecision(True, "prefill_unreachable", cached)
        return decision

    def _cut_off(self, decode: Worker, failed: frozenset[str]) -> bool:
        """Prefill workers there are, but none whose KV reaches ``decode`` now."""
        return bool(self.registry.reachable_prefill(None, failed)) and not self.registry.reachable_prefill(decode, failed)

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
            prefill = None if decision.local else self.registry.pick_prefill(failed, decode)
            if prefill is None and not decision.local:
                if self._cut_off(decode, failed):  # and the policy wants a prefill worker: go elsewhere
                    exclude.add(decode.worker_id)
                    continue
                if not failed:
                    return None  # wait for a prefill worker to join
                # Moved once already: prefilled by its decode worker rather than kept waiting, whatever
                # the policy says.
                decision = PrefillDecision(True, "prefill_worker_lost", decision.num_cached_tokens)
            request = worker_pb2.ReserveRequest(
                request_id=request_id, prompt_token_ids=prompt, sampling=sampling, prefill_locally=decision.local,
                ttft_budget_ms=self.ttft_budget_ms(timeline) if decision.local and not resumed else 0,
                resume_output_token_ids=resumed,
            )
            reserved = await self._reserve(decode, request, num_blocks, timeline)
            if reserved is None:
                exclude.add(decode.worker_id)
                continue
            reservation, ticket = reserved
            timeline.placement = f"{decision.label} ({decision.reason})"
            self.prefill_decisions[decision.label, decision.reason] += 1
            # Prefilled here or pushed here, the prompt's KV lands in this worker's prefix cache.
            decode.recent_blocks.record(hashes, decode.capacity.total_kv_blocks)
            if decision.local and decode.role is WorkerRole.DECODE:
                self.registry.on_local_prefill(decode, len(prompt) + len(resumed) - decision.num_cached_tokens)
            return Placement(decode, prefill, reservation, num_blocks, ticket, decision, failed)
        return None

    async def _reserve(
        self, decode: Worker, request: worker_pb2.ReserveRequest, num_blocks: int, timeline: RequestTimeline
    ) -> tuple[worker_pb2.ReserveResponse, int] | None:
        """(reservation, ticket), or None when ``decode`` refused (no room) or could not be reached: it
        then counts as full until its next heartbeat or until one of its requests ends."""
        # Counted before the Reserve call, not after: requests placed while it is in flight must
        # see this one, or a burst would all pick the same worker. Undone if the worker says no.
        ticket = self.registry.on_reserved(decode, num_blocks)
        timeline.reserve_start = time.monotonic()
        try:
            reservation = await self.decode_stub(decode).Reserve(request, timeout=self.config.rpc_timeout_s)
        except asyncio.CancelledError:  # the client left mid-Reserve: it may have reserved anyway
            self.use(decode)
            self.abort_later(request.request_id, [decode], (decode, None))
            self.registry.on_released(decode, num_blocks, ticket)
            raise
        except grpc.aio.AioRpcError as exc:
            self.registry.on_released(decode, num_blocks, ticket)
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise APIError(exc.details() or "invalid request", code="invalid_value") from None
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                logger.warning("reserve failed: %s", rpc_error(decode, exc))
            self.registry.on_refused(decode)
            return None
        timeline.reserve_end = time.monotonic()
        return reservation, ticket

    def abort_later(self, request_id: str, targets: list[Worker], used: tuple[Worker, Worker | None]) -> None:
        """Abort on ``targets`` in a task of its own (the request's task is being cancelled), then let
        go of the channels the request ``used``."""
        self._spawn(self._abort(request_id, targets, used))

    async def _abort(self, request_id: str, targets: list[Worker], used: tuple[Worker, Worker | None]) -> None:
        try:
            for worker in targets:
                stub = self.decode_stub(worker) if worker.role is not WorkerRole.PREFILL else self.prefill_stub(worker)
                try:
                    await stub.Abort(worker_pb2.AbortRequest(request_id=request_id), timeout=self.config.rpc_timeout_s)
                except grpc.aio.AioRpcError as exc:
                    logger.warning("abort of %s on %s failed: %s", request_id, worker.address, exc.details())
        finally:
            self.unuse(*used)
