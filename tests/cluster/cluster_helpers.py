"""Helpers for cluster tests: `kvferry serve` as a subprocess, waiting with bounds, process trees,
and the workers' own block counts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

import grpc
import httpx

from loopback import free_port
from waiting import wait_for

from kvferry.proto import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

STARTUP_TIMEOUT_S = 240.0

# Greedy references: plain prompts and one chat, short outputs (the machine has 2 shared cores).
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
CHAT = [{"role": "user", "content": "Name three colors."}]
MAX_TOKENS = 12


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def children_of(pid: int) -> set[int]:
    """Every descendant of ``pid`` (from /proc), so a test can prove none outlives shutdown."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                parents[int(entry)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = set(), {pid}
    for _ in range(10):  # depth bound
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        if not frontier:
            break
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Serve:
    """`kvferry serve` as a subprocess, exactly as a user runs it."""

    def __init__(self, *extra: str, env: dict[str, str] | None = None) -> None:
        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_address = f"127.0.0.1:{self.grpc_port}"
        # A file, not a pipe: a pipe nobody reads until the end would fill up and block the cluster.
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kvferry.cli", "serve", "--port", str(self.port), "--grpc-port",
             str(self.grpc_port), "--shutdown-grace", "5", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, text=True, env=None if env is None else {**os.environ, **env},
        )
        try:
            wait_for(lambda: http_ok(self.url) or self.process.poll() is not None, STARTUP_TIMEOUT_S, "kvferry serve")
        except AssertionError:
            self.kill()
            raise
        if self.process.poll() is not None:
            raise AssertionError(f"kvferry serve exited: {self.output()[-3000:]}")
        # The router answers before the launcher has seen it ready; only then does it supervise.
        wait_for(lambda: "kvferry is serving at" in self.output() or self.process.poll() is not None, 30,
                 "kvferry serve to print its URL")
        self.pids = children_of(self.process.pid)

    def workers(self) -> list[router_pb2.WorkerInfo]:
        with grpc.insecure_channel(self.grpc_address) as ch:
            return list(router_pb2_grpc.RouterStub(ch).ListWorkers(router_pb2.ListWorkersRequest(), timeout=5).workers)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self, sig: int = signal.SIGINT, timeout: float = 90) -> str:
        """Signal `kvferry serve` as a terminal would; returns everything it printed."""
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("kvferry serve did not stop in time")
        return self.output()

    def kill(self) -> None:
        for pid in children_of(self.process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.process.kill()
        self.process.wait(10)


def worker_stats(address: str, role: int) -> worker_pb2.WorkerStats:
    with grpc.insecure_channel(address) as ch:
        stub = (worker_pb2_grpc.PrefillWorkerStub if role == router_pb2.WORKER_ROLE_PREFILL
                else worker_pb2_grpc.DecodeWorkerStub)(ch)
        return stub.GetStats(worker_pb2.StatsRequest(), timeout=5)


