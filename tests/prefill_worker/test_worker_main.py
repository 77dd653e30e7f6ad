"""`kvferry decode/prefill --router ADDR` as real processes against a recording Router service on
loopback: registration with a fingerprint and capacity, heartbeats, clean SIGTERM with Deregister, and
a refused registration ending the process with the router's message."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest

from kvferry.engine.config import default_model_path
from kvferry.proto import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

WORKER_ARGS = ["--num-kv-blocks", "32", "--max-num-seqs", "4", "--max-model-len", "256", "--dtype", "bfloat16",
               "--shutdown-grace", "1"]


class RecordingRouter(router_pb2_grpc.RouterServicer):
    def __init__(self, refuse: str | None = None):
        self.refuse = refuse
        self.registered: list[router_pb2.RegisterWorkerRequest] = []
        self.heartbeats = 0
        self.deregistered: list[router_pb2.DeregisterRequest] = []
        self.event = threading.Event()

    def RegisterWorker(self, request, context):
        if self.refuse:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, self.refuse)
        self.registered.append(request)
        self.event.set()
        return router_pb2.RegisterWorkerResponse(worker_id="w1", heartbeat_interval_ms=100, lease_ms=3000)

    def Heartbeat(self, request, context):
        self.heartbeats += 1
        return router_pb2.HeartbeatResponse(known=True, heartbeat_interval_ms=100)

    def Deregister(self, request, context):
        self.deregistered.append(request)
        return router_pb2.DeregisterResponse()


@pytest.fixture
def router():
    def start(refuse=None):
        servicer = RecordingRouter(refuse)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        started.append(server)
        return servicer, f"127.0.0.1:{port}"

    started: list[grpc.Server] = []
    if not os.path.isfile(default_model_path()):
        pytest.skip("default model not installed")
    yield start
    for server in started:
        server.stop(grace=None)


def spawn(role: str, router_addr: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kvferry.cli", role, "--router", router_addr, "--port", "0", *WORKER_ARGS, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_decode_main_registers_heartbeats_and_shuts_down_cleanly(router):
    servicer, address = router()
    proc = spawn("decode", address)
    try:
        assert servicer.event.wait(120), "the decode worker did not register"
        reg = servicer.registered[0]
        assert reg.role == router_pb2.WORKER_ROLE_DECODE and reg.kv_address == reg.address
        assert reg.fingerprint.num_layers == 30 and reg.fingerprint.dtype == "bfloat16"
        assert reg.fingerprint.block_size == 16 and reg.capacity.total_kv_blocks == 32
        with grpc.insecure_channel(reg.address) as ch:
            stats = worker_pb2_grpc.DecodeWorkerStub(ch).GetStats(worker_pb2.StatsRequest(), timeout=10)
        assert stats.total_kv_blocks == 32 and stats.used_kv_blocks == 0
        end = time.monotonic() + 10
        while servicer.heartbeats < 2 and time.monotonic() < end:
            time.sleep(0.1)
        assert servicer.heartbeats >= 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert [d.draining for d in servicer.deregistered] == [True, False]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_prefill_main_exits_with_the_routers_refusal(router):
    servicer, address = router(refuse="dtype: cluster 'float32', worker 'bfloat16'")
    proc = spawn("prefill", address)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 2
    assert "dtype: cluster 'float32', worker 'bfloat16'" in out
