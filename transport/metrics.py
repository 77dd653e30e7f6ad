"""KV transfer figures per worker pair and data plane, and their Prometheus export on the worker.

``PairStats`` is what both ends record: the prefill worker's sender per decode peer, the decode
worker's receiver per sending prefill worker, each labelled with the transport that carried the bytes.
``TransportCollector`` exports them (``kvferry <role> --metrics-port``):

    kvferry_kv_transport_info{peer, transport}                      1 for the pair's current transport
    kvferry_kv_transfers_total{peer, transport}                     completed transfers
    kvferry_kv_transfer_failures_total{peer, transport}
    kvferry_kv_transfer_bytes_total{peer, transport}
    kvferry_kv_transfer_seconds_total{peer, transport}              open to acknowledgement (sender),
                                                                    header to trailer (receiver)
    kvferry_kv_transfer_throughput_bytes_per_second{peer, transport}  the last transfer's

so a slow path shows up as a transport label and a throughput, never silently.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class PairFigures:
    transfers: int = 0
    failures: int = 0
    bytes: int = 0
    seconds: float = 0.0
    last_throughput: float = 0.0  # bytes per second of the last completed transfer


class PairStats:
    """Thread-safe figures keyed by (peer, transport); ``route`` is each peer's current transport."""

    def __init__(self):
        self._lock = threading.Lock()
        self._figures: dict[tuple[str, str], PairFigures] = {}
        self._routes: dict[str, str] = {}

    def set_route(self, peer: str, transport: str) -> None:
        with self._lock:
            self._routes[peer] = transport
            self._figures.setdefault((peer, transport), PairFigures())

    def record(self, peer: str, transport: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            f = self._figures.setdefault((peer, transport), PairFigures())
            f.transfers += 1
            f.bytes += nbytes
            f.seconds += seconds
            f.last_throughput = nbytes / seconds if seconds > 0 else 0.0
            self._routes[peer] = transport

    def record_failure(self, peer: str, transport: str) -> None:
        with self._lock:
            self._figures.setdefault((peer, transport), PairFigures()).failures += 1

    def snapshot(self) -> tuple[dict[tuple[str, str], PairFigures], dict[str, str]]:
        with self._lock:
            figures = {k: PairFigures(**vars(v)) for k, v in self._figures.items()}
            return figures, dict(self._routes)


class TransportCollector:
    """A prometheus_client collector over one worker's ``PairStats``."""

    def __init__(self, stats: PairStats, role: str):
        self.stats = stats
        self.role = role  # "sender" (prefill) or "receiver" (decode): says which end measured

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        figures, routes = self.stats.snapshot()
        labels = ["role", "peer", "transport"]
        info = GaugeMetricFamily("kvferry_kv_transport_info", "the transport each KV peer uses now", labels=labels)
        for peer, transport in sorted(routes.items()):
            info.add_metric([self.role, peer, transport], 1.0)
        families = [
            (CounterMetricFamily, "kvferry_kv_transfers", "completed KV transfers", "transfers"),
            (CounterMetricFamily, "kvferry_kv_transfer_failures", "failed KV transfers", "failures"),
            (CounterMetricFamily, "kvferry_kv_transfer_bytes", "KV bytes moved", "bytes"),
            (CounterMetricFamily, "kvferry_kv_transfer_seconds", "time spent in completed KV transfers", "seconds"),
            (GaugeMetricFamily, "kvferry_kv_transfer_throughput_bytes_per_second",
             "throughput of the last completed KV transfer", "last_throughput"),
        ]
        out = [info]
        for family, name, doc, attr in families:
            metric = family(name, doc, labels=labels)
            for (peer, transport), f in sorted(figures.items()):
                metric.add_metric([self.role, peer, transport], float(getattr(f, attr)))
            out.append(metric)
        return out


def start_metrics_server(port: int, host: str, stats: PairStats, role: str):
    """Serve ``/metrics`` for this worker's KV figures; returns (server, thread) from prometheus_client."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(TransportCollector(stats, role))
    return start_http_server(port, addr=host, registry=registry)
