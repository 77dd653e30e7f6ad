"""Prometheus metrics of the router, on a registry of its own (no process-global state).

Request-level figures are observed as requests run (TTFT, inter-token latency, end-to-end latency,
tokens, request outcomes, KV transfers as the prefill workers report them, and each request's phases:
``kvferry_router_request_phase_seconds{model_name,phase}``, phases as in timings.py). Where prefill ran
(``kvferry_router_prefill_decisions_total{decision,reason}``, placement.py) and requests moved after a
worker was lost (``kvferry_router_migrations_total{cause}``) are read from the dispatcher's counts at
scrape time. Worker-level figures (KV blocks used/free per worker, queued prefill tokens, cumulative
transfer bytes and seconds), KV-transfer failures per worker pair
(``kvferry_router_pair_failures_total{prefill,decode,reason}``) and the pairs excluded for them
(``kvferry_router_pairs_excluded``, pair_health.py) are read from the worker registry at scrape time by
a collector, so they are never staler than the last heartbeat.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvferry.router.admission import AdmissionQueue
from kvferry.router.placement import DECISIONS
from kvferry.router.registry import WorkerRegistry

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30, 60)
# A home lab's KV may cross ordinary Ethernet, and its requests may queue for a minute: up to 60 s.
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
PHASE_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300,
)


# Per-worker series: (family, name after "kvferry_worker_", help, value from (worker, registry clock now)).
WORKER_SERIES = (
    (GaugeMetricFamily, "kv_blocks_total", "KV cache blocks of the worker", lambda w, now: w.capacity.total_kv_blocks),
    (GaugeMetricFamily, "kv_blocks_used", "KV cache blocks used or reserved",
     lambda w, now: w.capacity.total_kv_blocks - w.capacity.free_kv_blocks),
    (GaugeMetricFamily, "kv_blocks_free", "KV cache blocks free", lambda w, now: w.capacity.free_kv_blocks),
    (GaugeMetricFamily, "running_requests", "requests running on the worker",
     lambda w, now: w.capacity.running_requests),
    (GaugeMetricFamily, "waiting_requests", "requests waiting on the worker",
     lambda w, now: w.capacity.waiting_requests),
    (GaugeMetricFamily, "queued_prefill_tokens", "prompt tokens queued for prefill",
     lambda w, now: w.capacity.queued_prefill_tokens),
    (GaugeMetricFamily, "seconds_since_heartbeat", "age of the worker's last heartbeat",
     lambda w, now: now - w.last_heartbeat),
    (GaugeMetricFamily, "engine_busy_seconds", "time the worker's engine loop has spent in its current step (0 idle)",
     lambda w, now: w.capacity.engine_busy_ms / 1000),
    (CounterMetricFamily, "kv_transfer_bytes_sent", "KV bytes pushed to decode workers",
     lambda w, now: w.capacity.kv_bytes_sent_total),
    (CounterMetricFamily, "kv_transfer_bytes_received", "KV bytes received from prefill workers",
     lambda w, now: w.capacity.kv_bytes_received_total),
    (CounterMetricFamily, "kv_transfer_seconds", "time spent in KV transfers",
     lambda w, now: w.capacity.kv_transfer_seconds_total),
    (CounterMetricFamily, "kv_transfers", "completed KV transfers", lambda w, now: w.capacity.kv_transfers_total),
    (CounterMetricFamily, "requests_routed", "requests the router sent to the worker",
     lambda w, now: w.requests_routed_total),
)


class _WorkerCollector(Collector):
    def __init__(
        self,
        workers: WorkerRegistry,
        admission: AdmissionQueue,
        running: Callable[[], int],
        decisions: Mapping[tuple[str, str], int],
        migrations: Mapping[str, int],
    ):
        self.workers = workers
        self.admission = admission
        self.running = running
        self.decisions = decisions
        self.migrations = migrations

    def collect(self) -> Iterable[Metric]:
        yield from self._worker_metrics()
        yield from self._router_metrics()
        yield from self._pair_metrics()

    def _pair_metrics(self) -> Iterable[Metric]:
        """KV-transfer failures per (prefill, decode) pair and the pairs out of placement (pair_health.py)."""
        pairs = self.workers.pairs
        failures = CounterMetricFamily(
            "kvferry_router_pair_failures", "KV transfers that failed between a prefill and a decode worker "
            "(worker names), by the transport's reason", labels=["prefill", "decode", "reason"],
        )
        for (prefill, decode, reason), n in sorted(pairs.failures_total.items()):
            failures.add_metric([prefill, decode, reason], n)
        yield failures
        yield GaugeMetricFamily(
            "kvferry_router_pairs_excluded", "prefill-decode pairs left out of placement for a cool-down after "
            "KV-transfer failures in a row", value=len(pairs.excluded_pairs()),
        )

    def _worker_metrics(self) -> Iterable[Metric]:
        """One series per registered worker, from its last heartbeat and the router's own counts."""
        labels = ["worker_id", "role", "address"]
        families = [(kind(f"kvferry_worker_{name}", doc, labels=labels), value)
                    for kind, name, doc, value in WORKER_SERIES]
        now = self.workers.clock()
        for w in self.workers.workers.values():
            lv = [w.worker_id, w.role.name.lower(), w.address]
            for family, value in families:
                family.add_metric(lv, value(w, now))
        yield from (family for family, _ in families)

    def _router_metrics(self) -> Iterable[Metric]:
        workers = GaugeMetricFamily("kvferry_router_workers", "registered workers", labels=["role"])
        for role in ("prefill", "decode", "colocated"):
            workers.add_metric([role], sum(w.role.name.lower() == role for w in self.workers.workers.values()))
        yield workers
        yield GaugeMetricFamily(
            "kvferry_router_requests_queued", "requests waiting for KV room on a decode worker",
            value=self.admission.num_waiting,
        )
        yield CounterMetricFamily(
            "kvferry_router_requests_delayed", "requests that had to wait for KV room",
            value=self.admission.num_delayed_total,
        )
        rejected = CounterMetricFamily(
            "kvferry_router_requests_rejected", "requests refused (429) because their TTFT target could not be met",
            labels=["where"],
        )
        for where in ("router_queue", "prefill_worker", "decode_worker"):  # every series from the start
            rejected.add_metric([where], self.admission.rejections[where])
        yield rejected
        yield GaugeMetricFamily("kvferry_router_requests_running", "requests in flight", value=self.running())
        placed = CounterMetricFamily(
            "kvferry_router_prefill_decisions", "where requests were prefilled: a prefill worker (remote) "
            "or their decode worker (local), and why", labels=["decision", "reason"],
        )
        for key in dict.fromkeys([*DECISIONS, *self.decisions]):
            placed.add_metric(list(key), self.decisions.get(key, 0))
        yield placed
        moved = CounterMetricFamily(
            "kvferry_router_migrations", "requests moved to other workers after a worker was lost under them, "
            "by the lost worker's role; exhausted: failed with no migration left", labels=["cause"],
        )
        for cause in ("decode_worker", "prefill_worker", "exhausted"):
            moved.add_metric([cause], self.migrations.get(cause, 0))
        yield moved


