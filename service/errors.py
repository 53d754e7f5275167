"""Service failures and their gRPC (and HTTP) statuses, mapped in this one place.

Everything below the gRPC adapter raises `ServiceError` (or a typed runtime error, turned into
one by `service_error`). A bad field travels as a structured `google.rpc.BadRequest` detail
whose field path names the field and the index in the caller's request (`inputs[3]`), next to
the readable message; clients read the detail, never the message.
"""

from __future__ import annotations

import re

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..workers.runtime.errors import BundleError, InvalidInput

_PATH = re.compile(r"^(?P<field>[A-Za-z_][A-Za-z0-9_.]*)(\[(?P<index>\d+)\])?$")


class ServiceError(Exception):
    """A failure with the gRPC status the client should see; `field`/`index` name the
    request value at fault, if any."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None,
                 index: int | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.index = index
        self.detail = message if detail is None else detail  # the message without the path

    def __repr__(self) -> str:
        return f"ServiceError({self.code.name}, {self.message!r})"

    @property
    def path(self) -> str | None:
        """`field` or `field[index]`."""
        if self.field is None:
            return None
        return self.field if self.index is None else f"{self.field}[{self.index}]"

    def rpc_status(self) -> grpc.Status:
        """The status with its BadRequest detail, for `context.abort_with_status`."""
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        if self.field is not None:
            detail = any_pb2.Any()
            detail.Pack(error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=self.path,
                                                            description=self.detail)]))
            status.details.append(detail)
        return rpc_status.to_status(status)


def invalid_argument(field: str, message: str, index: int | None = None) -> ServiceError:
    where = field if index is None else f"{field}[{index}]"
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {message}", field, index,
                        message)


def queue_full(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"queue full: {message}; retry later")


def unavailable(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message)


def deadline_exceeded(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, message)


def internal(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INTERNAL, message)


def service_error(exc: BaseException) -> ServiceError:
    """Map any exception raised below the gRPC adapter to the status a client sees."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, InvalidInput):
        return invalid_argument(exc.field, exc.detail, exc.index)
    if isinstance(exc, BundleError):
        return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    return internal(f"internal error: {exc!r}")


def status_number(code: grpc.StatusCode) -> int:
    """The google.rpc.Code number of a status (for EmbedStream's per-response `error`)."""
    return code.value[0]


def bad_request(err: grpc.RpcError) -> tuple[str, int | None, str] | None:
    """(field, index, description) of a status's BadRequest detail, or None."""
    status = rpc_status.from_call(err)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            for v in br.field_violations:
                m = _PATH.match(v.field)
                if m:
                    index = int(m["index"]) if m["index"] is not None else None
                    return m["field"], index, v.description
    return None


# -- HTTP ------------------------------------------------------------------------------------
# The HTTP status, OpenAI error `type` and `code` (a stable reason) of each gRPC status, in this
# one table. RESOURCE_EXHAUSTED is two rows: naming a field it is a request (or its response)
# too large, 413; without one it is the queue, 429 (with Retry-After).
HTTP_STATUS: dict[grpc.StatusCode, tuple[int, str, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_argument"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", "permission_denied"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "queue_full"),
    grpc.StatusCode.CANCELLED: (499, "invalid_request_error", "cancelled"),  # client gone
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error", "unimplemented"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "deadline_exceeded"),
}
TOO_LARGE = (413, "invalid_request_error", "request_too_large")
OTHER = (500, "server_error", "internal")
RETRY_AFTER_S = 1  # seconds, sent with 429 and 503


def http_status(err: ServiceError) -> tuple[int, str, str]:
    """(HTTP status, OpenAI error type, code) of a failure."""
    if err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.field is not None:
        return TOO_LARGE
    if err.code == grpc.StatusCode.NOT_FOUND and err.field == "model":
        return 404, "invalid_request_error", "model_not_found"
    return HTTP_STATUS.get(err.code, OTHER)


def too_large(field: str, message: str) -> ServiceError:
    """A request larger than the server takes (HTTP 413)."""
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{field}: {message}", field,
                        None, message)


def not_found(field: str, message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, message, field, None, message)
