"""The supervisor of `kvferry serve` on real child processes: one that exits is started again after a
backoff that doubles, and one that keeps exiting is given up on while the others keep running."""

from __future__ import annotations

import sys
import time

from kvferry.router.serve_common import Child
from kvferry.router.supervisor import RestartPolicy, Supervisor
from waiting import wait_until


def test_a_crashing_child_is_restarted_with_backoff_then_given_up_on_and_the_others_keep_running(tmp_path):
    runs = tmp_path / "runs"
    crashing = Child("crashing", [sys.executable, "-c", f"open({str(runs)!r}, 'a').write('x'); raise SystemExit(3)"])
    steady = Child("steady", [sys.executable, "-c", "import time; time.sleep(60)"])
    policy = RestartPolicy(initial_backoff_s=0.2, max_backoff_s=0.8, max_restarts=4, window_s=60)
    supervisor = Supervisor([crashing, steady], env={}, policy=policy)
    start = time.monotonic()
    crashing.start({})
    steady.start({})
    try:
        assert wait_until(lambda: (supervisor.poll(), supervisor.given_up)[1] == ["crashing"], timeout_s=30)
        elapsed = time.monotonic() - start
        assert runs.read_text() == "xxxx"  # the first run and three restarts, then no more
        assert supervisor.restarts("crashing") == 3
        assert elapsed >= 0.2 + 0.4 + 0.8  # the backoffs, doubling up to the cap
        for _ in range(10):
            supervisor.poll()
            time.sleep(0.05)
        assert runs.read_text() == "xxxx" and steady.alive and supervisor.restarts("steady") == 0
    finally:
        steady.kill()


def test_a_killed_child_comes_back():
    child = Child("worker", [sys.executable, "-c", "import time; time.sleep(60)"])
    supervisor = Supervisor([child], env={}, policy=RestartPolicy(initial_backoff_s=0.05))
    child.start({})
    first = child.process.pid
    try:
        child.process.kill()
        assert wait_until(lambda: (supervisor.poll(), child.alive and child.process.pid != first)[1], timeout_s=10)
        assert supervisor.restarts("worker") == 1 and not supervisor.given_up
    finally:
        child.kill()
