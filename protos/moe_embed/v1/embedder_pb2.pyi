from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Task(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_UNSPECIFIED: _ClassVar[Task]
    TASK_NONE: _ClassVar[Task]
    TASK_SEARCH_QUERY: _ClassVar[Task]
    TASK_SEARCH_DOCUMENT: _ClassVar[Task]
    TASK_CLASSIFICATION: _ClassVar[Task]
    TASK_CLUSTERING: _ClassVar[Task]
TASK_UNSPECIFIED: Task
TASK_NONE: Task
TASK_SEARCH_QUERY: Task
TASK_SEARCH_DOCUMENT: Task
TASK_CLASSIFICATION: Task
TASK_CLUSTERING: Task

class EmbedRequest(_message.Message):
    __slots__ = ("id", "inputs", "task", "dimensions", "truncate", "normalize")
    ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    id: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    task: Task
    dimensions: int
    truncate: bool
    normalize: bool
    def __init__(self, id: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., task: _Optional[_Union[Task, str]] = ..., dimensions: _Optional[int] = ..., truncate: _Optional[bool] = ..., normalize: _Optional[bool] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ms", "compute_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    compute_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "field", "index")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    field: str
    index: int
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., field: _Optional[str] = ..., index: _Optional[int] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("id", "embeddings", "token_counts", "total_tokens", "dimensions", "model", "timing", "error", "truncated")
    ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    id: str
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    token_counts: _containers.RepeatedScalarFieldContainer[int]
    total_tokens: int
    dimensions: int
    model: str
    timing: Timing
    error: Error
    truncated: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, id: _Optional[str] = ..., embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., token_counts: _Optional[_Iterable[int]] = ..., total_tokens: _Optional[int] = ..., dimensions: _Optional[int] = ..., model: _Optional[str] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., truncated: _Optional[_Iterable[bool]] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("inputs", "task")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedScalarFieldContainer[str]
    task: Task
    def __init__(self, inputs: _Optional[_Iterable[str]] = ..., task: _Optional[_Union[Task, str]] = ...) -> None: ...

class Tokens(_message.Message):
    __slots__ = ("ids", "pieces")
    IDS_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    pieces: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., pieces: _Optional[_Iterable[str]] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[Tokens]
    def __init__(self, tokens: _Optional[_Iterable[_Union[Tokens, _Mapping]]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_id", "dimensions", "min_dimensions", "max_dimensions", "max_tokens", "precision", "workers", "bundle_hash", "moe_mode", "max_inputs", "max_batch_tokens", "version")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    MIN_DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_HASH_FIELD_NUMBER: _ClassVar[int]
    MOE_MODE_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    dimensions: int
    min_dimensions: int
    max_dimensions: int
    max_tokens: int
    precision: str
    workers: int
    bundle_hash: str
    moe_mode: str
    max_inputs: int
    max_batch_tokens: int
    version: str
    def __init__(self, model_id: _Optional[str] = ..., dimensions: _Optional[int] = ..., min_dimensions: _Optional[int] = ..., max_dimensions: _Optional[int] = ..., max_tokens: _Optional[int] = ..., precision: _Optional[str] = ..., workers: _Optional[int] = ..., bundle_hash: _Optional[str] = ..., moe_mode: _Optional[str] = ..., max_inputs: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., version: _Optional[str] = ...) -> None: ...
