"""The engine's failures: a small code enum, the message, and the request field at fault.

The engine and everything below it raise `EngineError` and know no protocol. Each adapter maps
a `Code` to its own status from one table (`grpc_api.GRPC_STATUS`, `http.app.HTTP_STATUS`), so
whether an answer is 413 or 429 is the code's, never a field's presence. `Code.status` is the
canonical (google.rpc) name of each code, used for metrics labels and logs by both adapters.
"""

from __future__ import annotations

from enum import Enum, auto

from ..workers.runtime.errors import BundleError


class Code(Enum):
    """Why a request failed."""

    INVALID_ARGUMENT = auto()  # a value of the request is wrong (names it)
    TOO_LARGE = auto()  # the request, or its response, is over a size limit
    QUEUE_FULL = auto()  # the queue (or the caller's share of it) is full: retry later
    NOT_FOUND = auto()  # `model` names a model not served here
    UNAUTHENTICATED = auto()  # missing or unknown API key
    CANCELLED = auto()  # the client went away
    DEADLINE_EXCEEDED = auto()
    UNAVAILABLE = auto()  # loading, draining, or no worker can serve: retry
    FAILED_PRECONDITION = auto()  # the bundle cannot be used
    INTERNAL = auto()  # a bug, or a batch lost on two workers

    @property
    def status(self) -> str:
        """The canonical (google.rpc) status name: metrics labels and logs."""
        return _CANONICAL.get(self, self.name)


_CANONICAL = {Code.TOO_LARGE: "RESOURCE_EXHAUSTED", Code.QUEUE_FULL: "RESOURCE_EXHAUSTED"}


class EngineError(Exception):
    """A failure with its code; `field`/`index` name the request value at fault, if any, and
    `detail` is the message without that path."""

    def __init__(self, code: Code, message: str, field: str | None = None,
                 index: int | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.index = index
        self.detail = message if detail is None else detail

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.message!r})"

    @property
    def path(self) -> str | None:
        """`field` or `field[index]`."""
        if self.field is None:
            return None
        return self.field if self.index is None else f"{self.field}[{self.index}]"


class InvalidInput(EngineError, ValueError):
    """A caller-supplied value is wrong: names the field and, for lists, the index in the
    caller's request (`inputs[3]`)."""

    def __init__(self, field: str, message: str, index: int | None = None) -> None:
        where = field if index is None else f"{field}[{index}]"
        super().__init__(Code.INVALID_ARGUMENT, f"{where}: {message}", field, index, message)

    @property
    def where(self) -> str:
        return self.path or ""


def too_large(field: str, message: str) -> EngineError:
    """A request (or its response) larger than the server takes."""
    return EngineError(Code.TOO_LARGE, f"{field}: {message}", field, None, message)


def queue_full(message: str) -> EngineError:
    return EngineError(Code.QUEUE_FULL, f"queue full: {message}; retry later")


def unavailable(message: str) -> EngineError:
    return EngineError(Code.UNAVAILABLE, message)


def deadline_exceeded(message: str) -> EngineError:
    return EngineError(Code.DEADLINE_EXCEEDED, message)


def internal(message: str) -> EngineError:
    return EngineError(Code.INTERNAL, message)


def not_found(field: str, message: str) -> EngineError:
    return EngineError(Code.NOT_FOUND, message, field, None, message)


def engine_error(exc: BaseException) -> EngineError:
    """Any exception raised below the adapters, as the failure a client sees."""
    if isinstance(exc, EngineError):
        return exc
    if isinstance(exc, BundleError):
        return EngineError(Code.FAILED_PRECONDITION, str(exc))
    return internal(f"internal error: {exc!r}")
