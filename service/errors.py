"""Service failures and their gRPC status codes, mapped in this one place.

The engine raises ServiceError (or lets a typed core error through); the gRPC adapter turns
either into a status with `to_service_error`. Messages name the field and, for lists, the index.
"""

from __future__ import annotations

import grpc

from ..workers.errors import BundleError, InvalidInput


class ServiceError(Exception):
    """A failure with the gRPC status code the client should see."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"ServiceError({self.code.name}, {self.message!r})"


def invalid_argument(field: str, message: str, index: int | None = None) -> ServiceError:
    where = field if index is None else f"{field}[{index}]"
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {message}")


def queue_full(waiting: int, asked: int, limit: int) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"queue full: {waiting} inputs waiting + {asked} asked > max_queue {limit}; retry later",
    )


def unavailable(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message)


def deadline_exceeded(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, message)


def internal(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INTERNAL, message)


def to_service_error(exc: BaseException) -> ServiceError:
    """Map any exception raised below the gRPC adapter to the status a client sees."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, InvalidInput):
        return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, BundleError):
        return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    return ServiceError(grpc.StatusCode.INTERNAL, f"internal error: {exc!r}")


def status_number(code: grpc.StatusCode) -> int:
    """The google.rpc.Code number of a status (for EmbedStream's per-response `error`)."""
    return code.value[0]
