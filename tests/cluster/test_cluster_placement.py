"""Conditional disaggregation and phase timings in a real `kvferry serve` (router + prefill + decode
processes, default model): a short prompt is prefilled by the decode worker itself, a long one by the
prefill worker (the workers' own KV transfer counts say which), both give the single-process engine's
greedy text, and each request's phase timings come back, add up, and reach /metrics and the log."""

from __future__ import annotations

import re

import httpx
import pytest

from cluster_helpers import MAX_TOKENS, PROMPTS, Serve, alive, worker_stats
from kvferry.proto import router_pb2

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

LONG_PROMPT = " ".join(f"Item {i} is a {c} box." for i, c in enumerate(["red", "green", "blue"] * 12))  # ~240 tokens
SLACK = 1e-4  # timings are rounded to microseconds


@pytest.fixture(scope="module")
def serve(model_path):
    s = Serve("--local-prefill-max-tokens", "32")
    yield s
    output = s.stop()
    assert s.process.returncode == 0, output[-3000:]
    assert not [pid for pid in s.pids if alive(pid)]


def kv_transfers(serve) -> dict[int, int]:
    """Role -> the worker's own count of KV transfers (sent by prefill, received by decode)."""
    return {w.role: worker_stats(w.address, w.role).kv_transfers_total for w in serve.workers()}


def completion(serve, prompt: str) -> dict:
    r = httpx.post(serve.url + "/v1/completions", json={"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0},
                   timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["x-kvferry-timings"]
    return r.json()


def check_timings(t: dict[str, float], remote: bool) -> None:
    assert all(v >= 0 for v in t.values()), t
    assert {"router_queue", "reserve", "prefill_queue", "prefill_compute", "first_token", "decode", "e2e"} <= set(t), t
    assert ("kv_transfer" in t) == remote, t
    # A remote prefill starts once Reserve answered; a local one starts inside the Reserve call.
    sequential = t["router_queue"] + (t["reserve"] if remote else 0) + t["prefill_queue"] + t["prefill_compute"]
    assert sequential <= t["first_token"] + SLACK, t
    assert t["router_queue"] + t["reserve"] <= t["first_token"] + SLACK, t
    assert t["first_token"] + t["decode"] == pytest.approx(t["e2e"], abs=SLACK), t
    assert t["prefill_compute"] > 0 and t["decode"] > 0, t


def test_short_prompt_on_the_decode_worker_long_prompt_on_the_prefill_worker(serve, reference):
    prefill, decode = router_pb2.WORKER_ROLE_PREFILL, router_pb2.WORKER_ROLE_DECODE
    before = kv_transfers(serve)
    short = completion(serve, PROMPTS[0])
    assert short["choices"][0]["text"] == reference[PROMPTS[0]].text  # the decode engine prefilled it
    assert kv_transfers(serve) == before  # no KV moved
    check_timings(short["kvferry_timings"], remote=False)

    long = completion(serve, LONG_PROMPT)
    after = kv_transfers(serve)
    assert after[prefill] == before[prefill] + 1 and after[decode] == before[decode] + 1
    check_timings(long["kvferry_timings"], remote=True)

    metrics = httpx.get(serve.url + "/metrics", timeout=10).text
    assert re.search(r'kvferry_router_prefill_decisions_total\{decision="local",reason="short_prompt"\} 1\.0', metrics)
    assert re.search(r'kvferry_router_prefill_decisions_total\{decision="remote",reason="default"\} 1\.0', metrics)
    for phase in ("router_queue", "prefill_compute", "kv_transfer", "decode", "e2e"):
        assert re.search(rf'kvferry_router_request_phase_seconds_bucket\{{le="60\.0",model_name="[^"]+",phase="{phase}"\}} [1-9]',
                         metrics), phase
    log = serve.output()
    for body in (short, long):
        assert re.search(rf"request {body['id']} length, prefill (local|remote) \(\w+\): router_queue=", log)
