"""What the prefill and decode workers' gRPC services share: a worker's exceptions as gRPC statuses
(see proto/worker.proto)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc


@contextmanager
def worker_errors(context: grpc.ServicerContext, no_room: type[Exception], role: str) -> Iterator[None]:
    """Around a call into a worker: its refusal (``no_room``: try elsewhere) ends the RPC with
    RESOURCE_EXHAUSTED, bad input (ValueError) with INVALID_ARGUMENT, a loop that did not run the
    command in time (TimeoutError) with UNAVAILABLE."""
    try:
        yield
    except no_room as exc:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    except ValueError as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except TimeoutError:
        context.abort(grpc.StatusCode.UNAVAILABLE, f"the {role} loop did not answer in time")
