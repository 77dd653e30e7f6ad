"""Authentication at the router, on a real router and scripted workers on loopback: the API key (HTTP
and gRPC Generate), the cluster token on the control plane and on the router's calls to the workers,
and mutual TLS between router and workers."""

from __future__ import annotations

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvferry.proto import generate_pb2, generate_pb2_grpc, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from kvferry.proto.cluster_security import ClusterSecurity, TLSFiles
from kvferry.common.worker import WorkerStats
from kvferry.proto.convert import fingerprint_from_proto
from kvferry.worker_common.registration import RegistrationRefused, RouterRegistration
from router_test_workers import FINGERPRINT, ScriptedCluster
from tls_certs import TestCA

KEY = "sk-test-key"
TOKEN = "cluster-secret"
TEXT = " The quick brown fox"
DECODE = router_pb2.WORKER_ROLE_DECODE


@pytest.fixture
def secured(start_router, served_model):
    """A router with an API key and a cluster token, and workers that have the token."""
    router = start_router(api_key=KEY, security=ClusterSecurity(token=TOKEN))
    workers = ScriptedCluster(router, served_model, TEXT, security=ClusterSecurity(token=TOKEN))
    yield router, workers
    workers.stop()


def completion(router, headers=None, path="/v1/completions") -> httpx.Response:
    return httpx.post(router.url + path, json={"prompt": "x", "max_tokens": 50}, headers=headers or {}, timeout=30)


