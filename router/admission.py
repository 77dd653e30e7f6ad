"""Backpressure at the router: a bounded queue of requests waiting for a decode worker with room.

A request that finds no decode worker with room waits here, in arrival order, and retries placement
whenever capacity may have changed (a heartbeat, a request finishing, a worker joining) and at least every
``poll_s``. It never fails because one worker is full; it fails only when the queue is full (immediately)
or when no room appeared within ``timeout_s``, each with a message that says which.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")


class NoCapacityError(Exception):
    """No decode worker could take the request: the queue was full, or the wait timed out."""


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
        self._event: asyncio.Event | None = None
        self._turns: list[object] = []  # FIFO: only the head retries placement

    def notify(self) -> None:
        """Capacity may have changed: every waiter retries (the head first)."""
        if self._event is not None:
            self._event.set()
            self._event = None

    async def admit(self, try_place: Callable[[], Awaitable[T | None]], describe: Callable[[], str]) -> T:
        """Return ``try_place()``'s first non-None result, waiting in line for it if needed."""
        if not self._turns:
            placed = await try_place()
            if placed is not None:
                return placed
        if self.num_waiting >= self.config.max_waiting:
            raise NoCapacityError(
                f"router queue is full ({self.num_waiting} requests waiting for KV room); {describe()}"
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
                        f"no decode worker had room within {self.config.timeout_s:g} s; {describe()}"
                    )
                if self._turns[0] is turn:
                    placed = await try_place()
                    if placed is not None:
                        return placed
                if self._event is None:
                    self._event = asyncio.Event()
                event = self._event
                try:
                    await asyncio.wait_for(event.wait(), min(remaining, self.config.poll_s))
                except TimeoutError:
                    pass
        finally:
            self._turns.remove(turn)
            self.num_waiting -= 1
            if self._turns:
                self.notify()  # the next in line tries now rather than at the next poll
