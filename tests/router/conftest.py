"""A real router (HTTP + gRPC on loopback, in a thread of its own) with the default model's tokenizer,
and real workers for it (``real_workers.py``)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

import pytest

from kvferry.engine.config import default_model_path
from kvferry.router.admission import AdmissionConfig
from kvferry.router.main import RouterConfig, RouterHandle, load_served_model, serve
from kvferry.router.placement import DisaggregationPolicy
from kvferry.router.registry import RegistryConfig
from real_workers import start_decode_and_prefill


@pytest.fixture(scope="session")
def served_model():
    return load_served_model(default_model_path(), None, 8192)


class RunningRouter:
    def __init__(self, model, **overrides) -> None:
        config = RouterConfig(
            model=default_model_path(), port=0, grpc_port=0, shutdown_grace_s=2.0,
            registry=RegistryConfig(heartbeat_interval_s=0.2, lease_s=2.0),
            admission=AdmissionConfig(max_waiting=64, timeout_s=5.0, poll_s=0.05),
            # Prompts of a few tokens would be prefilled on the decode worker; these tests are about the
            # prefill worker's path. Tests of conditional disaggregation pass their own policy.
            placement=DisaggregationPolicy(mode="never"),
        )
        config = replace(config, **overrides)
        self.handle: RouterHandle | None = None
        ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.error: BaseException | None = None

        def on_ready(handle: RouterHandle) -> None:
            self.handle = handle
            ready.set()

        def main() -> None:
            try:
                self.loop.run_until_complete(serve(config, on_ready, model=model))
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.error = exc
                ready.set()

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        assert ready.wait(30), "router did not start"
        assert self.error is None, self.error
        self.url = f"http://127.0.0.1:{self.handle.http_port}"
        self.grpc_address = f"127.0.0.1:{self.handle.grpc_port}"

    @property
    def service(self):
        return self.handle.service

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        self.loop.call_soon_threadsafe(self.handle.stop.set)
        self.thread.join(15)
        assert not self.thread.is_alive(), "router did not stop"


@pytest.fixture
def start_router(served_model):
    routers = []

    def start(**overrides) -> RunningRouter:
        router = RunningRouter(served_model, **overrides)
        routers.append(router)
        return router

    yield start
    for router in routers:
        router.stop()


@pytest.fixture(scope="module")
def decode_and_prefill(model_path):
    """(decode, prefill): real workers of the default model, loaded once per module; a test registers
    them with its router (``real_workers.registered``)."""
    decode, prefill = start_decode_and_prefill()
    with decode, prefill:
        yield decode, prefill
