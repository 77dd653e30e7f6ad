"""gRPC face of the prefill worker: ``PrefillWorker`` (worker.py) with grpc.health.v1 and reflection.

Prefill answers once the decode worker acknowledged the KV. Errors (see proto/worker.proto): transfer
failures map to UNAVAILABLE / FAILED_PRECONDITION / NOT_FOUND / DEADLINE_EXCEEDED / ABORTED with the
transport's message; bad input is INVALID_ARGUMENT; a full queue RESOURCE_EXHAUSTED. A caller that goes
away (cancel, deadline) aborts the request here.
"""

from __future__ import annotations

import concurrent.futures
import time

import grpc

from kvferry.prefill_worker.worker import PrefillAborted, PrefillWorker, SLORejected
from kvferry.proto import worker_pb2, worker_pb2_grpc
from kvferry.proto.cluster_security import ClusterSecurity
from kvferry.proto.convert import (
    logprobs_to_proto, prefill_timings_fields, refusal_metadata,
)
from kvferry.transport.base import KVTarget, TransferError
from kvferry.transport.grpc_transport import create_server, status_for
from kvferry.worker_common.grpc_errors import new_request_args, worker_errors
from kvferry.worker_common.servicer import WorkerCalls

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["PrefillWorker"].full_name
MAX_PREFILL_S = 3600.0  # hard bound on one Prefill call; the router's deadline is normally shorter
POLL_S = 0.25


class PrefillWorkerServicer(WorkerCalls, worker_pb2_grpc.PrefillWorkerServicer):
    role = "prefill"

    def __init__(self, worker: PrefillWorker, transfer_timeout_s: float = 30.0):
        self.worker = worker
        self.transfer_timeout_s = transfer_timeout_s

    def Prefill(self, request: worker_pb2.PrefillRequest, context: grpc.ServicerContext) -> worker_pb2.PrefillResponse:
        remaining = context.time_remaining()
        timeout_s = self.transfer_timeout_s if remaining is None else min(self.transfer_timeout_s, remaining)
        target = KVTarget(request.kv_address, request.receiver_instance_id, timeout_s=max(timeout_s, 0.001))
        with worker_errors(context, self.role):
            future = self.worker.prefill(
                *new_request_args(request),
                target,
                num_reserved_blocks=len(request.block_ids) if request.block_ids else None,
                ttft_deadline=self.worker.engine.config.scheduler.profile.ttft_deadline(
                    time.monotonic(), request.ttft_budget_ms
                ),
            )
        end = time.monotonic() + MAX_PREFILL_S
        result = None
        while result is None:
            if not context.is_active() or time.monotonic() > end:
                self.worker.abort(request.request_id)
                context.abort(grpc.StatusCode.CANCELLED, "the caller went away")
            try:
                result = future.result(timeout=POLL_S)
            except concurrent.futures.TimeoutError:
                continue
            except TransferError as exc:
                context.abort(status_for(exc.code), str(exc))
            except PrefillAborted as exc:
                context.abort(grpc.StatusCode.ABORTED, str(exc))
            except SLORejected as exc:  # not a full queue: the router answers 429, it does not retry
                context.set_trailing_metadata(refusal_metadata(exc.refusal))
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        response = worker_pb2.PrefillResponse(
            request_id=result.request_id,
            first_token_id=result.first_token_id,
            num_prompt_tokens=result.num_prompt_tokens,
            kv_bytes=result.kv_bytes,
            prefill_seconds=result.prefill_seconds,
            transfer_seconds=result.transfer_seconds,
            num_cached_tokens=result.num_cached_tokens,
            **prefill_timings_fields(result.timings),
        )
        if result.first_logprobs is not None:
            response.first_logprobs.CopyFrom(logprobs_to_proto(result.first_logprobs))
        return response


def create_prefill_server(
    worker: PrefillWorker, host: str, port: int, transfer_timeout_s: float = 30.0,
    security: ClusterSecurity = ClusterSecurity(),
):
    """(server, health servicer, bound port); not started. ``security``: the cluster token every call
    needs (health and reflection aside) and mutual TLS."""
    max_workers = worker.config.max_queued_requests + 16  # a Prefill call waits on a thread per request
    server, health, bound = create_server(f"{host}:{port}", [SERVICE_NAME], max_workers=max_workers,
                                          security=security)
    worker_pb2_grpc.add_PrefillWorkerServicer_to_server(PrefillWorkerServicer(worker, transfer_timeout_s), server)
    return server, health, bound
