"""The router's view of its workers: who they are, whether they are alive, how loaded they are.

Workers register (role, address, compatibility fingerprint, capacity) and heartbeat their capacity; a
worker whose lease runs out without a heartbeat is removed and listed in ``lost`` by name until a worker
of that name registers again; new ones join at any time. Between
heartbeats the router keeps its own accounting of what it has sent each worker (blocks reserved,
prompt tokens queued, requests in flight) so that a burst of requests does not all land on the worker
that looked emptiest at the last heartbeat.

Picking (``pick_decode`` then ``pick_prefill``):

- decode: among live, non-draining decode workers whose estimated free blocks cover the request, the one
  with the highest ``free_fraction - load_fraction`` (free KV after placing the request over total KV,
  minus requests running or in flight over its batch limit); ties go to the worker routed to least.
  KV room is what makes decode refuse or preempt, and batch occupancy is what makes its TPOT grow, so
  both count; neither alone spreads load when workers differ in size.
- prefill: the live, non-draining prefill worker with the fewest queued prefill tokens (as reported plus
  what the router sent since), then fewest in flight. Prefill time is roughly linear in prompt tokens, so
  queued tokens predict TTFT better than a request count. Only those whose KV reaches the decode worker
  picked count: ``pairs`` (pair_health.py) leaves out a pair whose transfers kept failing, for a while.

Whether the decode worker prefills a prompt itself is ``placement.py``'s call; for it each decode worker
keeps ``recent_blocks``, the router's estimate of that worker's prefix cache.

Everything here runs on the router's event loop; nothing blocks and nothing needs a lock.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from kvferry.common.fingerprint import KVFingerprint
from kvferry.common.worker import WorkerRole, WorkerStats
from kvferry.router.pair_health import PairHealth, PairHealthConfig

logger = logging.getLogger(__name__)


class RegistrationError(Exception):
    """A worker that cannot join: bad role/address, or a fingerprint unlike the cluster's."""


DEFAULT_MAX_RUNNING = 64  # batch limit assumed for a worker that does not report one


def prompt_block_hashes(prompt_token_ids: tuple[int, ...], block_size: int) -> list[int]:
    """Chained hashes of the prompt's full blocks that a prefix cache could serve (as the engine's
    block manager forms them; never the block holding the last token, which is always computed)."""
    hashes, prev = [], None
    for i in range((len(prompt_token_ids) - 1) // block_size):
        prev = hash((prev, tuple(prompt_token_ids[i * block_size : (i + 1) * block_size])))
        hashes.append(prev)
    return hashes


class RecentBlocks:
    """The router's estimate of a decode worker's prefix cache: the block hashes of the prompts it was
    sent, most recent last, at most as many as the worker has blocks. A worker reuses its free blocks
    oldest first, so what the router sent longest ago is what it forgot first. An estimate only: the
    worker's own cache decides what is reused, so a wrong guess costs time, never correctness."""

    def __init__(self) -> None:
        self._hashes: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._hashes)

    def record(self, hashes: list[int], capacity: int) -> None:
        for h in hashes:
            self._hashes[h] = None
            self._hashes.move_to_end(h)
        while len(self._hashes) > max(0, capacity):
            self._hashes.popitem(last=False)

    def num_cached_blocks(self, hashes: list[int]) -> int:
        """Leading blocks of the prompt this worker likely still holds."""
        n = 0
        while n < len(hashes) and hashes[n] in self._hashes:
            n += 1
        return n


@dataclass
class Worker:
    worker_id: str
    role: WorkerRole
    address: str
    name: str
    fingerprint: KVFingerprint
    capacity: WorkerStats  # as of its last heartbeat
    last_heartbeat: float
    kv_address: str = ""
    device: str = ""  # what its engine runs on, as the worker said ("cpu", "cuda:0 (NVIDIA H200)")
    draining: bool = False
    stalled: bool = False  # its engine loop has been stuck in one turn past RegistryConfig.stalled_after_s
    requests_routed_total: int = 0
    # Router-side accounting since the last heartbeat (reset by it) and of requests not yet finished.
    blocks_reserved_since_heartbeat: int = 0
    prefill_tokens_since_heartbeat: int = 0
    num_inflight: int = 0
    # It refused a Reserve (no room, or unreachable): skipped until its next heartbeat or until one of
    # its requests ends, whichever comes first (a sequence and its blocks come back then).
    refused: bool = False
    heartbeats: int = 0  # how many heartbeats have been recorded: tells reservations before one from after
    recent_blocks: RecentBlocks = field(default_factory=RecentBlocks)  # decode role: prefix-cache estimate

    @property
    def free_blocks_estimate(self) -> int:
        return max(0, self.capacity.free_kv_blocks - self.blocks_reserved_since_heartbeat)

    @property
    def queued_prefill_tokens_estimate(self) -> int:
        return self.capacity.queued_prefill_tokens + self.prefill_tokens_since_heartbeat

    @property
    def max_running(self) -> int:
        return self.capacity.max_running_requests or DEFAULT_MAX_RUNNING

    @property
    def target(self) -> str:
        """Where KV for this (decode) worker goes."""
        return self.kv_address or self.address


