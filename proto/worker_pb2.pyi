from kvferry.proto import generate_pb2 as _generate_pb2
from kvferry.proto import kv_transfer_pb2 as _kv_transfer_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReserveRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "lease_ms", "prefill_locally", "ttft_budget_ms", "resume_output_token_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_LOCALLY_FIELD_NUMBER: _ClassVar[int]
    TTFT_BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    RESUME_OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _generate_pb2.SamplingParams
    lease_ms: int
    prefill_locally: bool
    ttft_budget_ms: int
    resume_output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_generate_pb2.SamplingParams, _Mapping]] = ..., lease_ms: _Optional[int] = ..., prefill_locally: _Optional[bool] = ..., ttft_budget_ms: _Optional[int] = ..., resume_output_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("block_ids", "receiver_instance_id", "lease_ms", "kv_address")
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    KV_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    receiver_instance_id: str
    lease_ms: int
    kv_address: str
    def __init__(self, block_ids: _Optional[_Iterable[int]] = ..., receiver_instance_id: _Optional[str] = ..., lease_ms: _Optional[int] = ..., kv_address: _Optional[str] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class RenewResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class TokenEvent(_message.Message):
    __slots__ = ("request_id", "index", "token_ids", "logprobs", "finish_reason", "error", "num_prompt_tokens", "prefill_queue_seconds", "prefill_compute_seconds", "num_cached_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    index: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[_kv_transfer_pb2.TokenLogprobs]
    finish_reason: str
    error: str
    num_prompt_tokens: int
    prefill_queue_seconds: float
    prefill_compute_seconds: float
    num_cached_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., index: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[_Union[_kv_transfer_pb2.TokenLogprobs, _Mapping]]] = ..., finish_reason: _Optional[str] = ..., error: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ..., prefill_queue_seconds: _Optional[float] = ..., prefill_compute_seconds: _Optional[float] = ..., num_cached_tokens: _Optional[int] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("role", "instance_id", "block_size", "total_kv_blocks", "free_kv_blocks", "used_kv_blocks", "running_requests", "waiting_requests", "queued_prefill_tokens", "max_running_requests", "kv_bytes_sent_total", "kv_bytes_received_total", "kv_transfer_seconds_total", "kv_transfers_total", "kv_transfer_failures_total", "leases_expired_total", "requests_rejected_total", "engine_busy_ms")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FREE_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    USED_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_SENT_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_RECEIVED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_SECONDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_FAILURES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LEASES_EXPIRED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_REJECTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ENGINE_BUSY_MS_FIELD_NUMBER: _ClassVar[int]
    role: str
    instance_id: str
    block_size: int
    total_kv_blocks: int
    free_kv_blocks: int
    used_kv_blocks: int
    running_requests: int
    waiting_requests: int
    queued_prefill_tokens: int
    max_running_requests: int
    kv_bytes_sent_total: int
    kv_bytes_received_total: int
    kv_transfer_seconds_total: float
    kv_transfers_total: int
    kv_transfer_failures_total: int
    leases_expired_total: int
    requests_rejected_total: int
    engine_busy_ms: int
    def __init__(self, role: _Optional[str] = ..., instance_id: _Optional[str] = ..., block_size: _Optional[int] = ..., total_kv_blocks: _Optional[int] = ..., free_kv_blocks: _Optional[int] = ..., used_kv_blocks: _Optional[int] = ..., running_requests: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., queued_prefill_tokens: _Optional[int] = ..., max_running_requests: _Optional[int] = ..., kv_bytes_sent_total: _Optional[int] = ..., kv_bytes_received_total: _Optional[int] = ..., kv_transfer_seconds_total: _Optional[float] = ..., kv_transfers_total: _Optional[int] = ..., kv_transfer_failures_total: _Optional[int] = ..., leases_expired_total: _Optional[int] = ..., requests_rejected_total: _Optional[int] = ..., engine_busy_ms: _Optional[int] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "kv_address", "block_ids", "receiver_instance_id", "ttft_budget_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    KV_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    TTFT_BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _generate_pb2.SamplingParams
    kv_address: str
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    receiver_instance_id: str
    ttft_budget_ms: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_generate_pb2.SamplingParams, _Mapping]] = ..., kv_address: _Optional[str] = ..., block_ids: _Optional[_Iterable[int]] = ..., receiver_instance_id: _Optional[str] = ..., ttft_budget_ms: _Optional[int] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("request_id", "first_token_id", "first_logprobs", "num_prompt_tokens", "kv_bytes", "prefill_seconds", "transfer_seconds", "prefill_queue_seconds", "prefill_compute_seconds", "num_cached_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    first_token_id: int
    first_logprobs: _kv_transfer_pb2.TokenLogprobs
    num_prompt_tokens: int
    kv_bytes: int
    prefill_seconds: float
    transfer_seconds: float
    prefill_queue_seconds: float
    prefill_compute_seconds: float
    num_cached_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., first_token_id: _Optional[int] = ..., first_logprobs: _Optional[_Union[_kv_transfer_pb2.TokenLogprobs, _Mapping]] = ..., num_prompt_tokens: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., prefill_seconds: _Optional[float] = ..., transfer_seconds: _Optional[float] = ..., prefill_queue_seconds: _Optional[float] = ..., prefill_compute_seconds: _Optional[float] = ..., num_cached_tokens: _Optional[int] = ...) -> None: ...
