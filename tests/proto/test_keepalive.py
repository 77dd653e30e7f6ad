"""Keepalive finds a peer that stopped answering: a server process frozen with SIGSTOP (its TCP
connection still open, so the kernel alone would never tell) fails the client's open stream within
keepalive time + timeout, and the cluster's channel and server options carry the settings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvferry.proto.cluster_security import ClusterSecurity
from kvferry.proto.keepalive import KEEPALIVE_TIME_S, KEEPALIVE_TIMEOUT_S, client_keepalive

SERVER = """
import sys, time
from concurrent import futures
import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc
from kvferry.proto.keepalive import server_keepalive
server = grpc.server(futures.ThreadPoolExecutor(4), options=server_keepalive(time_s=1.0))
health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
print(server.add_insecure_port("127.0.0.1:0"), flush=True)
server.start()
time.sleep(120)
"""


def frozen_stream_fails_after(make_channel, server_time_s: float) -> float:
    """Seconds from SIGSTOP of the server process to the failure of a quiet stream open to it."""
    server = subprocess.Popen([sys.executable, "-c", SERVER.replace("1.0", str(server_time_s))],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        channel = make_channel(f"127.0.0.1:{port}")
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING  # a long-lived, quiet stream
        os.kill(server.pid, signal.SIGSTOP)
        start = time.monotonic()
        try:
            next(watch)
            raise AssertionError("the stream went on")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        channel.close()
        return time.monotonic() - start
    finally:
        os.kill(server.pid, signal.SIGCONT)
        server.kill()
        server.wait(10)


def test_a_stream_to_a_frozen_server_fails_within_keepalive_time_and_timeout():
    took = frozen_stream_fails_after(
        lambda address: grpc.insecure_channel(address, options=client_keepalive(time_s=1.0, timeout_s=1.0)), 1.0)
    assert took < 5  # a ping within 1 s, 1 s for its answer: not the stream's 60 s deadline


@pytest.mark.slow
def test_the_cluster_channels_find_a_frozen_peer_in_seconds():
    took = frozen_stream_fails_after(ClusterSecurity().channel, KEEPALIVE_TIME_S)
    assert took < KEEPALIVE_TIME_S + KEEPALIVE_TIMEOUT_S + 5
