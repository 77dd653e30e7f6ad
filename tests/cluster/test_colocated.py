"""`kvferry serve --colocated`: one worker does both phases behind the same router (the baseline that
disaggregation is compared against); same outputs as the single-process engine; SIGTERM stops it."""

from __future__ import annotations

import signal

import httpx
import pytest

from cluster_helpers import MAX_TOKENS, PROMPTS, Serve, alive
from kvferry.proto import router_pb2

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_colocated_serve_matches_the_engine_and_stops_cleanly(model_path, reference):
    serve = Serve("--colocated")
    try:
        assert [w.role for w in serve.workers()] == [router_pb2.WORKER_ROLE_COLOCATED]
        for prompt in PROMPTS[:2]:
            r = httpx.post(serve.url + "/v1/completions", json={"prompt": prompt, "max_tokens": MAX_TOKENS,
                                                               "temperature": 0}, timeout=120)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference[prompt].text
    finally:
        output = serve.stop(signal.SIGTERM)
    assert serve.process.returncode == 0, output[-3000:]
    assert not [pid for pid in serve.pids if alive(pid)]
