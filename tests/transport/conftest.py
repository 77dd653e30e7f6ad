"""Real engines on the default model (small caches) for the transport tests that run whole workers."""

from __future__ import annotations

import pytest

from fixtures_workers import (  # noqa: F401
    decode_engine,
    decode_worker_factory,
    engine_config,
    prefill_engine,
    prefill_worker_factory,
)


@pytest.fixture(scope="session")
def transport_prefill_engine(prefill_engine):
    """The prefill engine behind prefill_worker_factory, by the name this folder's tests use."""
    return prefill_engine
