"""deploy/grafana/kvferry.json is a valid dashboard, and every metric it queries is one the router
exports (names as they appear on /metrics: ``_total``, ``_bucket``, ``_sum``, ``_count``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from kvferry.common.fingerprint import KVFingerprint
from kvferry.common.worker import WorkerRole, WorkerStats
from kvferry.router.admission import AdmissionConfig, AdmissionQueue
from kvferry.router.registry import WorkerRegistry
from kvferry.router.request import ServedModel
from kvferry.router.service import RouterService

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "kvferry.json"


def exported_sample_names() -> set[str]:
    """Every sample name of the router's /metrics once each labelled metric has a series."""
    registry = WorkerRegistry()
    registry.register(WorkerRole.DECODE, "127.0.0.1:7001", KVFingerprint(block_size=16), WorkerStats(total_kv_blocks=8))
    admission = AdmissionQueue(AdmissionConfig())
    service = RouterService(ServedModel("m", None, 10, 10), registry, admission)
    service.metrics.requests.labels("chat", "ok").inc()
    text = service.metrics.exposition().decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_dashboard_is_valid_and_queries_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 30
    graphs = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(graphs) >= 10
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for p in graphs for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    queried = {name for e in exprs for name in re.findall(r"\bkvferry_[a-z_]+\b", e)}
    exported = exported_sample_names()
    assert queried and not queried - exported, sorted(queried - exported)
    # The panels that answer "where did the time go" are there.
    assert "kvferry_router_request_phase_seconds_bucket" in queried
    assert "kvferry_router_prefill_decisions_total" in queried
