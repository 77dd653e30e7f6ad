"""Real engines on the default model (small caches), shared by the worker tests of this folder."""

from __future__ import annotations

import pytest

from fixtures_workers import decode_engine, decode_worker_factory, prefill_engine, prefill_worker_factory  # noqa: F401


@pytest.fixture
def decode_worker(decode_worker_factory):
    """A started DecodeWorker with no data plane but its gRPC receiver."""
    return decode_worker_factory()
