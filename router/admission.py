"""Backpressure at the router: a bounded queue of requests waiting for a decode worker with room.

A request that finds no decode worker with room waits here, in arrival order, and retries placement
whenever capacity may have changed (a heartbeat, a request finishing, a worker joining) and at least every
``poll_s``. It never fails because one worker is full; it fails only when the queue is full (immediately)
or when no room appeared within ``timeout_s``, each with a message that says which, or, for a request
with a TTFT deadline, when the deadline passes while it waits (``TTFTExpired``: a 429 with a retry-after
of the queue's predicted drain time). A request that can still make its deadline is never refused here.

Refusals for a TTFT target, here and on the workers, are counted in ``rejections`` (where -> count).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")


class NoCapacityError(Exception):
    """No decode worker could take the request: the queue was full (``overloaded``: refused at once, a
    429 for the client), or the wait timed out (a 503). ``retry_after_s``: when trying again may work."""

    def __init__(self, message: str, retry_after_s: float, overloaded: bool = False) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.overloaded = overloaded


class TTFTExpired(Exception):
    """The request's TTFT deadline passed while it waited for KV room."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class AdmissionConfig:
    max_waiting: int = 1024
    timeout_s: float = 60.0
    poll_s: float = 0.25

    def __post_init__(self) -> None:
        if self.max_waiting < 0 or self.timeout_s <= 0 or self.poll_s <= 0:
            raise ValueError("admission: need max_waiting >= 0, timeout_s > 0, poll_s > 0")


class AdmissionQueue:
    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self.num_waiting = 0
        self.num_delayed_total = 0  # requests that had to wait for room (a metric)
        self.rejections: Counter[str] = Counter()  # TTFT refusals: "router_queue", "prefill_worker", ...
        self._placed: deque[float] = deque(maxlen=32)  # when recent waiters got placed: the drain rate
        self._event: asyncio.Event | None = None
        self._turns: list[object] = []  # FIFO: only the head retries placement

    def notify(self) -> None:
        """Capacity may have changed: every waiter retries (the head first)."""
        if self._event is not None:
            self._event.set()
            self._event = None

    def drain_seconds(self, position: int | None = None) -> float:
        """Predicted time for the queue (or its first ``position`` waiters) to be placed, from the rate
        at which recent waiters were; the queue timeout when nothing was placed lately."""
        n = self.num_waiting if position is None else position
        if len(self._placed) < 2 or self._placed[-1] <= self._placed[0]:
            return self.config.timeout_s
        rate = (len(self._placed) - 1) / (self._placed[-1] - self._placed[0])  # placements per second
        return max(n, 1) / rate

    async def admit(
        self,
        try_place: Callable[[], Awaitable[T | None]],
        describe: Callable[[], str],
        ttft_deadline: float | None = None,
    ) -> T:
        """Return ``try_place()``'s first non-None result, waiting in line for it if needed.
        ``ttft_deadline`` (``time.monotonic()``): raise ``TTFTExpired`` once it passes while waiting."""
        if not self._turns:
            placed = await try_place()
            if placed is not None:
                return placed
        if self.num_waiting >= self.config.max_waiting:
            raise NoCapacityError(
                f"router queue is full ({self.num_waiting} requests waiting for KV room); {describe()}",
                self.drain_seconds(), overloaded=True,
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.timeout_s
        turn = object()
        self._turns.append(turn)
        self.num_waiting += 1
        self.num_delayed_total += 1
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise NoCapacityError(
                        f"no decode worker had room within {self.config.timeout_s:g} s; {describe()}",
                        self.drain_seconds(self._turns.index(turn) + 1),
                    )
                if ttft_deadline is not None and time.monotonic() >= ttft_deadline:
                    self.rejections["router_queue"] += 1
                    position = self._turns.index(turn)
                    raise TTFTExpired(
                        f"the time-to-first-token target passed while the request waited for KV room "
                        f"({position} ahead of it in the router's queue); {describe()}",
                        self.drain_seconds(position + 1),
                    )
                if self._turns[0] is turn:
                    placed = await try_place()
                    if placed is not None:
                        self._placed.append(time.monotonic())
                        return placed
                if self._event is None:
                    self._event = asyncio.Event()
                event = self._event
                wait_s = min(remaining, self.config.poll_s)
                if ttft_deadline is not None:
                    wait_s = max(min(wait_s, ttft_deadline - time.monotonic()), 0.001)
                try:
                    await asyncio.wait_for(event.wait(), wait_s)
                except TimeoutError:
                    pass
        finally:
            self._turns.remove(turn)
            self.num_waiting -= 1
            if self._turns:
                self.notify()  # the next in line tries now rather than at the next poll
