"""Structured JSON logs for the server, and the request id every request's log lines carry.

A client may send its own id in the `x-request-id` metadata (kept if it is short and printable);
otherwise one is made up. The id is bound to the request's asyncio task with structlog's
contextvars, so every line logged while serving it has `request_id`, and it is sent back in the
response's initial metadata.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import structlog

from ..workers.logs import configure_json_logging

REQUEST_ID_HEADER = "x-request-id"

__all__ = ["REQUEST_ID_HEADER", "bind_request_id", "configure_logging", "request_id_from"]


def configure_logging(level: str = "info") -> None:
    configure_json_logging(level, component="frontend")


def request_id_from(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The client's x-request-id if usable, else a fresh random id."""
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str):
            if 0 < len(value) <= 128 and value.isprintable():
                return value
    return uuid.uuid4().hex[:16]


def bind_request_id(request_id: str) -> None:
    """Attach the id to every log line of the current task."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
