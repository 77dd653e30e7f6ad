"""The router's control plane as the deployment uses it: list the registered workers, deregister one
(draining before a scale-down, at once when its actor died). Plain gRPC, Ray-free."""

from __future__ import annotations

import os
import time

import grpc

from kvferry.proto import router_pb2, router_pb2_grpc
from kvferry.proto.cluster_security import TOKEN_ENV, ClusterSecurity


class RouterControl:
    def __init__(self, address: str, token: str | None = None, rpc_timeout_s: float = 3.0) -> None:
        """``token``: the cluster token (default: ``$KVFERRY_CLUSTER_TOKEN``; "" for none)."""
        self.address = address
        self.rpc_timeout_s = rpc_timeout_s
        token = os.environ.get(TOKEN_ENV, "") if token is None else token
        self._channel = ClusterSecurity(token=token).channel(address)
        self._stub = router_pb2_grpc.RouterStub(self._channel)

    def workers(self) -> dict[str, router_pb2.WorkerInfo]:
        """Registered workers by the address they registered with."""
        answer = self._stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=self.rpc_timeout_s)
        return {w.address: w for w in answer.workers}

    def deregister(self, address: str, draining: bool) -> bool:
        """Deregister the worker registered from ``address``; False if the router does not know it."""
        worker = self.workers().get(address)
        if worker is None:
            return False
        self._stub.Deregister(router_pb2.DeregisterRequest(worker_id=worker.worker_id, draining=draining),
                              timeout=self.rpc_timeout_s)
        return True

    def wait_serving(self, timeout_s: float) -> None:
        """Until ListWorkers answers (the router's gRPC server is up); TimeoutError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.workers()
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the router at {self.address} did not answer within {timeout_s:.0f} s") from None
                time.sleep(0.25)

    def close(self) -> None:
        self._channel.close()
