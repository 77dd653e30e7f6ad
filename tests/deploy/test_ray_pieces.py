"""The parts of the Ray deployment that need no cluster: a worker command line hosted by
``WorkerProcess`` (its start failure reported with the worker's own words), what one worker reserves,
and `kvferry serve --ray` / `kvferry scale` refusing bad input with one line before touching Ray."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from kvferry.deploy.ray_args import pool_size
from kvferry.deploy.ray_deployment import PoolSpec
from kvferry.deploy.worker_process import WorkerProcess, WorkerStartError


def test_a_worker_that_cannot_start_is_reported_with_its_output(tmp_path):
    process = WorkerProcess(["decode", "--model", str(tmp_path / "missing.gguf"), "--router", "127.0.0.1:1"])
    with pytest.raises(WorkerStartError, match=r"(?s)`kvferry decode` exited with code 2.*missing\.gguf"):
        process.start(timeout_s=120)
    assert process.wait_exit() == 2


def test_a_worker_reserves_its_role_cpus_and_gpu_on_one_node():
    assert PoolSpec("decode", (), None, cpus=2, gpus=1).bundle() == {"kvferry_decode": 1, "CPU": 2, "GPU": 1}
    assert PoolSpec("prefill", (), 1).bundle() == {"kvferry_prefill": 1, "CPU": 1}


def test_pool_sizes():
    assert pool_size("auto") is None and pool_size("3") == 3
    for bad in ("-1", "two"):
        with pytest.raises(argparse.ArgumentTypeError):
            pool_size(bad)


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvferry.cli", *argv], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("argv, message", [
    (["--colocated"], "--colocated is not supported with --ray"),
    (["--device", "cuda:1"], "use --device cuda (or auto), not cuda:N"),
    (["--ray-address", "127.0.0.1:1"], "no Ray cluster answers at 127.0.0.1:1"),
    (["--kv-cache-bytes", "1000000", "--gpu-memory-utilization", "0.5"], "both size the KV cache"),
])
def test_serve_ray_refuses_bad_input_before_starting_anything(argv, message):
    result = run_cli("serve", "--ray", *argv)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_scale_without_a_cluster_says_so():
    result = run_cli("scale", "--decode", "1", "--ray-address", "127.0.0.1:1")
    assert result.returncode == 2 and "no Ray cluster answers at 127.0.0.1:1" in result.stderr
    result = run_cli("scale", "--decode", "several")
    assert result.returncode == 2 and "expected a number of workers or auto" in result.stderr


def test_role_thread_counts_reach_each_pool_under_ray():
    from kvferry.deploy.ray_serve import pool_specs, worker_env
    from kvferry.router import launch_serve

    parser = argparse.ArgumentParser()
    launch_serve.add_arguments(parser)
    args = parser.parse_args(["--ray", "--device", "cpu", "--worker-cpus", "1", "--prefill-threads", "2"])
    specs = {spec.role: spec for spec in pool_specs(args, "127.0.0.1:1")}
    assert dict(specs["prefill"].env) == {"KVFERRY_NUM_THREADS": "2"} and specs["decode"].env == ()
    env = worker_env(args)
    assert env["KVFERRY_NUM_THREADS"] == "1"  # the decode pool's, from --worker-cpus
    assert specs["prefill"].worker_env(env)["KVFERRY_NUM_THREADS"] == "2"
    assert specs["decode"].worker_env(env)["KVFERRY_NUM_THREADS"] == "1"
