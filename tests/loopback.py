"""Free loopback ports, for tests that start servers as processes of their own and must name the port."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port free on 127.0.0.1 now (another process may take it before the server binds it: rare)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
