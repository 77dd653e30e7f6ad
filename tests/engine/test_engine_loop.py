"""EngineLoop without an engine: turns, commands between them, errors, timeouts, stop."""

from __future__ import annotations

import threading

import pytest

from kvferry.engine.engine_loop import EngineLoop


def make_loop(turn=lambda: 0.01, on_error=lambda: None) -> EngineLoop:
    loop = EngineLoop(turn, on_error, "test-loop", command_timeout_s=5.0)
    loop.start()
    return loop


def test_call_runs_on_the_loop_thread_and_returns_or_raises() -> None:
    loop = make_loop()
    try:
        assert loop.call(lambda: threading.current_thread().name) == "test-loop"
        with pytest.raises(KeyError, match="missing"):
            loop.call(lambda: {}["missing"])
        ran = threading.Event()
        loop.post(lambda: 1 / 0)  # logged, the loop goes on
        loop.post(ran.set)
        assert ran.wait(5)
    finally:
        loop.stop()
    assert not loop.is_alive()


def test_a_timed_out_command_never_runs_later() -> None:
    release, ran = threading.Event(), []
    loop = make_loop()
    try:
        loop.post(lambda: release.wait(5))  # keeps the loop busy
        with pytest.raises(TimeoutError):
            loop.call(lambda: ran.append(1), timeout_s=0.05)
        release.set()
        loop.call(lambda: None)  # queued after the stale one: by now it was skipped
        assert ran == []
    finally:
        loop.stop()


def test_a_failed_turn_calls_on_error_and_the_loop_goes_on() -> None:
    turns, errors = [], []

    def turn() -> float:
        turns.append(1)
        if len(turns) == 2:
            raise RuntimeError("bug")
        return 0.01

    loop = make_loop(turn, lambda: errors.append(len(turns)))
    try:
        loop.call(lambda: None)
        loop.call(lambda: None)
        loop.call(lambda: None)
        assert errors == [2]  # the third command ran after the failed second turn
    finally:
        loop.stop()


def test_stop_runs_the_last_command_first_and_works_unstarted() -> None:
    done = []
    loop = make_loop()
    loop.stop(last=lambda: done.append(threading.current_thread().name))
    assert done == ["test-loop"] and not loop.is_alive()
    EngineLoop(lambda: 0.01, lambda: None, "never-started", 1.0).stop(last=lambda: done.append("no"))
    assert done == ["test-loop"]


def test_busy_seconds_grows_inside_a_wedged_turn_and_is_zero_while_idle() -> None:
    import time

    release = threading.Event()
    wedge = threading.Event()

    def turn() -> float:
        if wedge.is_set():
            release.wait(10)  # a turn that does not come back (a hung kernel, a deadlock)
        return 0.01

    loop = make_loop(turn)
    try:
        time.sleep(0.05)
        assert loop.busy_seconds() < 0.05  # idle: waiting for commands between short turns
        wedge.set()
        time.sleep(0.4)
        assert loop.busy_seconds() >= 0.3
        release.set()
        wedge.clear()
        loop.call(lambda: None)
        assert loop.busy_seconds() < 0.1
    finally:
        release.set()
        loop.stop()
    assert loop.busy_seconds() == float("inf")  # a loop whose thread ended is as good as wedged
