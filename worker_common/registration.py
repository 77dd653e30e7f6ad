"""A worker's membership of the cluster: RegisterWorker, then Heartbeat every interval (registering again
when the router forgot us), Deregister on shutdown, draining first.

A fingerprint the router refuses (FAILED_PRECONDITION) or a missing or wrong cluster token
(UNAUTHENTICATED) raises ``RegistrationRefused`` with the router's message; an unreachable router is
retried with backoff until the start's timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc

import kvferry
from kvferry.common.fingerprint import KVFingerprint
from kvferry.common.worker import WorkerRole, WorkerStats
from kvferry.proto import router_pb2, router_pb2_grpc
from kvferry.proto.cluster_security import TOKEN_ENV, ClusterSecurity
from kvferry.proto.convert import capacity_to_proto, fingerprint_to_proto, role_to_proto

logger = logging.getLogger(__name__)


class RegistrationRefused(Exception):
    """The router will not take this worker (fingerprint mismatch...); the message says why."""


class RouterRegistration:
    """Registration and heartbeats for one worker; ``start`` blocks until registered (or raises)."""

    def __init__(
        self,
        router_address: str,
        role: WorkerRole | str,
        address: str,
        fingerprint: KVFingerprint,
        stats: Callable[[], WorkerStats],
        name: str,
        rpc_timeout_s: float = 3.0,
        security: ClusterSecurity = ClusterSecurity(),
        device: str = "",
    ):
        role = WorkerRole(role)
        self.router_address = router_address
        self.request = router_pb2.RegisterWorkerRequest(
            role=role_to_proto(role), address=address,
            fingerprint=fingerprint_to_proto(fingerprint, router_pb2.ModelFingerprint), worker_name=name,
            kv_address=address if role is not WorkerRole.PREFILL else "", version=kvferry.__version__,
            device=device,
        )
        self.capacity = lambda: capacity_to_proto(stats())
        self.rpc_timeout_s = rpc_timeout_s
        self.worker_id = ""
        self.interval_s = 0.5
        self._channel = security.channel(router_address)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        delay = 0.2
        while True:
            try:
                self._register()
                break
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise RegistrationRefused(f"{exc.details()} (--cluster-token or ${TOKEN_ENV})") from None
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION or exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise RegistrationRefused(exc.details()) from None
                if time.monotonic() + delay > end:
                    raise RegistrationRefused(
                        f"router {self.router_address} unreachable for {timeout_s:g}s: {exc.code().name}"
                    ) from None
                logger.info("router %s not reachable yet (%s); retrying", self.router_address, exc.code().name)
                self._stop.wait(delay)
                delay = min(delay * 2, 2.0)
        self._thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._thread.start()

    def _register(self) -> None:
        self.request.capacity.CopyFrom(self.capacity())
        answer = self._stub.RegisterWorker(self.request, timeout=self.rpc_timeout_s)
        self.worker_id = answer.worker_id
        self.interval_s = max(answer.heartbeat_interval_ms / 1000.0, 0.05) if answer.heartbeat_interval_ms else 0.5
        logger.info("registered with router %s as %s", self.router_address, self.worker_id)

    def _heartbeat_loop(self) -> None:
        failing = False  # log an outage once, and its end
        while not self._stop.wait(self.interval_s):
            try:
                answer = self._stub.Heartbeat(
                    router_pb2.HeartbeatRequest(worker_id=self.worker_id, capacity=self.capacity()),
                    timeout=self.rpc_timeout_s,
                )
                if failing:
                    logger.info("router %s reachable again", self.router_address)
                    failing = False
                if not answer.known:
                    logger.info("router %s forgot this worker; registering again", self.router_address)
                    self._register()
                elif answer.heartbeat_interval_ms:
                    self.interval_s = max(answer.heartbeat_interval_ms / 1000.0, 0.05)
            except grpc.RpcError as exc:
                if not failing:
                    logger.warning("heartbeat to %s failed: %s (retrying)", self.router_address, exc.code().name)
                failing = True
            except Exception:
                logger.exception("heartbeat failed")

    def deregister(self, draining: bool) -> None:
        if not self.worker_id:
            return
        try:
            self._stub.Deregister(
                router_pb2.DeregisterRequest(worker_id=self.worker_id, draining=draining), timeout=self.rpc_timeout_s
            )
        except grpc.RpcError as exc:
            logger.warning("deregister from %s failed: %s", self.router_address, exc.code().name)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.rpc_timeout_s + 1)
        self.deregister(draining=False)
        self._channel.close()
