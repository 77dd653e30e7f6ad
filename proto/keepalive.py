"""gRPC keepalive for every channel and server of the cluster: a peer that stops answering (its host
gone, its process stopped, a half-open connection after a network fault) fails the calls in flight in
seconds, where TCP alone would keep a stream open for minutes or forever.

Clients ping every ``KEEPALIVE_TIME_S`` even without calls and give up after ``KEEPALIVE_TIMEOUT_S``
without an answer; servers accept pings that often (a server that refuses them sends GOAWAY
"too_many_pings") and ping their clients the same way.
"""

from __future__ import annotations

KEEPALIVE_TIME_S = 10.0
KEEPALIVE_TIMEOUT_S = 5.0


def _pings(time_s: float, timeout_s: float) -> list[tuple[str, int]]:
    """What both ends set alike: a ping every ``time_s``, with or without calls, answered in ``timeout_s``."""
    return [
        ("grpc.keepalive_time_ms", int(time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(timeout_s * 1000)),
        # Recent gRPC waits for any ping's answer this long (default 60 s), keepalive pings included.
        ("grpc.http2.ping_timeout_ms", int(timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def client_keepalive(time_s: float = KEEPALIVE_TIME_S, timeout_s: float = KEEPALIVE_TIMEOUT_S) -> list[tuple[str, int]]:
    return _pings(time_s, timeout_s) + [
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging a long, quiet stream
    ]


def server_keepalive(time_s: float = KEEPALIVE_TIME_S, timeout_s: float = KEEPALIVE_TIMEOUT_S) -> list[tuple[str, int]]:
    return _pings(time_s, timeout_s) + [
        ("grpc.http2.min_ping_interval_without_data_ms", int(time_s * 1000 / 2)),
        ("grpc.http2.max_ping_strikes", 0),  # a client pinging as often as allowed is never cut off
    ]
