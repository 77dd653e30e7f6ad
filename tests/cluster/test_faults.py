"""Faults under `kvferry serve --num-decode 2`, real processes on loopback: a decode worker killed
(SIGKILL) or stopped (SIGSTOP) mid-stream, a prefill worker killed mid-prefill, the router killed.

Every stream completes with its full token count and the greedy output of an undisturbed run (fp32,
dequantized weights: the setting in which a recompute reproduces decode's numbers exactly; in bf16 or
with quantized weights a recomputed prompt can flip a near tie, docs/RELIABILITY.md), the lost process
is started again by the supervisor and serves, and no KV block is left in use on any worker.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from cluster_helpers import Serve, children_of, wait_for, worker_stats
from kvferry.proto import router_pb2

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are"]
MAX_TOKENS = 300  # streams of seconds: the fault must land while they run
LONG_PROMPT = " ".join(["The history of the printing press is long and complex."] * 100)


@pytest.fixture(scope="module")
def serve(model_path):
    s = Serve("--num-decode", "2", "--local-prefill", "never", "--dtype", "float32", "--weights", "dequantized",
              "--worker-lease", "2")
    yield s
    if s.process.poll() is None:
        s.stop()


def child_pid(serve: Serve, matches: Callable[[list[bytes]], bool], what: str) -> int:
    """The pid of the process under ``serve`` whose command line ``matches``."""
    for pid in children_of(serve.process.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if matches(argv):
            return pid
    raise AssertionError(f"no {what} process")


def pid_of(serve: Serve, name: str) -> int:
    return child_pid(serve, lambda argv: b"--name" in argv and argv[argv.index(b"--name") + 1] == name.encode(),
                     f"--name {name}")


def workers_named(serve: Serve) -> dict[str, router_pb2.WorkerInfo]:
    return {w.worker_name: w for w in serve.workers()}


def metric(serve: Serve, line_start: str) -> float:
    for line in httpx.get(serve.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def stream(serve: Serve, prompt: str, out: dict, started: threading.Event | None = None) -> None:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    text, usage, chunks = "", None, 0
    try:
        with httpx.stream("POST", serve.url + "/v1/completions", json=body, timeout=180) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out[prompt] = ("error", chunk["error"])
                    return
                usage = chunk.get("usage") or usage
                for c in chunk["choices"]:
                    text += c.get("text") or ""
                    chunks += 1
                if chunks >= 3 and started is not None:
                    started.set()
        out[prompt] = (text, usage["completion_tokens"] if usage else None)
    except Exception as exc:  # reported by the test, not lost in a thread
        out[prompt] = ("exception", repr(exc))


def run_streams(serve: Serve, disturb=None) -> dict:
    out: dict = {}
    started = [threading.Event() for _ in PROMPTS]
    threads = [threading.Thread(target=stream, args=(serve, p, out, e)) for p, e in zip(PROMPTS, started)]
    for t in threads:
        t.start()
    if disturb is not None:
        for e in started:
            e.wait(120)
        disturb()
    for t in threads:
        t.join(240)
    assert not any(t.is_alive() for t in threads), "a stream hung"
    return out


def busiest_decode(serve: Serve) -> str:
    # Asked of the workers themselves, not read from the router's last heartbeat: on a fast CPU a
    # heartbeat's wait was long enough for the streams to end before the fault landed.
    decodes = {n: w for n, w in workers_named(serve).items() if n.startswith("decode")}

    def running() -> dict[str, int]:
        return {n: worker_stats(w.address, w.role).running_requests for n, w in decodes.items()}
    counts = wait_for(lambda: (lambda c: c if sum(c.values()) >= 2 else None)(running()), 10, "running streams")
    return max(counts, key=counts.get)


def assert_no_blocks_in_use(serve: Serve, num_workers: int = 3) -> None:
    def idle() -> bool:
        stats = [worker_stats(w.address, w.role) for w in serve.workers()]
        return len(stats) == num_workers and all(s.used_kv_blocks == 0 for s in stats)

    wait_for(idle, 30, "every KV block back on every worker")


def wait_back(serve: Serve, name: str, old_id: str) -> None:
    wait_for(lambda: name in (w := workers_named(serve)) and w[name].worker_id != old_id, 120, f"{name} back")
    health = httpx.get(serve.url + "/health", timeout=10).json()
    assert name not in [w["name"] for w in health["lost_workers"]]


@pytest.fixture(scope="module")
def undisturbed(serve) -> dict:
    out = run_streams(serve)
    for prompt, (text, tokens) in out.items():
        assert tokens == MAX_TOKENS, (prompt, text)
    return out


def test_decode_worker_killed_mid_stream_streams_migrate_and_it_comes_back(serve, undisturbed):
    before = metric(serve, 'kvferry_router_migrations_total{cause="decode_worker"}')
    victim = {}

    def kill() -> None:
        name = busiest_decode(serve)
        victim.update(name=name, id=workers_named(serve)[name].worker_id)
        os.kill(pid_of(serve, name), signal.SIGKILL)

    got = run_streams(serve, kill)
    assert got == undisturbed  # every stream whole: the same tokens, none twice, none missing
    assert metric(serve, 'kvferry_router_migrations_total{cause="decode_worker"}') >= before + 1
    assert f"{victim['name']} exited with code -9: starting it again" in serve.output()
    wait_back(serve, victim["name"], victim["id"])
    # It serves again: a round of streams reaches it.
    routed = lambda: workers_named(serve)[victim["name"]].requests_routed_total  # noqa: E731
    assert run_streams(serve) == undisturbed
    assert routed() > 0
    assert_no_blocks_in_use(serve)


def test_decode_worker_stopped_mid_stream_is_migrated_within_its_lease(serve, undisturbed):
    stopped = {}

    def stop() -> None:
        name = busiest_decode(serve)
        stopped.update(name=name, pid=pid_of(serve, name), at=time.monotonic())
        os.kill(stopped["pid"], signal.SIGSTOP)

    try:
        start = time.monotonic()
        got = run_streams(serve, stop)
        took = time.monotonic() - stopped["at"]
    finally:
        os.kill(stopped["pid"], signal.SIGCONT)
    assert got == undisturbed
    # Lease 2 s, checked every heartbeat interval, then a prefill and the rest of the stream elsewhere.
    assert took < 30, f"streams finished {took:.1f} s after the worker stopped (started {start:.0f})"
    # Resumed, the worker finds the router forgot it, registers again, and its blocks come back.
    assert_no_blocks_in_use(serve)


def test_prefill_worker_killed_mid_prefill_the_request_is_retried(serve):
    # A prompt no worker has seen: no prefix cache shortens the prefill the kill has to land in.
    body = {"prompt": LONG_PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    old_id = workers_named(serve)["prefill-1"].worker_id
    before = metric(serve, 'kvferry_router_migrations_total{cause="prefill_worker"}')
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        r=httpx.post(serve.url + "/v1/completions", json=body, timeout=180)))
    thread.start()
    time.sleep(0.5)  # placed and sent within milliseconds; ~1,100 prompt tokens take seconds on one thread
    os.kill(pid_of(serve, "prefill-1"), signal.SIGKILL)
    thread.join(180)
    assert result["r"].status_code == 200, result["r"].text
    undisturbed = httpx.post(serve.url + "/v1/completions", json=body, timeout=180).json()["choices"][0]["text"]
    assert result["r"].json()["choices"][0]["text"] == undisturbed
    assert metric(serve, 'kvferry_router_migrations_total{cause="prefill_worker"}') >= before + 1
    wait_back(serve, "prefill-1", old_id)
    assert_no_blocks_in_use(serve)


def test_router_killed_comes_back_and_the_workers_register_again(serve, undisturbed):
    os.kill(pid_of_router(serve), signal.SIGKILL)
    start = time.monotonic()
    try:
        wait_for(lambda: len(safe_workers(serve)) == 3, 60, "the workers to register with the new router")
    except AssertionError:
        raise AssertionError(serve.output()[-5000:]) from None
    assert time.monotonic() - start < 60
    assert run_streams(serve) == undisturbed


def pid_of_router(serve: Serve) -> int:
    return child_pid(serve, lambda argv: b"router" in argv and b"kvferry.cli" in argv, "router")


def safe_workers(serve: Serve) -> list:
    try:
        return serve.workers()
    except Exception:
        return []
