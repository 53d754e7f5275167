"""The engine's failure codes and each adapter's one table, row by row."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from moe_embed.service import errors
from moe_embed.service.errors import Code, EngineError, InvalidInput
from moe_embed.service.grpc_api import GRPC_STATUS, status_of
from moe_embed.service.http.app import HTTP_STATUS, error_body

EXPECTED = {  # code: (gRPC status, HTTP status, OpenAI error code, metrics label)
    Code.INVALID_ARGUMENT: ("INVALID_ARGUMENT", 400, "invalid_argument", "INVALID_ARGUMENT"),
    Code.TOO_LARGE: ("RESOURCE_EXHAUSTED", 413, "request_too_large", "RESOURCE_EXHAUSTED"),
    Code.QUEUE_FULL: ("RESOURCE_EXHAUSTED", 429, "queue_full", "RESOURCE_EXHAUSTED"),
    Code.NOT_FOUND: ("NOT_FOUND", 404, "model_not_found", "NOT_FOUND"),
    Code.UNAUTHENTICATED: ("UNAUTHENTICATED", 401, "invalid_api_key", "UNAUTHENTICATED"),
    Code.CANCELLED: ("CANCELLED", 499, "cancelled", "CANCELLED"),
    Code.DEADLINE_EXCEEDED: ("DEADLINE_EXCEEDED", 504, "deadline_exceeded",
                             "DEADLINE_EXCEEDED"),
    Code.UNAVAILABLE: ("UNAVAILABLE", 503, "unavailable", "UNAVAILABLE"),
    Code.FAILED_PRECONDITION: ("FAILED_PRECONDITION", 500, "failed_precondition",
                               "FAILED_PRECONDITION"),
    Code.INTERNAL: ("INTERNAL", 500, "internal", "INTERNAL"),
}


def test_every_code_has_a_row_in_each_table() -> None:
    assert set(EXPECTED) == set(Code) == set(GRPC_STATUS) == set(HTTP_STATUS)


@pytest.mark.parametrize("code", list(Code), ids=lambda c: c.name)
@pytest.mark.parametrize("field", [None, "inputs"])
def test_each_row_whatever_the_field(code: Code, field: str | None) -> None:
    """A status is the code's alone: naming a field never changes it (413 vs 429 was once
    chosen by whether a field was set)."""
    grpc_name, http, reason, label = EXPECTED[code]
    err = EngineError(code, "why", field)
    assert GRPC_STATUS[code] == grpc.StatusCode[grpc_name]
    status, body = error_body(err)
    assert (status, body["error"]["code"]) == (http, reason)
    assert code.status == label


def details_of(status: grpc.Status) -> list:
    raw = dict(status.trailing_metadata)["grpc-status-details-bin"]
    return list(status_pb2.Status.FromString(raw).details)


def test_a_field_travels_as_a_bad_request_detail_with_its_index() -> None:
    status = status_of(InvalidInput("inputs", "empty string", index=0))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert status.details == "inputs[0]: empty string"
    (detail,) = details_of(status)
    violation = error_details_pb2.BadRequest()
    detail.Unpack(violation)
    assert [(v.field, v.description) for v in violation.field_violations] == [
        ("inputs[0]", "empty string")]  # index 0 is an index, not "no index"


def test_no_field_no_detail_and_http_names_the_openai_field() -> None:
    assert details_of(status_of(errors.queue_full("full"))) == []
    status, body = error_body(InvalidInput("inputs", "empty string", index=3))
    assert (status, body["error"]["param"]) == (400, "input[3]")
    assert body["error"]["message"] == "input[3]: empty string"


def test_anything_else_is_internal_and_a_bundle_error_a_precondition() -> None:
    from moe_embed.workers.runtime.errors import BundleError

    assert errors.engine_error(RuntimeError("x")).code == Code.INTERNAL
    assert errors.engine_error(BundleError("gone")).code == Code.FAILED_PRECONDITION
    same = errors.queue_full("q")
    assert errors.engine_error(same) is same


def test_an_invalid_input_names_where_it_is() -> None:
    assert InvalidInput("inputs", "empty string", index=0).where == "inputs[0]"  # row 0 too
    assert InvalidInput("dimensions", "too large").where == "dimensions"
    err = InvalidInput("inputs", "empty string", index=2)
    assert (err.field, err.index, err.detail, err.message) == (
        "inputs", 2, "empty string", "inputs[2]: empty string")
    assert err.code is Code.INVALID_ARGUMENT and err.path == "inputs[2]"
    assert EngineError(Code.INTERNAL, "x").path is None
