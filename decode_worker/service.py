"""gRPC face of the decode worker: ``DecodeWorker`` (worker.py) and ``kvferry.kv_transfer.KVTransfer``
on one server, with grpc.health.v1 and reflection. Status codes: see proto/worker.proto."""

from __future__ import annotations

import queue
import time

import grpc

from kvferry.common.worker import SLORefusal
from kvferry.decode_worker.worker import DecodeWorker, TokenEvent
from kvferry.proto import worker_pb2, worker_pb2_grpc
from kvferry.proto.cluster_security import ClusterSecurity
from kvferry.proto.convert import (
    logprobs_to_proto, prefill_timings_fields, refusal_metadata,
)
from kvferry.transport.grpc_transport import SERVICE_NAME as KV_TRANSFER_SERVICE
from kvferry.transport.grpc_transport import add_kv_transfer_service, create_server
from kvferry.worker_common.grpc_errors import new_request_args, worker_errors
from kvferry.worker_common.servicer import WorkerCalls

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["DecodeWorker"].full_name
MAX_STREAM_S = 24 * 3600.0  # a stream's hard bound; the router's own deadline is normally shorter
POLL_S = 0.25  # how often a stream waiting for tokens checks that its client is still there


def event_to_proto(event: TokenEvent) -> worker_pb2.TokenEvent:
    return worker_pb2.TokenEvent(
        request_id=event.request_id,
        index=event.index,
        token_ids=event.token_ids,
        logprobs=[logprobs_to_proto(lp) for lp in event.logprobs or ()],
        finish_reason=event.finish_reason or "",
        error=event.error or "",
        num_prompt_tokens=event.num_prompt_tokens,
        num_cached_tokens=event.num_cached_tokens,  # None leaves the optional field unset
        **prefill_timings_fields(event.prefill_timings),
    )


class DecodeWorkerServicer(WorkerCalls, worker_pb2_grpc.DecodeWorkerServicer):
    role = "decode"

    def __init__(self, worker: DecodeWorker, kv_address: str = ""):
        self.worker = worker
        self.kv_address = kv_address

    def Reserve(self, request: worker_pb2.ReserveRequest, context: grpc.ServicerContext) -> worker_pb2.ReserveResponse:
        with worker_errors(context, self.role):
            reservation = self.worker.reserve(
                *new_request_args(request),
                lease_s=request.lease_ms / 1000.0 if request.lease_ms else None,
                prefill_locally=request.prefill_locally,
                ttft_deadline=self.worker.engine.config.scheduler.profile.ttft_deadline(
                    time.monotonic(), request.ttft_budget_ms
                ) if request.prefill_locally else None,
                resume_output_token_ids=list(request.resume_output_token_ids),
            )
        return worker_pb2.ReserveResponse(
            block_ids=reservation.block_ids,
            receiver_instance_id=reservation.receiver_instance_id,
            lease_ms=int(reservation.lease_s * 1000),
            kv_address=self.kv_address,
        )

    def Stream(self, request: worker_pb2.StreamRequest, context: grpc.ServicerContext):
        request_id = request.request_id
        try:
            events = self.worker.subscribe(request_id)
        except KeyError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        except ValueError as exc:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        try:
            end = time.monotonic() + MAX_STREAM_S
            while context.is_active() and time.monotonic() < end:
                try:
                    event = events.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                if event.finish_reason == "rejected":  # a local prefill refused for its TTFT target
                    refusal = SLORefusal(event.error or "rejected", event.retry_after_s or 1.0)
                    context.set_trailing_metadata(refusal_metadata(refusal))
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.message)
                yield event_to_proto(event)
                if event.finish_reason is not None:
                    return
        finally:  # normal end, client cancel or deadline: the worker aborts it if still running
            self.worker.unsubscribed(request_id)

    def Renew(self, request: worker_pb2.RenewRequest, context: grpc.ServicerContext) -> worker_pb2.RenewResponse:
        with worker_errors(context, self.role):
            return worker_pb2.RenewResponse(found=self.worker.renew(request.request_id))


def create_decode_server(
    worker: DecodeWorker, host: str, port: int, advertise_host: str | None = None,
    security: ClusterSecurity = ClusterSecurity(),
):
    """(server, health servicer, bound port); not started. The KV address is this server's. ``security``:
    the cluster token every call needs (KV pushes included; health and reflection aside) and mutual TLS."""
    max_workers = 2 * worker.max_num_seqs + 16  # a stream and a KV push per sequence, plus unary calls
    server, health, bound = create_server(
        f"{host}:{port}", [SERVICE_NAME, KV_TRANSFER_SERVICE], max_workers=max_workers, security=security
    )
    servicer = DecodeWorkerServicer(worker, kv_address=f"{advertise_host or host}:{bound}")
    worker_pb2_grpc.add_DecodeWorkerServicer_to_server(servicer, server)
    add_kv_transfer_service(server, worker.receiver)
    return server, health, bound