def test_http_api_needs_the_api_key(secured):
    router, workers = secured
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        r = completion(router, headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    assert workers.decode.served == []  # nothing reached a worker
    for path in ("/v1/models", "/tokenize", "/version", "/v1/chat/completions", "/no-such-route"):
        assert httpx.request("POST" if path in ("/tokenize", "/v1/chat/completions") else "GET",
                             router.url + path, timeout=10).status_code == 401, path
    assert httpx.get(router.url + "/health", timeout=10).status_code == 200  # open: probes
    assert httpx.get(router.url + "/metrics", timeout=10).status_code == 200  # open: Prometheus scrapes

    r = completion(router, {"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == TEXT
    client = openai.OpenAI(base_url=router.url + "/v1", api_key=KEY)
    assert client.completions.create(model=router.service.model.name, prompt="x", max_tokens=50).choices[0].text == TEXT
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=router.url + "/v1", api_key="nope").models.list()


def test_grpc_generate_needs_the_api_key_and_health_stays_open(secured):
    router, _ = secured
    request = generate_pb2.GenerateRequest(prompt="x", sampling=generate_pb2.SamplingParams(max_tokens=50))
    with grpc.insecure_channel(router.grpc_address) as channel:
        stub = generate_pb2_grpc.GenerateStub(channel)
        for metadata in (None, (("authorization", "Bearer wrong"),), (("authorization", f"Bearer {TOKEN}"),)):
            for call in (lambda md: stub.Generate(request, timeout=10, metadata=md),
                         lambda md: list(stub.GenerateStream(request, timeout=10, metadata=md)),
                         lambda md: stub.ListModels(generate_pb2.ListModelsRequest(), timeout=10, metadata=md)):
                with pytest.raises(grpc.RpcError) as err:
                    call(metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        answer = stub.Generate(request, timeout=30, metadata=(("authorization", f"Bearer {KEY}"),))
        assert answer.choices[0].text == TEXT
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_control_plane_needs_the_cluster_token(secured, served_model):
    router, workers = secured
    registry = router.service.registry
    known = set(registry.workers)
    worker_id = next(iter(known))
    for security in (ClusterSecurity(), ClusterSecurity(token="guess"), ClusterSecurity(token=KEY)):
        with security.channel(router.grpc_address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            calls = {
                "RegisterWorker": lambda: stub.RegisterWorker(router_pb2.RegisterWorkerRequest(
                    role=DECODE, address="127.0.0.1:1", fingerprint=FINGERPRINT), timeout=5),
                "Heartbeat": lambda: stub.Heartbeat(router_pb2.HeartbeatRequest(worker_id=worker_id), timeout=5),
                "Deregister": lambda: stub.Deregister(router_pb2.DeregisterRequest(worker_id=worker_id), timeout=5),
                "ListWorkers": lambda: stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5),
            }
            for name, call in calls.items():
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
                assert "cluster token" in err.value.details()
    assert set(registry.workers) == known  # nobody joined, nobody was removed
    # The real registration client gives up at once, naming the flag, instead of retrying until its timeout.
    registration = RouterRegistration(router.grpc_address, "decode", "127.0.0.1:1", fingerprint_from_proto(FINGERPRINT),
                                      WorkerStats, "intruder", 2.0, ClusterSecurity())
    with pytest.raises(RegistrationRefused, match="--cluster-token"):
        registration.start(timeout_s=30)
    with ClusterSecurity(token=TOKEN).channel(router.grpc_address) as channel:
        listed = router_pb2_grpc.RouterStub(channel).ListWorkers(router_pb2.ListWorkersRequest(), timeout=5)
        assert {w.worker_id for w in listed.workers} == known


def test_router_sends_the_cluster_token_to_workers_that_require_it(secured):
    router, workers = secured
    r = completion(router, {"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text  # Reserve, Stream and Prefill carried the token
    assert len(workers.decode.served) == 1 and len(workers.prefill.served) == 1
    decode_address = workers.processes[0].address
    with grpc.insecure_channel(decode_address) as channel:  # a caller without it is turned away
        with pytest.raises(grpc.RpcError) as err:
            worker_pb2_grpc.DecodeWorkerStub(channel).Reserve(
                worker_pb2.ReserveRequest(request_id="intruder", prompt_token_ids=[1, 2, 3]), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "intruder" not in workers.decode.served and workers.decode.used_blocks == 0


def test_mutual_tls_between_router_and_workers(start_router, served_model, tmp_path):
    ca = TestCA(tmp_path)
    router_tls = TLSFiles(*ca.issue("router"), str(ca.ca_path))
    router = start_router(security=ClusterSecurity(token=TOKEN, tls=router_tls))
    worker_tls = TLSFiles(*ca.issue("workers"), str(ca.ca_path))
    workers = ScriptedCluster(router, served_model, TEXT, security=ClusterSecurity(token=TOKEN, tls=worker_tls))
    try:
        client_tls = TLSFiles(*ca.issue("client"), str(ca.ca_path))
        with grpc.secure_channel(router.grpc_address, client_tls.channel_credentials()) as channel:
            answer = generate_pb2_grpc.GenerateStub(channel).Generate(
                generate_pb2.GenerateRequest(prompt="x", sampling=generate_pb2.SamplingParams(max_tokens=50)),
                timeout=30)
            assert answer.choices[0].text == TEXT  # router -> workers over mutual TLS too
        rogue_ca = TestCA(tmp_path, "rogue CA")
        for security in (ClusterSecurity(token=TOKEN),  # plaintext
                         ClusterSecurity(token=TOKEN, tls=TLSFiles(*rogue_ca.issue("rogue"), str(ca.ca_path)))):
            with security.channel(router.grpc_address) as channel:
                with pytest.raises(grpc.RpcError) as err:
                    router_pb2_grpc.RouterStub(channel).RegisterWorker(router_pb2.RegisterWorkerRequest(
                        role=DECODE, address="127.0.0.1:1", fingerprint=FINGERPRINT), timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake failed
        assert len(router.service.registry.workers) == 2
    finally:
        workers.stop()


@pytest.mark.slow  # two worker processes load the model: ~30 s on 2 cores
@pytest.mark.cluster
def test_worker_processes_take_the_token_from_the_environment(start_router):
    """`kvferry decode` as real processes: with KVFERRY_CLUSTER_TOKEN it joins a guarded router and its
    own server wants the token; with a wrong one it exits with code 2 at once, naming the flag."""
    import os
    import signal
    import subprocess
    import sys

    from waiting import wait_until

    router = start_router(security=ClusterSecurity(token=TOKEN))
    argv = [sys.executable, "-m", "kvferry.cli", "decode", "--router", router.grpc_address, "--port", "0",
            "--num-kv-blocks", "16", "--max-num-seqs", "2", "--max-model-len", "256", "--dtype", "bfloat16",
            "--no-warm-up", "--shutdown-grace", "1", "--name", "token-test"]

    def spawn(token: str) -> subprocess.Popen:
        env = {**os.environ, "KVFERRY_CLUSTER_TOKEN": token}
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    member, intruder = spawn(TOKEN), spawn("wrong")
    try:
        out, _ = intruder.communicate(timeout=120)
        assert intruder.returncode == 2 and "cluster token" in out and "KVFERRY_CLUSTER_TOKEN" in out, out
        assert wait_until(lambda: len(router.service.registry.workers) == 1, timeout_s=120)
        (worker,) = router.service.registry.workers.values()
        with grpc.insecure_channel(worker.address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                worker_pb2_grpc.DecodeWorkerStub(channel).GetStats(worker_pb2.StatsRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with ClusterSecurity(token=TOKEN).channel(worker.address) as channel:
            stats = worker_pb2_grpc.DecodeWorkerStub(channel).GetStats(worker_pb2.StatsRequest(), timeout=5)
            assert stats.total_kv_blocks == 16
        member.send_signal(signal.SIGTERM)
        assert member.wait(timeout=30) == 0
    finally:
        for p in (member, intruder):
            if p.poll() is None:
                p.kill()
                p.wait(10)