class RouterMetrics:
    def __init__(
        self,
        workers: WorkerRegistry,
        admission: AdmissionQueue,
        running: Callable[[], int],
        decisions: Mapping[tuple[str, str], int] | None = None,
        migrations: Mapping[str, int] | None = None,
    ):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kvferry_router_requests", "finished requests by API and outcome", ["api", "outcome"], registry=r
        )
        self.ttft = Histogram(
            "kvferry_router_time_to_first_token_seconds", "arrival to first token, per choice",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "kvferry_router_inter_token_latency_seconds", "time between a choice's successive tokens",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "kvferry_router_e2e_request_latency_seconds", "arrival to last token",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter("kvferry_router_prompt_tokens", "prompt tokens", registry=r)
        self.generation_tokens = Counter("kvferry_router_generation_tokens", "generated tokens", registry=r)
        self.kv_transfer_bytes = Counter(
            "kvferry_router_kv_transfer_bytes", "KV bytes moved prefill -> decode (as prefill reports)", registry=r
        )
        self.kv_transfer_seconds = Histogram(
            "kvferry_router_kv_transfer_seconds", "KV transfer time per request (first byte to ack)",
            buckets=TRANSFER_BUCKETS, registry=r,
        )
        self.phase_seconds = Histogram(
            "kvferry_router_request_phase_seconds", "time each finished request spent in each phase "
            "(router_queue, reserve, prefill_queue, prefill_compute, kv_transfer, first_token, decode, e2e)",
            ["model_name", "phase"], buckets=PHASE_BUCKETS, registry=r,
        )
        r.register(_WorkerCollector(workers, admission, running, decisions if decisions is not None else {},
                                    migrations if migrations is not None else {}))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
