"""What the gRPC adapter and gRPC clients share about the contract (protos/): the task enum's
mapping to the engine's task names, and reading a status's BadRequest detail."""

from __future__ import annotations

import re

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ..v1 import embedder_pb2 as pb
from .tasks import TASKS

TASK_OF_PROTO = {pb.Task.Value(t.proto): t.name for t in TASKS}  # enum value -> name
PROTO_OF_TASK = {name: number for number, name in TASK_OF_PROTO.items()}  # name -> enum value
_PATH = re.compile(r"^(?P<field>[A-Za-z_][A-Za-z0-9_.]*)(\[(?P<index>\d+)\])?$")


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
