"""A worker's exceptions as gRPC statuses (see proto/worker.proto), and the checks of a request's id and
sampling that both workers' services make."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from kvferry.common.sampling import SamplingParams
from kvferry.common.worker import NoRoom
from kvferry.proto.convert import sampling_from_proto

MAX_REQUEST_ID_CHARS = 512  # the router's ids are ~40 characters; a longer one is not the router's


def check_request_id(request_id: str) -> str:
    """A request id from the wire, non-empty and bounded (it keys tables and log lines); ValueError else."""
    if not request_id or len(request_id) > MAX_REQUEST_ID_CHARS:
        raise ValueError(f"request_id must be 1 to {MAX_REQUEST_ID_CHARS} characters, got {len(request_id)}")
    return request_id


def new_request_args(request) -> tuple[str, list[int], SamplingParams]:
    """(request id, prompt token ids, sampling) of a ``ReserveRequest`` or ``PrefillRequest``, checked (a
    ValueError names what is wrong): the first three arguments of ``DecodeWorker.reserve`` and
    ``PrefillWorker.prefill``."""
    return check_request_id(request.request_id), list(request.prompt_token_ids), sampling_from_proto(request.sampling)


@contextmanager
def worker_errors(context: grpc.ServicerContext, role: str) -> Iterator[None]:
    """Around a call into a worker: its refusal (``NoRoom``: try elsewhere) ends the RPC with
    RESOURCE_EXHAUSTED, bad input (ValueError) with INVALID_ARGUMENT, a loop that did not run the
    command in time (TimeoutError) with UNAVAILABLE."""
    try:
        yield
    except NoRoom as exc:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    except ValueError as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except TimeoutError:
        context.abort(grpc.StatusCode.UNAVAILABLE, f"the {role} loop did not answer in time")
