"""The calls both workers' gRPC services answer alike: ``Abort`` and ``GetStats`` (proto/worker.proto)."""

from __future__ import annotations

import grpc

from kvferry.proto import worker_pb2
from kvferry.proto.convert import stats_to_proto
from kvferry.worker_common.grpc_errors import worker_errors


class WorkerCalls:
    """Put before the generated servicer base (its methods answer UNIMPLEMENTED); the service sets
    ``worker`` (with ``abort(request_id) -> bool`` and ``stats()``) and ``role`` (for error messages)."""

    worker: object
    role: str

    def Abort(self, request: worker_pb2.AbortRequest, context: grpc.ServicerContext) -> worker_pb2.AbortResponse:
        with worker_errors(context, self.role):
            found = self.worker.abort(request.request_id)
        return worker_pb2.AbortResponse(found=found)

    def GetStats(self, request: worker_pb2.StatsRequest, context: grpc.ServicerContext) -> worker_pb2.WorkerStats:
        return stats_to_proto(self.worker.stats())
