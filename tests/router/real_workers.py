"""Real prefill and decode workers (the default model, in this process) behind their gRPC servers on
loopback, registered with a test's router exactly as `kvferry prefill` / `kvferry decode` register.

The workers outlive a router: a test registers them with its own router (``register``) under the role it
needs, so the model loads once per module. A decode worker registered as ``colocated`` is what
`kvferry decode --colocated` runs: the same class, sent whole requests (``prefill_locally``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from kvferry.engine.config import CacheConfig, EngineConfig, SchedulerConfig


def small_engine_config() -> EngineConfig:
    # Small enough to load and run quickly on 2 cores; 2048 tokens of context leave room for long prompts.
    return EngineConfig(
        cache=CacheConfig(block_size=16, num_blocks=256),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=1024, max_model_len=2048),
    )


@dataclass
class RealWorker:
    role: str  # "prefill" or "decode"
    worker: object  # PrefillWorker | DecodeWorker
    server: object
    address: str

    def register(self, router_grpc_address: str, role: str | None = None, name: str = ""):
        """A started ``RouterRegistration`` (role defaults to the worker's own; ``name`` to
        ``<role>-test``); ``stop()`` it after."""
        from kvferry.worker_common.registration import RouterRegistration

        role = role or self.role
        registration = RouterRegistration(router_grpc_address, role, self.address, self.worker.engine.fingerprint,
                                          self.worker.stats, name or f"{role}-test")
        registration.start(10)
        return registration

    def stop(self) -> None:
        self.worker.stop()
        self.server.stop(None)

    def __enter__(self) -> RealWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def registered(router_grpc_address: str, *workers: RealWorker, role: str | None = None) -> Iterator[list]:
    """The workers registered with a router for the block (``role``: one for all, default each one's
    own), their registrations stopped after; the workers themselves go on."""
    registrations = [w.register(router_grpc_address, role) for w in workers]
    try:
        yield registrations
    finally:
        for registration in registrations:
            registration.stop()


def start_decode(config: EngineConfig | None = None, decode_config=None, advertise_host: str | None = None,
                 worker_id: str = "decode-test") -> RealWorker:
    """A started decode worker on 127.0.0.1; ``advertise_host``: the host its reservations give prefill
    workers for the KV (its own by default; another one makes its KV port one they cannot reach)."""
    from kvferry.decode_worker.service import create_decode_server
    from kvferry.decode_worker.worker import DecodeWorker, DecodeWorkerConfig
    from kvferry.engine.engine import LLMEngine

    decode = DecodeWorker(LLMEngine(config or small_engine_config(), role="decode"),
                          decode_config or DecodeWorkerConfig(), worker_id=worker_id)
    server, _, port = create_decode_server(decode, "127.0.0.1", 0, advertise_host=advertise_host)
    decode.start()
    server.start()
    return RealWorker("decode", decode, server, f"127.0.0.1:{port}")


def start_prefill(config: EngineConfig | None = None, prefill_step_model=None, prefill_config=None,
                  worker_id: str = "prefill-test") -> RealWorker:
    """A started prefill worker on 127.0.0.1 that pushes KV over gRPC; ``prefill_step_model``: a fixed
    step-time model for its engine; ``prefill_config``: its ``PrefillWorkerConfig``."""
    from kvferry.engine.engine import LLMEngine
    from kvferry.prefill_worker.service import create_prefill_server
    from kvferry.prefill_worker.worker import PrefillWorker
    from kvferry.transport.grpc_transport import GrpcKVSender

    engine = LLMEngine(config or small_engine_config(), role="prefill")
    if prefill_step_model is not None:
        engine.scheduler.step_model = prefill_step_model
    prefill = PrefillWorker(engine, GrpcKVSender(engine.fingerprint, sender_id=worker_id), prefill_config,
                            worker_id=worker_id)
    server, _, port = create_prefill_server(prefill, "127.0.0.1", 0)
    prefill.start()
    server.start()
    return RealWorker("prefill", prefill, server, f"127.0.0.1:{port}")


def start_decode_and_prefill(
    config: EngineConfig | None = None, decode_config=None, prefill_step_model=None
) -> tuple[RealWorker, RealWorker]:
    """(decode, prefill), started; the prefill worker pushes KV to the decode worker over gRPC.
    ``config``: both engines' (default ``small_engine_config()``); ``decode_config``: the decode worker's
    ``DecodeWorkerConfig``; ``prefill_step_model``: a fixed step-time model for the prefill engine."""
    return start_decode(config, decode_config), start_prefill(config, prefill_step_model)


def assert_unharmed(router_url: str, workers: tuple[RealWorker, ...], log_records) -> None:
    """After a fuzzer's requests: no engine step failed (``log_records``: caplog's), no worker was lost,
    the router is healthy and no KV block is left in use on any worker."""
    import httpx

    from waiting import wait_until

    crashes = [r.getMessage() for r in log_records if "loop iteration failed" in r.getMessage()]
    assert not crashes, crashes  # no engine step failed on any input
    metrics = httpx.get(router_url + "/metrics", timeout=10).text
    assert 'kvferry_router_migrations_total{cause="decode_worker"} 0.0' in metrics  # no worker was lost
    assert httpx.get(router_url + "/health", timeout=10).status_code == 200
    for worker in workers:
        bm = worker.worker.engine.block_manager
        assert wait_until(lambda: bm.num_used_blocks == 0, timeout_s=20)
