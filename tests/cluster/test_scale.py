"""Two prefill and two decode workers behind one router, as separate processes on loopback.

Load is shared (every worker gets requests); a decode worker with no room makes the router use the
other one or queue, never fail; a worker with an incompatible fingerprint is refused at registration
with a message naming the difference, and exits.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import grpc
import httpx
import pytest

from cluster_helpers import STARTUP_TIMEOUT_S, free_port, http_ok, wait_for, worker_stats
from kvferry.proto import router_pb2, router_pb2_grpc
from kvferry.router.launch_serve import Child, Cluster

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

DECODE_BLOCKS = 12  # 192 token slots per decode worker: one ~150-token request at a time
PY = [sys.executable, "-m", "kvferry.cli"]


@pytest.fixture(scope="module")
def cluster(model_path):
    port, grpc_port = free_port(), free_port()
    router_address = f"127.0.0.1:{grpc_port}"
    worker = ["--router", router_address, "--host", "127.0.0.1", "--port", "0"]
    c = Cluster(
        router=Child("router", [*PY, "router", "--port", str(port), "--grpc-port", str(grpc_port),
                                "--queue-timeout", "120", "--shutdown-grace", "5",
                                "--local-prefill", "never"]),  # short prompts must reach the prefill workers
        workers=[
            Child("prefill-a", [*PY, "prefill", *worker]),
            Child("prefill-b", [*PY, "prefill", *worker]),
            Child("decode-a", [*PY, "decode", *worker, "--num-kv-blocks", str(DECODE_BLOCKS)]),
            Child("decode-b", [*PY, "decode", *worker, "--num-kv-blocks", str(DECODE_BLOCKS)]),
        ],
        http_url=f"http://127.0.0.1:{port}",
        grpc_address=router_address,
        shutdown_grace_s=5,
    )
    c.start(STARTUP_TIMEOUT_S)
    wait_for(lambda: len(list_workers(c)) == 4, 60, "all four workers to register")
    yield c
    c.stop()
    assert not [ch.name for ch in c.children if ch.alive]


def list_workers(c: Cluster) -> list[router_pb2.WorkerInfo]:
    with grpc.insecure_channel(c.grpc_address) as ch:
        return list(router_pb2_grpc.RouterStub(ch).ListWorkers(router_pb2.ListWorkersRequest(), timeout=5).workers)


def post(c: Cluster, prompt: str, max_tokens: int, results: list) -> None:
    r = httpx.post(c.http_url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                         "temperature": 0}, timeout=300)
    results.append(r)


def run_concurrently(c: Cluster, prompts: list[str], max_tokens: int) -> list[httpx.Response]:
    results: list[httpx.Response] = []
    threads = [threading.Thread(target=post, args=(c, p, max_tokens, results)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


def test_load_is_shared_by_both_prefill_and_both_decode_workers(cluster):
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(8)]
    results = run_concurrently(cluster, prompts, 4)
    assert [r.status_code for r in results] == [200] * 8, [r.text for r in results]
    routed = {w.address: w.requests_routed_total for w in list_workers(cluster)}
    assert all(n >= 1 for n in routed.values()), routed


def test_full_decode_workers_make_requests_go_elsewhere_or_queue_not_fail(cluster):
    # Each request needs 10 of a decode worker's 12 blocks: one fits per worker, so of four sent at
    # once, two go to the two workers and two wait in the router's queue; all four complete.
    prompt = "one two three four five six seven eight nine ten " * 14  # ~150 tokens
    decode = [w for w in list_workers(cluster) if w.role == router_pb2.WORKER_ROLE_DECODE]
    before = {w.address: w.requests_routed_total for w in decode}
    results = run_concurrently(cluster, [prompt] * 4, 8)
    assert [r.status_code for r in results] == [200] * 4, [r.text for r in results]
    assert len({r.json()["choices"][0]["text"] for r in results}) == 1
    after = {w.address: w.requests_routed_total for w in list_workers(cluster) if w.address in before}
    assert all(after[a] > before[a] for a in before), (before, after)
    metrics = httpx.get(cluster.http_url + "/metrics", timeout=10).text
    delayed = next(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("kvferry_router_requests_delayed_total"))
    assert delayed >= 1
    wait_for(lambda: all(worker_stats(w.address, w.role).used_kv_blocks == 0 for w in decode), 20,
             "every block back")


def test_incompatible_worker_is_refused_at_registration(cluster):
    with grpc.insecure_channel(cluster.grpc_address) as ch:
        fingerprint = router_pb2_grpc.RouterStub(ch).ListWorkers(router_pb2.ListWorkersRequest(), timeout=5).fingerprint
    other_dtype = "float32" if fingerprint.dtype == "bfloat16" else "bfloat16"
    proc = subprocess.run(
        [*PY, "decode", "--router", cluster.grpc_address, "--host", "127.0.0.1", "--port", "0",
         "--dtype", other_dtype],
        capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S,
    )
    assert proc.returncode != 0
    assert "dtype" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-2000:]
    assert len(list_workers(cluster)) == 4
    assert http_ok(cluster.http_url)
