"""Nothing a worker loads at run time compiles or waits on a lock: the first request after start succeeds.

A clean clone's first `kvferry serve` used to compile the C++ extensions inside its workers, under torch's
JIT build lock; a worker killed mid-build left that lock behind and every later KV transfer on the machine
waited on it until its deadline. Here torch's JIT cache holds a stale lock for every kvferry extension, and
the cluster starts once with an empty kernel cache (the torch paths run) and once with the built kernels;
each time a 1,000-token prompt is sent the moment the router answers, and must be served.
"""

from __future__ import annotations

import httpx
import pytest

from cluster_helpers import Serve, alive
from kvferry.kernels import build

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 100  # ~1,100 tokens


@pytest.mark.parametrize("kernel_cache", ["empty", "built"])
def test_first_long_request_is_served_past_stale_jit_locks(tmp_path, kernel_cache):
    torch_cache = tmp_path / "torch_extensions"
    for ext in build.EXTENSIONS:
        for sub in ("", "py311_cpu/"):  # where torch's JIT build looks, with and without its version folder
            (torch_cache / sub / ext.name).mkdir(parents=True, exist_ok=True)
            (torch_cache / sub / ext.name / "lock").write_text("")
    env = {"TORCH_EXTENSIONS_DIR": str(torch_cache)}
    if kernel_cache == "empty":
        env["KVFERRY_KERNEL_DIR"] = str(tmp_path / "empty")
    serve = Serve(env=env)
    try:
        r = httpx.post(serve.url + "/v1/completions", timeout=120,
                       json={"prompt": LONG_PROMPT, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] >= 1000
        assert r.json()["usage"]["completion_tokens"] == 4
    finally:
        output = serve.stop()
    assert serve.process.returncode == 0, output[-3000:]
    assert not [pid for pid in serve.pids if alive(pid)]
    if kernel_cache == "empty":
        assert "not built" in output  # said once per extension, with the command that builds it
        assert not (tmp_path / "empty").exists()  # and nothing was compiled into it