@dataclass
class LostWorker:
    """A worker whose lease ran out and that has not come back under its name (shown by /health)."""

    name: str
    role: WorkerRole
    address: str
    lost_at: float  # registry clock
    times_lost: int = 1


@dataclass(frozen=True)
class RegistryConfig:
    heartbeat_interval_s: float = 0.5
    lease_s: float = 3.0  # removed after this long without a heartbeat
    # A worker whose engine loop has been inside one turn this long is wedged (a chunked-prefill step
    # takes seconds at most): it gets no new work and its requests move, though its heartbeats go on.
    stalled_after_s: float = 30.0
    pairs: PairHealthConfig = field(default_factory=PairHealthConfig)  # KV-transfer failures per pair

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval_s < self.lease_s:
            raise ValueError("need 0 < heartbeat_interval_s < lease_s")


@dataclass
class WorkerRegistry:
    config: RegistryConfig = field(default_factory=RegistryConfig)
    # The cluster's fingerprint: given by the router's own model, or fixed by the first worker to join.
    fingerprint: KVFingerprint | None = None
    clock: Callable[[], float] = time.monotonic
    on_change: Callable[[], None] | None = None  # capacity may have grown: wake queued requests
    workers: dict[str, Worker] = field(default_factory=dict)
    lost: dict[str, LostWorker] = field(default_factory=dict)  # name -> worker that expired, not back yet
    newly_stalled: list[Worker] = field(default_factory=list)  # see take_newly_stalled
    _times_lost: dict[str, int] = field(default_factory=dict)  # name -> expiries so far (a flapping worker)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    pairs: PairHealth = field(init=False)  # which prefill workers' KV reaches which decode workers

    def __post_init__(self) -> None:
        self.pairs = PairHealth(self.config.pairs, self.clock)

    # --- membership -------------------------------------------------------------------------------

    def register(
        self,
        role: WorkerRole,
        address: str,
        fingerprint: KVFingerprint,
        capacity: WorkerStats,
        name: str = "",
        kv_address: str = "",
        device: str = "",
    ) -> Worker:
        if not address or ":" not in address:
            raise RegistrationError(f"worker address must be host:port, got {address!r}")
        if self.fingerprint is None:
            self.fingerprint = fingerprint
        else:
            diffs = self.fingerprint.differences(fingerprint, "cluster", "worker")
            if diffs:
                raise RegistrationError(
                    f"{role.name.lower()} worker at {address} is incompatible with this cluster: "
                    + "; ".join(diffs)
                )
        # A worker re-registering from the same address (restart, or after expiry) replaces its old
        # entry: stale peers must not linger next to their successors.
        for old in [w for w in self.workers.values() if w.address == address]:
            self._remove(old)
        if name and self.lost.pop(name, None) is not None:
            logger.info("worker %s is back at %s", name, address)
        worker_id = f"{role.name.lower()}-{next(self._ids)}"
        worker = Worker(
            worker_id=worker_id,
            role=role,
            address=address,
            name=name or address,
            fingerprint=fingerprint,
            capacity=capacity,
            last_heartbeat=self.clock(),
            kv_address=kv_address,
            device=device,
        )
        self.workers[worker_id] = worker
        self._changed()
        return worker

    def heartbeat(self, worker_id: str, capacity: WorkerStats) -> bool:
        """Record a heartbeat; False when the worker is unknown (it must re-register)."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return False
        worker.capacity = capacity
        stalled = capacity.engine_busy_ms > self.config.stalled_after_s * 1000
        if stalled and not worker.stalled:
            self.newly_stalled.append(worker)
        worker.stalled = stalled
        worker.last_heartbeat = self.clock()
        worker.blocks_reserved_since_heartbeat = 0
        worker.prefill_tokens_since_heartbeat = 0
        worker.refused = False
        worker.heartbeats += 1
        self._changed()
        return True

    def deregister(self, worker_id: str, draining: bool) -> bool:
        worker = self.workers.get(worker_id)
        if worker is None:
            return False
        if draining:
            worker.draining = True
        else:
            self._remove(worker)
        return True

    def _remove(self, worker: Worker) -> None:
        del self.workers[worker.worker_id]
        self.pairs.forget_worker(worker.worker_id)

    def expire(self) -> list[Worker]:
        """Remove the workers whose lease ran out; returns them."""
        deadline = self.clock() - self.config.lease_s
        dead = [w for w in self.workers.values() if w.last_heartbeat < deadline]
        for w in dead:
            self._remove(w)
            times = self._times_lost[w.name] = self._times_lost.get(w.name, 0) + 1
            self.lost[w.name] = LostWorker(w.name, w.role, w.address, self.clock(), times)
        return dead

    def live(self, *roles: WorkerRole) -> list[Worker]:
        """Workers of ``roles`` that may get new requests: neither draining nor stalled."""
        return [w for w in self.workers.values() if w.role in roles and not w.draining and not w.stalled]

    def take_newly_stalled(self) -> list[Worker]:
        """Workers whose engine was reported wedged since the last call (their requests should move)."""
        stalled, self.newly_stalled = self.newly_stalled, []
        return [w for w in stalled if w.stalled and w.worker_id in self.workers]

    @property
    def max_model_len(self) -> int | None:
        """The smallest context any worker accepts (None: no worker has said)."""
        lens = [w.fingerprint.max_model_len for w in self.workers.values() if w.fingerprint.max_model_len]
        return min(lens) if lens else None

    @property
    def block_size(self) -> int:
        return self.fingerprint.block_size if self.fingerprint and self.fingerprint.block_size else 16

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- picking ----------------------------------------------------------------------------------

    def pick_decode(self, num_blocks: int, exclude: frozenset[str] = frozenset()) -> Worker | None:
        """The decode (or colocated) worker to reserve ``num_blocks`` on, or None when none has room."""
        candidates = [
            w for w in self.live(WorkerRole.DECODE, WorkerRole.COLOCATED)
            if w.worker_id not in exclude and not w.refused and w.free_blocks_estimate >= num_blocks
        ]
        if not candidates:
            return None

        def score(w: Worker) -> tuple[float, int]:
            total = max(1, w.capacity.total_kv_blocks)
            free_fraction = (w.free_blocks_estimate - num_blocks) / total
            load = max(w.capacity.running_requests + w.capacity.waiting_requests, w.num_inflight)
            load_fraction = load / w.max_running
            return (free_fraction - load_fraction, -w.requests_routed_total)

        return max(candidates, key=score)

    def reachable_prefill(self, decode: Worker | None, exclude: frozenset[str] = frozenset()) -> list[Worker]:
        """Live prefill workers not in ``exclude`` whose KV reaches ``decode`` (pair_health.py: a pair
        that failed its transfers in a row is out for a cool-down); ``decode`` None: every one."""
        return [w for w in self.live(WorkerRole.PREFILL) if w.worker_id not in exclude
                and (decode is None or not self.pairs.excluded(w.worker_id, decode.worker_id))]

    def pick_prefill(self, exclude: frozenset[str] = frozenset(), decode: Worker | None = None) -> Worker | None:
        """The prefill worker for a prompt whose KV goes to ``decode``, or None."""
        candidates = self.reachable_prefill(decode, exclude)
        if not candidates:
            return None
        return min(
            candidates,
            key=lambda w: (w.queued_prefill_tokens_estimate, w.num_inflight, w.requests_routed_total),
        )

    def largest_decode_blocks(self) -> int:
        return max(
            (w.capacity.total_kv_blocks for w in self.live(WorkerRole.DECODE, WorkerRole.COLOCATED)),
            default=0,
        )

    # --- router-side accounting -------------------------------------------------------------------

    def on_reserved(self, worker: Worker, num_blocks: int) -> int:
        """Count a reservation; returns the ticket to hand back to :meth:`on_released`."""
        worker.blocks_reserved_since_heartbeat += num_blocks
        worker.requests_routed_total += 1
        worker.num_inflight += 1
        return worker.heartbeats

    def on_refused(self, worker: Worker) -> None:
        """The worker said no room (or could not be reached): treat it as full until its next heartbeat
        or until one of its requests ends. Waiting for the heartbeat alone left a saturated worker's
        freed sequences idle for up to a heartbeat interval while the router's queue waited on it."""
        worker.refused = True

    def on_prefill_sent(self, worker: Worker, num_tokens: int) -> None:
        worker.prefill_tokens_since_heartbeat += num_tokens
        worker.requests_routed_total += 1
        worker.num_inflight += 1

    def on_local_prefill(self, worker: Worker, num_tokens: int) -> None:
        """A decode worker was told to prefill ``num_tokens`` itself: queued there until its heartbeat."""
        worker.prefill_tokens_since_heartbeat += num_tokens

    def on_prefill_done(self, worker: Worker) -> None:
        worker.num_inflight = max(0, worker.num_inflight - 1)

    def on_released(self, worker: Worker, num_blocks: int = 0, ticket: int | None = None) -> None:
        """A request on a decode worker finished or was aborted: its blocks are coming back.

        A reservation made since the worker's last heartbeat is handed back to the estimate at once;
        otherwise a worker whose short requests all ended before its heartbeat would look fuller than
        an idle neighbour that just reported, and a run of short requests would stick to the neighbour.
        An older reservation is in the worker's own figure, which its next heartbeat corrects.
        """
        worker.num_inflight = max(0, worker.num_inflight - 1)
        worker.refused = False
        if ticket is not None and ticket == worker.heartbeats:
            worker.blocks_reserved_since_heartbeat = max(0, worker.blocks_reserved_since_heartbeat - num_blocks)
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()
