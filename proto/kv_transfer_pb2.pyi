from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Fingerprint(_message.Message):
    __slots__ = ("model_name", "model_digest", "dtype", "block_size", "kv_layout", "num_layers", "num_kv_heads", "head_dim", "protocol_version", "vocab_size", "max_model_len")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_digest: str
    dtype: str
    block_size: int
    kv_layout: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    protocol_version: int
    vocab_size: int
    max_model_len: int
    def __init__(self, model_name: _Optional[str] = ..., model_digest: _Optional[str] = ..., dtype: _Optional[str] = ..., block_size: _Optional[int] = ..., kv_layout: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., protocol_version: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_model_len: _Optional[int] = ...) -> None: ...

class HandshakeRequest(_message.Message):
    __slots__ = ("fingerprint", "sender_id", "transports", "boot_id")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    fingerprint: Fingerprint
    sender_id: str
    transports: _containers.RepeatedScalarFieldContainer[str]
    boot_id: str
    def __init__(self, fingerprint: _Optional[_Union[Fingerprint, _Mapping]] = ..., sender_id: _Optional[str] = ..., transports: _Optional[_Iterable[str]] = ..., boot_id: _Optional[str] = ...) -> None: ...

class TransportOffer(_message.Message):
    __slots__ = ("name", "address", "boot_id", "ticket")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    boot_id: str
    ticket: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., boot_id: _Optional[str] = ..., ticket: _Optional[str] = ...) -> None: ...

class HandshakeResponse(_message.Message):
    __slots__ = ("compatible", "mismatches", "fingerprint", "receiver_id", "receiver_instance_id", "max_chunk_bytes", "transports")
    COMPATIBLE_FIELD_NUMBER: _ClassVar[int]
    MISMATCHES_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    compatible: bool
    mismatches: _containers.RepeatedScalarFieldContainer[str]
    fingerprint: Fingerprint
    receiver_id: str
    receiver_instance_id: str
    max_chunk_bytes: int
    transports: _containers.RepeatedCompositeFieldContainer[TransportOffer]
    def __init__(self, compatible: _Optional[bool] = ..., mismatches: _Optional[_Iterable[str]] = ..., fingerprint: _Optional[_Union[Fingerprint, _Mapping]] = ..., receiver_id: _Optional[str] = ..., receiver_instance_id: _Optional[str] = ..., max_chunk_bytes: _Optional[int] = ..., transports: _Optional[_Iterable[_Union[TransportOffer, _Mapping]]] = ...) -> None: ...

class TokenLogprobs(_message.Message):
    __slots__ = ("logprob", "top_token_ids", "top_logprobs", "token_id")
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    logprob: float
    top_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    token_id: int
    def __init__(self, logprob: _Optional[float] = ..., top_token_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ..., token_id: _Optional[int] = ...) -> None: ...

class KVHeader(_message.Message):
    __slots__ = ("request_id", "fingerprint_digest", "receiver_instance_id", "num_layers", "num_blocks", "layer_nbytes", "sender_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LAYER_NBYTES_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    fingerprint_digest: str
    receiver_instance_id: str
    num_layers: int
    num_blocks: int
    layer_nbytes: int
    sender_id: str
    def __init__(self, request_id: _Optional[str] = ..., fingerprint_digest: _Optional[str] = ..., receiver_instance_id: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_blocks: _Optional[int] = ..., layer_nbytes: _Optional[int] = ..., sender_id: _Optional[str] = ...) -> None: ...

class KVData(_message.Message):
    __slots__ = ("layer_idx", "offset", "data")
    LAYER_IDX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    layer_idx: int
    offset: int
    data: bytes
    def __init__(self, layer_idx: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class KVTrailer(_message.Message):
    __slots__ = ("first_token_id", "first_logprobs", "total_bytes", "layer_checksums", "checksum_algorithm")
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAYER_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    first_token_id: int
    first_logprobs: TokenLogprobs
    total_bytes: int
    layer_checksums: _containers.RepeatedScalarFieldContainer[int]
    checksum_algorithm: str
    def __init__(self, first_token_id: _Optional[int] = ..., first_logprobs: _Optional[_Union[TokenLogprobs, _Mapping]] = ..., total_bytes: _Optional[int] = ..., layer_checksums: _Optional[_Iterable[int]] = ..., checksum_algorithm: _Optional[str] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("header", "data", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: KVHeader
    data: KVData
    trailer: KVTrailer
    def __init__(self, header: _Optional[_Union[KVHeader, _Mapping]] = ..., data: _Optional[_Union[KVData, _Mapping]] = ..., trailer: _Optional[_Union[KVTrailer, _Mapping]] = ...) -> None: ...

class PushKVResponse(_message.Message):
    __slots__ = ("request_id", "bytes_received", "receive_seconds")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    RECEIVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    bytes_received: int
    receive_seconds: float
    def __init__(self, request_id: _Optional[str] = ..., bytes_received: _Optional[int] = ..., receive_seconds: _Optional[float] = ...) -> None: ...
