"""Keeps the processes of `kvferry serve` running.

A child that exits is started again after a backoff that doubles from ``initial_backoff_s`` up to
``max_backoff_s``, and drops back to the start once the child has run ``healthy_after_s``. A child that
exits ``max_restarts`` times within ``window_s`` is given up on: logged as an error and left stopped
while the rest keep serving (a worker given up on shows in the router's ``/health`` as a lost worker,
since its lease ran out and no worker of its name came back). Only the launcher's own stop ends it.

The router is supervised like the workers: it comes back on the same ports, and the workers, whose
heartbeats it no longer knows, register again.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

logger = logging.getLogger("kvferry.serve")


class Process(Protocol):
    name: str

    @property
    def alive(self) -> bool: ...

    @property
    def exit_code(self) -> int | None: ...

    def start(self, env: dict[str, str]) -> None: ...


@dataclass(frozen=True)
class RestartPolicy:
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    max_restarts: int = 5  # exits within window_s before it is given up on
    window_s: float = 300.0
    healthy_after_s: float = 60.0  # a run this long resets the backoff


@dataclass
class _State:
    process: Process
    started_at: float
    backoff_s: float
    exits: deque[float] = field(default_factory=deque)
    restart_at: float | None = None  # when it is due to start again; None: running (or given up)
    given_up: bool = False
    restarts: int = 0


class Supervisor:
    def __init__(
        self,
        processes: list[Process],
        env: dict[str, str],
        policy: RestartPolicy = RestartPolicy(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.env = env
        self.policy = policy
        self.clock = clock
        now = clock()
        self._states = [_State(p, now, policy.initial_backoff_s) for p in processes]

    @property
    def given_up(self) -> list[str]:
        return [s.process.name for s in self._states if s.given_up]

    def restarts(self, name: str) -> int:
        return next(s.restarts for s in self._states if s.process.name == name)

    def poll(self) -> None:
        """Notice exits and start what is due; call it every fraction of a second."""
        now = self.clock()
        for state in self._states:
            if state.given_up:
                continue
            if state.restart_at is None:
                if not state.process.alive:
                    self._exited(state, now)
            elif now >= state.restart_at:
                state.restart_at = None
                state.started_at = now
                state.restarts += 1
                state.process.start(self.env)

    def _exited(self, state: _State, now: float) -> None:
        p = self.policy
        name, code = state.process.name, state.process.exit_code
        if now - state.started_at >= p.healthy_after_s:
            state.backoff_s = p.initial_backoff_s
        state.exits.append(now)
        while state.exits and state.exits[0] < now - p.window_s:
            state.exits.popleft()
        if len(state.exits) >= p.max_restarts:
            state.given_up = True
            logger.error("%s exited with code %s, %d times in %.0f s: not starting it again; the rest keep "
                         "serving", name, code, len(state.exits), p.window_s)
            return
        logger.error("%s exited with code %s: starting it again in %.1f s", name, code, state.backoff_s)
        state.restart_at = now + state.backoff_s
        state.backoff_s = min(state.backoff_s * 2, p.max_backoff_s)
