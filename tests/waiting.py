"""Bounded polling for tests: state that settles after an answer (an abort the router sends in a task
of its own, a worker that notices a closed stream) is waited for, never slept for."""

from __future__ import annotations

import time
from typing import Callable


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0, interval_s: float = 0.02) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passes; return its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return condition()


def wait_for(condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.25):
    """Poll ``condition`` until it returns something truthy and return that; AssertionError naming
    ``what`` after ``timeout_s`` (for the slow waits of whole processes: startup, scaling, failover)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
