"""`kvferry serve --ray` on a Ray cluster of several raylets on this machine (``ray.cluster_utils``:
small object stores, one CPU each, custom resources standing in for node roles): the router here, one
prefill worker on the head node (``kvferry_prefill``), decode workers on the two ``kvferry_decode``
nodes. Greedy answers equal the single-process engine's; a node that joins gets a decode worker that
serves, and one drained with `kvferry scale --drain-node` gives its worker up gracefully and gets no new
one; `kvferry scale --decode 1` under streaming load drains with zero failed requests; a node lost
mid-stream has its worker dropped by the router within seconds (Ray's signal, not the heartbeat lease)
and its streams end (moved to a replacement worker, or failed), never hanging.

The tests share one cluster and run in order, each starting from the pool the previous one left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import httpx
import pytest
import ray
from loopback import free_port
from ray.cluster_utils import Cluster
from waiting import wait_for

from kvferry.proto import router_pb2, router_pb2_grpc

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

NODE = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
MAX_TOKENS = 12
STARTUP_TIMEOUT_S = 240.0


class RayServe:
    """`kvferry serve --ray` as a subprocess against a cluster_utils Ray cluster, as a user runs it."""

    def __init__(self, ray_address: str, *extra: str) -> None:
        self.ray_address = ray_address
        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_address = f"127.0.0.1:{self.grpc_port}"
        self.log = tempfile.TemporaryFile(mode="w+")  # a pipe nobody reads would fill and block
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kvferry.cli", "serve", "--ray", "--ray-address", ray_address,
             "--port", str(self.port), "--grpc-port", str(self.grpc_port), "--shutdown-grace", "5", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, text=True,
        )
        try:
            wait_for(lambda: "kvferry is serving at" in self.output() or self.process.poll() is not None,
                     STARTUP_TIMEOUT_S, "kvferry serve --ray")
        except AssertionError:
            self.process.kill()
            raise
        assert self.process.poll() is None, f"kvferry serve --ray exited: {self.output()[-4000:]}"

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def registered(self) -> dict[str, router_pb2.WorkerInfo]:
        with grpc.insecure_channel(self.grpc_address) as ch:
            answer = router_pb2_grpc.RouterStub(ch).ListWorkers(router_pb2.ListWorkersRequest(), timeout=5)
        return {w.address: w for w in answer.workers}

    def state(self) -> dict:
        deployment = ray.get_actor("kvferry-deployment", namespace="kvferry")
        return ray.get(deployment.state.remote(), timeout=30)

    def workers(self, role: str, status: str = "serving") -> list[dict]:
        return [w for w in self.state()["workers"] if w["role"] == role and w["status"] == status]

    def stop(self) -> str:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError("kvferry serve --ray did not stop in time")
        return self.output()


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (a worker's --router address)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
                with open(f"/proc/{entry}/stat") as f:
                    zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
            except OSError:
                continue
            if text in cmdline and "kvferry.cli" in cmdline and not zombie:
                found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def reference(model_path):
    """Greedy outputs of the single-process engine: {prompt: text}."""
    from kvferry.engine.llm import LLM
    from kvferry.engine.sampling import SamplingParams

    llm = LLM(model=model_path)
    out = {p: c.text for p, c in zip(PROMPTS, llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS,
                                                                                 temperature=0.0)))}
    del llm
    return out


@pytest.fixture(scope="module")
def cluster(model_path):
    c = Cluster(initialize_head=True, head_node_args={**NODE, "resources": {"kvferry_prefill": 1},
                                                      "include_dashboard": False})
    decode_nodes = [c.add_node(**NODE, resources={"kvferry_decode": 1}) for _ in range(2)]
    ray.init(address=c.address, namespace="kvferry", log_to_driver=False)
    yield c, decode_nodes
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def serve(cluster, reference):
    c, _ = cluster
    # Every prompt through the prefill worker and a KV transfer (no local prefill on a decode worker);
    # no warm-up and a small cache: the machine has two cores for the whole cluster. Three streams at
    # most per decode worker: a load of six spreads over two workers, whatever the prefix cache prefers.
    # A long heartbeat lease: a lost worker that leaves the router within seconds left on Ray's signal.
    s = RayServe(c.address, "--elastic", "--local-prefill", "never", "--worker-lease", "30",
                 "--worker-args", "--no-warm-up --num-kv-blocks 96 --max-num-seqs 3")
    yield s
    if s.process.poll() is None:
        output = s.stop()
        assert s.process.returncode == 0, output[-4000:]
    # No worker outlives the deployment (their command lines name the router's port).
    wait_for(lambda: not processes_mentioning(f":{s.grpc_port} "), 30, "every worker process to exit")


def complete(url: str, prompt: str, max_tokens: int = MAX_TOKENS) -> dict:
    r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
                   timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


class Stream(threading.Thread):
    """One streaming completion in a thread: its text, finish reason, and any error, with timestamps."""

    def __init__(self, url: str, prompt: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.prompt, self.max_tokens = url, prompt, max_tokens
        self.num_chunks = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.ended_at: float | None = None

    def run(self) -> None:
        # ignore_eos: every stream runs its full length, so "finished" means "was served to the end".
        body = {"prompt": self.prompt, "max_tokens": self.max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True}
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=60) as r:
                if r.status_code != 200:
                    self.error = f"HTTP {r.status_code}: {r.read()[:300]!r}"
                    return
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        self.error = str(chunk["error"])
                        continue
                    self.num_chunks += 1
                    self.finish_reason = chunk["choices"][0].get("finish_reason") or self.finish_reason
        except httpx.HTTPError as exc:
            self.error = repr(exc)
        finally:
            self.ended_at = time.monotonic()

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_reason == "length"


def test_workers_land_where_their_resources_are_and_answer_like_the_engine(serve, cluster, reference):
    c, decode_nodes = cluster
    head = c.head_node.node_id
    state = serve.state()
    placed = {(w["role"], w["node_id"]) for w in state["workers"] if w["status"] == "serving"}
    assert placed == {("prefill", head), ("decode", decode_nodes[0].node_id), ("decode", decode_nodes[1].node_id)}
    registered = serve.registered()
    assert {w["address"] for w in state["workers"]} == set(registered)
    assert "(Ray: 1 prefill + 2 decode workers, following kvferry_decode)" in serve.output()
    for prompt in PROMPTS:
        assert complete(serve.url, prompt)["choices"][0]["text"] == reference[prompt]
    # Every prompt was prefilled on the prefill worker and its KV shipped to a decode worker.
    wait_for(lambda: sum(w.capacity.kv_transfers_total for w in serve.registered().values()
                         if w.role == router_pb2.WORKER_ROLE_PREFILL) == len(PROMPTS), 10, "the prefill worker's transfers")


def test_a_node_that_joins_with_kvferry_decode_gets_a_decode_worker_that_serves(serve, cluster):
    c, decode_nodes = cluster
    joined = c.add_node(**NODE, resources={"kvferry_decode": 1})
    decode_nodes.append(joined)
    worker = wait_for(lambda: next((w for w in serve.workers("decode") if w["node_id"] == joined.node_id), None),
                      120, "a decode worker on the new node")
    assert worker["address"] in serve.registered()
    # The newcomer has the most free KV and no load: placement sends it work.
    streams = [Stream(serve.url, PROMPTS[i % len(PROMPTS)], 16) for i in range(3)]
    for s in streams:
        s.start()
    for s in streams:
        s.join(120)
    assert all(s.ok for s in streams), [s.error for s in streams]
    assert serve.registered()[worker["address"]].requests_routed_total >= 1


def test_a_drained_node_loses_its_worker_gracefully_and_gets_no_new_one(serve, cluster):
    c, decode_nodes = cluster
    joined = decode_nodes[-1]
    (worker,) = [w for w in serve.workers("decode") if w["node_id"] == joined.node_id]
    stream = Stream(serve.url, PROMPTS[0], 400)  # on the newcomer or not: it must finish either way
    stream.start()
    result = subprocess.run([sys.executable, "-m", "kvferry.cli", "scale", "--drain-node", joined.node_id,
                             "--ray-address", serve.ray_address, "--timeout", "120"],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    removal = next(r for r in serve.state()["removed"] if r["name"] == worker["name"])
    assert removal["reason"] == "drained (exit code 0)"
    assert worker["address"] not in serve.registered()
    time.sleep(2.0)  # a few reconcile turns: the drained node's kvferry_decode is not counted any more
    state = serve.state()
    assert state["wanted"]["decode"] == 2 and not [w for w in state["workers"] if w["node_id"] == joined.node_id]
    # Now the node can leave the cluster without touching a request.
    c.remove_node(joined)
    decode_nodes.remove(joined)
    stream.join(120)
    assert stream.ok, (stream.error, stream.finish_reason)


def test_scale_down_under_streaming_load_drains_with_zero_failed_requests(serve, cluster):
    removed_before = len(serve.state()["removed"])
    streams = [Stream(serve.url, PROMPTS[i % len(PROMPTS)], 48) for i in range(6)]
    for s in streams:
        s.start()
    wait_for(lambda: all(s.num_chunks for s in streams), 120, "every stream's first tokens")

    def busy() -> set[str]:  # decode workers with streams, as of their last heartbeat
        return {a for a, w in serve.registered().items()
                if w.role == router_pb2.WORKER_ROLE_DECODE and w.capacity.running_requests + w.capacity.waiting_requests}

    both_busy = wait_for(lambda: busy() if len(busy()) == 2 else None, 10, "streams on both decode workers")
    # Requests keep arriving while the pool shrinks: none may fail either.
    late: list[Stream] = []
    scale = subprocess.Popen([sys.executable, "-m", "kvferry.cli", "scale", "--decode", "1", "--ray-address",
                              serve.ray_address, "--timeout", "150"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    while scale.poll() is None and len(late) < 6:
        late.append(Stream(serve.url, PROMPTS[len(late) % len(PROMPTS)], 8))
        late[-1].start()
        time.sleep(1.0)
    out, _ = scale.communicate(timeout=180)
    assert scale.returncode == 0, out
    for s in streams + late:
        s.join(120)
    assert [(s.error, s.finish_reason) for s in streams + late if not s.ok] == []
    serving = serve.workers("decode")
    assert len(serving) == 1 and len(serve.state()["workers"]) == 2, serve.state()
    drained = serve.state()["removed"][removed_before:]
    assert [r["reason"] for r in drained] == ["drained (exit code 0)"]
    # The test means something only if a drained worker had streams when it was taken out.
    assert both_busy & {r["address"] for r in drained}, (both_busy, drained)
    assert {a for a, w in serve.registered().items() if w.role == router_pb2.WORKER_ROLE_DECODE} == \
        {serving[0]["address"]}


def test_a_node_lost_mid_stream_ends_its_streams_within_seconds(serve, cluster):
    c, decode_nodes = cluster
    (victim,) = serve.workers("decode")
    node = next(n for n in decode_nodes if n.node_id == victim["node_id"])
    streams = [Stream(serve.url, PROMPTS[i], 400) for i in range(2)]
    for s in streams:
        s.start()
    wait_for(lambda: all(s.num_chunks for s in streams), 120, "the streams' first tokens")
    lost_at = time.monotonic()
    c.remove_node(node, allow_graceful=False)
    decode_nodes.remove(node)
    # The router forgets the worker on Ray's actor-death signal (the deployment deregisters it).
    wait_for(lambda: victim["address"] not in serve.registered(), 10, "the router to drop the lost worker")
    removal = wait_for(lambda: next((r for r in serve.state()["removed"] if r["name"] == victim["name"]), None),
                       60, "the deployment to record the lost worker")
    assert removal["reason"].startswith("actor died"), removal
    for s in streams:
        s.join(60)
    # Each stream ended: moved to the replacement worker and finished (request migration), or failed
    # with an error; none hangs.
    assert all(s.ended_at is not None for s in streams), "a stream hangs after its decode node was lost"
    assert all(s.ok or s.error for s in streams), [(s.error, s.finish_reason) for s in streams]
    assert max(s.ended_at for s in streams) - lost_at < 45
    # The pool is fixed at one now (after the scale): a replacement lands on a decode node still there.
    replacement = wait_for(lambda: serve.workers("decode"), 120, "a replacement decode worker")
    assert replacement[0]["node_id"] in {n.node_id for n in decode_nodes}
