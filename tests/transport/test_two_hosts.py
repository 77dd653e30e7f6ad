"""Two hosts on one machine: a decode worker (``kvferry decode``) in one Linux network namespace and a
prefill worker in another, joined by a veth pair, KV over tcp, gloo and grpc across it (and auto, which
must skip shm: the two sides share a kernel, and so a boot id, but not an abstract socket namespace).
Greedy output through each equals the decode worker's own prefill of the same prompt.

The test makes and removes the namespaces and the link itself (``ip netns``, ``ip link``), so it needs
root; it is skipped with the reason where they cannot be made. Only the two namespaces (their veth ends
and loopbacks) carry its traffic. Every wait is bounded."""

from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
DRIVER = os.path.join(HERE, "netns_prefill_driver.py")
SUFFIX = f"{os.getpid() % 100000}"
NS_PREFILL, NS_DECODE = f"kvf-prefill-{SUFFIX}", f"kvf-decode-{SUFFIX}"
VETH_PREFILL, VETH_DECODE = f"kvfp{SUFFIX}", f"kvfd{SUFFIX}"  # at most 15 characters
PREFILL_IP, DECODE_IP = "10.211.7.1", "10.211.7.2"
DECODE_PORT = 50161  # inside the decode namespace, where nothing else listens
TRANSPORTS = ["tcp", "gloo", "grpc", "auto"]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def namespaces_unavailable() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"kvf-probe-{SUFFIX}"
    try:
        ip("netns", "add", probe)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        return f"cannot create a network namespace here: {getattr(e, 'stderr', b'').decode().strip() or e}"
    ip("netns", "del", probe)
    return None


@pytest.fixture
def two_hosts():
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    made = []
    try:
        for ns in (NS_PREFILL, NS_DECODE):
            ip("netns", "add", ns)
            made.append(ns)
        ip("link", "add", VETH_PREFILL, "type", "veth", "peer", "name", VETH_DECODE)
        for ns, dev, addr in ((NS_PREFILL, VETH_PREFILL, PREFILL_IP), (NS_DECODE, VETH_DECODE, DECODE_IP)):
            ip("link", "set", dev, "netns", ns)
            ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", dev, "up")
        yield
    finally:
        for ns in made:  # deleting a namespace deletes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def in_namespace(ns: str, *argv: str) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for_line(proc: subprocess.Popen, marker: str, timeout_s: float) -> list[str]:
    """Lines of ``proc``'s output up to the first containing ``marker``; fails after ``timeout_s``."""
    import time

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    lines, end = [], time.monotonic() + timeout_s
    while time.monotonic() < end:
        if not sel.select(max(end - time.monotonic(), 0.01)):
            break
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError(f"no {marker!r} within {timeout_s}s:\n" + "".join(lines[-30:]))


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.slow
def test_kv_over_tcp_gloo_and_grpc_between_two_network_namespaces(two_hosts, model_path):
    kvferry = os.path.join(os.path.dirname(sys.executable), "kvferry")
    decode = in_namespace(
        NS_DECODE, kvferry, "decode", "--host", DECODE_IP, "--port", str(DECODE_PORT), "--kv-transport", "auto",
        "--dtype", "bfloat16", "--num-kv-blocks", "48", "--max-model-len", "512", "--no-warm-up",
    )
    driver = None
    try:
        # The prefill side loads its model meanwhile; its first call waits for the decode worker.
        driver = in_namespace(NS_PREFILL, sys.executable, DRIVER, f"{DECODE_IP}:{DECODE_PORT}", *TRANSPORTS)
        wait_for_line(decode, "serving gRPC on", timeout_s=120)
        out, _ = driver.communicate(timeout=180)
    finally:
        if driver is not None:
            stop(driver)
        stop(decode)
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert driver.returncode == 0, out[-3000:]
    assert decode.returncode == 0  # SIGTERM: drained, its pairs torn down, a clean exit
    by_transport = {r["transport"]: r for r in results if "transport" in r}
    assert set(by_transport) == set(TRANSPORTS), out[-3000:]
    for transport, r in by_transport.items():
        expected = "tcp" if transport == "auto" else transport  # auto: shm skipped, another namespace
        assert r["routes"] == {"decode": expected}, r
        assert r["tokens"] == r["reference"] and r["tokens"][0] == r["first"], r
    offers = by_transport["tcp"]["offers"]
    assert offers["tcp"].startswith(f"{DECODE_IP}:") and offers["gloo"].startswith(f"{DECODE_IP}:")  # the veth
    assert results[-1] == {"prefill_used_blocks": 0, "decode_used_blocks": 0}
