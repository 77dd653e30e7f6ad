"""`kvferry status` against a running router with registered workers (scripted ones: real gRPC servers
on loopback that report known capacities): the table and the JSON show each worker's role, KV use, load
and state; the cluster token is honoured, from the flag or the environment."""

from __future__ import annotations

import json

import pytest

from kvferry.cli import main
from kvferry.proto import router_pb2
from kvferry.proto.cluster_security import ClusterSecurity
from router_test_workers import ScriptedDecode, ScriptedPrefill, WorkerProcess

TOKEN = "status-token"


pytestmark = pytest.mark.usefixtures("restore_logging")  # `kvferry` sets up the root logger for its command


@pytest.fixture
def cluster(start_router):
    router = start_router(security=ClusterSecurity(token=TOKEN))
    decode = ScriptedDecode([1, 2], total_blocks=64)
    decode.used_blocks = 16
    security = ClusterSecurity(token=TOKEN)
    processes = [WorkerProcess(decode, router_pb2.WORKER_ROLE_DECODE, router.grpc_address, security=security)]
    processes.append(WorkerProcess(ScriptedPrefill({processes[0].address: decode}), router_pb2.WORKER_ROLE_PREFILL,
                                   router.grpc_address, security=security))
    for p in processes:
        p.register()
    yield router, processes
    for p in processes:
        p.stop()


def test_status_lists_the_workers_with_their_kv_use_and_load(cluster, capsys, monkeypatch):
    router, (decode, prefill) = cluster
    monkeypatch.setenv("KVFERRY_CLUSTER_TOKEN", TOKEN)
    assert main(["status", "--router", router.grpc_address]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"router {router.grpc_address}: 1 prefill, 1 decode, 0 colocated worker(s)"
    assert lines[1].startswith("model: SmolLM2-135M-Instruct.Q4_1 (float32 KV, 16-token blocks, 30 layers")
    assert lines[2].split() == ["NAME", "ROLE", "ADDRESS", "DEVICE", "KV", "USED", "RUNNING", "WAITING", "ROUTED",
                                "HEARTBEAT", "STATE"]
    rows = {line.split()[1]: line.split() for line in lines[3:]}
    assert rows["decode"][2] == decode.address and rows["decode"][3] == "-"  # scripted: no device said
    assert rows["decode"][4:6] == ["16/64", "(25%)"]
    assert rows["decode"][6] == "0/64" and rows["decode"][-1] == "serving"
    assert rows["prefill"][2] == prefill.address and rows["prefill"][-1] == "serving"

    assert main(["status", "--router", router.grpc_address, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["model"]["block_size"] == 16
    by_role = {w["role"]: w for w in status["workers"]}
    assert by_role["decode"]["kv_blocks_used"] == 16 and by_role["decode"]["kv_blocks_total"] == 64
    assert by_role["decode"]["max_running"] == 64 and by_role["prefill"]["address"] == prefill.address
    assert all(0 <= w["heartbeat_age_s"] < 5 for w in status["workers"])


def test_status_needs_the_cluster_token(cluster, capsys, monkeypatch):
    router, _ = cluster
    monkeypatch.delenv("KVFERRY_CLUSTER_TOKEN", raising=False)
    assert main(["status", "--router", router.grpc_address]) == 1
    err = capsys.readouterr().err
    assert "UNAUTHENTICATED" in err and "--cluster-token or $KVFERRY_CLUSTER_TOKEN" in err
    assert main(["status", "--router", router.grpc_address, "--cluster-token", "wrong"]) == 1
    assert main(["status", "--router", router.grpc_address, "--cluster-token", TOKEN, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["workers"]) == 2


def test_status_of_an_unreachable_router_is_a_clear_error(capsys):
    assert main(["status", "--router", "127.0.0.1:1", "--timeout", "1"]) == 1
    assert "router 127.0.0.1:1: UNAVAILABLE" in capsys.readouterr().err


def test_status_shows_the_device_a_worker_registered_with(cluster, capsys, monkeypatch):
    """Through the workers' own registration (worker_common/registration.py), as kvferry decode sends it."""
    from kvferry.common.worker import WorkerStats
    from kvferry.proto.convert import fingerprint_from_proto
    from kvferry.worker_common.registration import RouterRegistration

    router, (decode, _) = cluster
    registration = RouterRegistration(
        router.grpc_address, "colocated", "127.0.0.1:9", fingerprint_from_proto(decode.fingerprint),
        lambda: WorkerStats(total_kv_blocks=8, free_kv_blocks=8), "gpu-box", security=ClusterSecurity(token=TOKEN),
        device="cuda:0 (NVIDIA H200)")
    registration.start(10)
    try:
        monkeypatch.setenv("KVFERRY_CLUSTER_TOKEN", TOKEN)
        assert main(["status", "--router", router.grpc_address]) == 0
        row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("gpu-box"))
        assert row.split()[1:7] == ["colocated", "127.0.0.1:9", "cuda:0", "(NVIDIA", "H200)", "0/8"], row
        assert main(["status", "--router", router.grpc_address, "--json"]) == 0
        by_name = {w["name"]: w for w in json.loads(capsys.readouterr().out)["workers"]}
        assert by_name["gpu-box"]["device"] == "cuda:0 (NVIDIA H200)"
    finally:
        registration.stop()
