"""`kvferry serve` with more worker threads than cores starts its workers one at a time, each once the
last has registered (router/launch_serve.py, ``Cluster.stagger``), so their warm-ups do not time
steps against each other. The count it waits on, read from a real router's /health as real workers
register; and when serve staggers."""

from __future__ import annotations

import argparse

from kvferry.router import launch_serve
from kvferry.router.serve_common import registered_workers
from real_workers import registered
from waiting import wait_until


def test_the_registered_count_follows_real_workers_as_they_register(start_router, decode_and_prefill):
    decode, prefill = decode_and_prefill
    router = start_router()
    assert registered_workers(router.url) == 0  # a 503 body still says how many
    with registered(router.grpc_address, decode):
        assert wait_until(lambda: registered_workers(router.url) == 1, timeout_s=30)
        with registered(router.grpc_address, prefill):
            assert wait_until(lambda: registered_workers(router.url) == 2, timeout_s=30)
    assert registered_workers("http://127.0.0.1:9") == 0  # nothing answers: 0, not an error


def _cluster(*argv: str):
    parser = argparse.ArgumentParser()
    launch_serve.add_arguments(parser)
    return launch_serve.build_cluster(parser.parse_args(["--device", "cpu", *argv]))


def test_serve_staggers_only_when_the_threads_outnumber_the_cores(monkeypatch):
    monkeypatch.setattr(launch_serve.os, "cpu_count", lambda: 2)
    assert not _cluster().stagger  # the default split: one thread each
    assert not _cluster("--colocated", "--decode-threads", "2").stagger
    assert _cluster("--prefill-threads", "2", "--decode-threads", "1").stagger  # 3 threads on 2 cores
    assert _cluster("--threads", "2").stagger
