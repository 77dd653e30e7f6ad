"""The thread that owns a worker's engine: it runs the worker's turns (a step and what follows from it)
one after another and, before each turn, the commands other threads queued.

Every engine call happens on this thread, so the engine needs no locks. Other threads hand it work
with ``call`` (wait for the result, bounded) or ``post`` (fire and forget, e.g. from a transport
thread). A turn returns how long the loop may wait for a command when there was none: 0 while work
is schedulable, the worker's idle (or polling) wait otherwise, so a new command starts at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

logger = logging.getLogger(__name__)

MAX_COMMANDS_PER_TURN = 1024  # bounded: the step must not starve


def busy_ms(loop: EngineLoop) -> int:
    """``loop.busy_seconds()`` in whole milliseconds, capped to fit a uint32 (a dead loop: the cap)."""
    return int(min(loop.busy_seconds() * 1000.0, 2**32 - 1))


class EngineLoop:
    def __init__(
        self,
        turn: Callable[[], float],
        on_error: Callable[[], None],
        name: str,
        command_timeout_s: float,
    ):
        """``turn() -> seconds to wait for a command`` (0: more work now); ``on_error()`` runs on the
        loop thread inside the ``except`` of a failed turn (so it can log the exception), then the
        loop goes on; ``command_timeout_s``: how long ``call`` waits by default."""
        self.name = name
        self.command_timeout_s = command_timeout_s
        self._turn = turn
        self._on_error = on_error
        self._commands: queue.Queue[tuple[Callable[[], object], Future | None]] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._turn_started: float | None = None  # set while a turn (or a command) runs

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def busy_seconds(self) -> float:
        """How long the loop has been inside its current turn or command (0 while it waits for work): a
        loop that is wedged, or whose thread died, shows it here while the worker's heartbeat thread
        still answers."""
        if not self.is_alive():
            return float("inf") if self._thread is not None else 0.0
        started = self._turn_started
        return 0.0 if started is None else max(0.0, time.monotonic() - started)

    def stop(self, timeout_s: float = 5.0, last: Callable[[], object] | None = None) -> None:
        """Run ``last`` on the loop (if it still runs; waits up to ``timeout_s``), then end the thread."""
        if last is not None and self.is_alive():
            try:
                self.call(last, timeout_s)
            except TimeoutError:
                logger.warning("%s did not run its last command within %.1fs", self.name, timeout_s)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    # ---- any thread --------------------------------------------------------------------------------
    def call(self, fn: Callable[[], object], timeout_s: float | None = None):
        """Run ``fn`` on the loop and return its result (or raise its exception). Raises TimeoutError
        after ``timeout_s`` (default ``command_timeout_s``); the command is then cancelled if it has
        not started, so a caller that gave up never sees it acted on later."""
        future: Future = Future()
        self._commands.put((fn, future))
        try:
            return future.result(timeout=timeout_s or self.command_timeout_s)
        except TimeoutError:
            future.cancel()
            raise

    def post(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the loop without waiting; an exception is logged."""
        self._commands.put((fn, None))

    # ---- the loop thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._turn_started = time.monotonic()
                busy = self._run_commands(wait_s=0.0)
                wait_s = self._turn()
                self._turn_started = None
                if not busy and wait_s > 0:
                    self._run_commands(wait_s=wait_s)
            except Exception:  # a bug in a turn must not end the thread: the worker fails its requests
                self._on_error()
            finally:
                self._turn_started = None

    def _run_commands(self, wait_s: float) -> bool:
        """Run queued commands; with ``wait_s`` > 0 wait that long for the first. True if any ran."""
        ran = False
        for _ in range(MAX_COMMANDS_PER_TURN):
            try:
                fn, future = self._commands.get(timeout=wait_s) if wait_s and not ran else self._commands.get_nowait()
            except queue.Empty:
                break
            ran = True
            self._turn_started = time.monotonic()
            if future is not None and not future.set_running_or_notify_cancel():
                continue  # the caller gave up waiting; do not act on a stale command
            try:
                result = fn()
            except Exception as exc:
                if future is None:
                    logger.exception("%s: command failed", self.name)
                else:
                    future.set_exception(exc)
            else:
                if future is not None:
                    future.set_result(result)
        return ran
