"""One worker command line (`kvferry prefill|decode ...`) run as a child process: what a Ray actor hosts.

The worker stays the plain process `kvferry prefill|decode` is everywhere else; this class only starts
it, tells its address, and ends it. Ray-free, so a test can drive it without a cluster.

Lifecycle:
1. ``start(timeout_s)``: spawn the command line and read its stdout until it prints
   "serving gRPC on HOST:PORT"; returns that address. The child is SIGKILLed if this process dies
   (Linux ``PR_SET_PDEATHSIG``): a lost node or a killed actor takes its worker with it at once, so its
   streams end with an error instead of lingering.
2. ``wait_exit()`` blocks until the child exits and returns its exit code. The controller keeps one such
   call pending per actor: its answer, or the actor's death, is how it learns the worker is gone.
3. ``drain(timeout_s)``: SIGTERM. The worker's own shutdown path runs (Deregister draining, in-flight
   requests finish for its ``--shutdown-grace``, Deregister), then it exits; killed if it outlives
   ``timeout_s``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

logger = logging.getLogger(__name__)

SERVING_LINE = re.compile(r"kvferry (\w+) worker serving gRPC on (\S+)")


def _sigkill_with_parent() -> None:
    """Runs in the child before exec."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: drain() and the actor's exit still end the child


class WorkerStartError(RuntimeError):
    """The worker exited, or did not print its address in time; the message has its last output."""


class WorkerProcess:
    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        """``argv``: the sub-command and its flags (``["decode", "--router", ...]``); run with this
        process's Python, which on a Ray node is the one Ray runs."""
        self.argv = [sys.executable, "-m", "kvferry.cli", *argv]
        self.env = {**os.environ, **(env or {})}
        self.address: str | None = None
        self._process: subprocess.Popen | None = None
        self._spawned = threading.Event()
        self._serving = threading.Event()
        self._tail: list[str] = []  # the last lines it printed, for errors

    def start(self, timeout_s: float) -> str:
        threading.Thread(target=self._run, name="worker-process", daemon=True).start()
        self._spawned.wait()
        if self._process is None:
            raise WorkerStartError(f"could not start {' '.join(self.argv)}: " + "".join(self._tail))
        if not self._serving.wait(timeout_s) or self.address is None:
            code = self._process.poll()
            self.kill()
            what = f"exited with code {code}" if code is not None else f"printed no address in {timeout_s:.0f} s"
            raise WorkerStartError(f"`kvferry {self.argv[3]}` {what}; its last output:\n" + "".join(self._tail[-20:]))
        return self.address

    def _run(self) -> None:
        """Spawn the child, echo its output (Ray forwards it to the driver's terminal) and find its
        address. The child is spawned on this thread, which lives exactly as long as the child: the
        parent-death signal fires when the spawning *thread* ends, not only the process."""
        try:
            self._process = subprocess.Popen(
                self.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                preexec_fn=_sigkill_with_parent,
            )
        except OSError as exc:
            self._tail.append(str(exc))
            return
        finally:
            self._spawned.set()
        assert self._process.stdout is not None
        for line in self._process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            self._tail = [*self._tail[-40:], line]
            match = SERVING_LINE.search(line)
            if match and self.address is None:
                self.address = match.group(2)
                self._serving.set()
        self._process.wait()
        self._serving.set()  # the child is gone: start() must not wait out its timeout

    def wait_exit(self) -> int:
        self._spawned.wait()
        return -1 if self._process is None else self._process.wait()

    def poll(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def drain(self, timeout_s: float) -> int:
        """SIGTERM and wait; returns the exit code (the worker's own drain ran if it is 0)."""
        if self._process is None:
            return 0
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
        try:
            return self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("worker %s still running %.0f s after SIGTERM: killing it", self.address, timeout_s)
            self.kill()
            return self._process.returncode

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)
