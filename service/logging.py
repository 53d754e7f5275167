"""Structured JSON logs for the server, and the request id every request's log lines carry.

Every line the frontend writes is JSON: Python's logging (asyncio, grpc, uvicorn) is bridged
into structlog, the event loop's exception handler logs through it, and `json_stderr` turns
what C code writes to the stderr descriptor (gRPC core's handshake failures) into JSON lines.
Whatever can repeat is rate-limited (`Throttle`).

A client may send its own id in the `x-request-id` metadata (kept if it is short and printable);
otherwise one is made up. The id is bound to the request's asyncio task with structlog's
contextvars, so every line logged while serving it has `request_id`, and it is sent back in the
response's initial metadata.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterable

import structlog

from ..workers.logs import configure_json_logging

REQUEST_ID_HEADER = "x-request-id"

__all__ = ["REQUEST_ID_HEADER", "Throttle", "ToStructlog", "bind_request_id",
           "configure_logging", "install_loop_handler", "json_stderr", "request_id_from"]
_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
STDERR_LINE_CHARS = 2000  # a line of C output longer than this is cut
_ABSL_PREFIX = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ ")
_ABSL_LEVELS = {"I": "info", "W": "warning", "E": "error", "F": "error"}
THROTTLE_S = 10.0  # a repeating event is logged at most once in this many seconds


def configure_logging(level: str = "info") -> None:
    """structlog's JSON lines, and Python's own logging (asyncio, grpc) bridged into them."""
    configure_json_logging(level, component="frontend")
    root = logging.getLogger()
    if not any(isinstance(h, ToStructlog) for h in root.handlers):
        root.addHandler(ToStructlog())
    root.setLevel(logging.WARNING)  # libraries' warnings and errors; their info is not news


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


class Throttle:
    """Log an event that can repeat (a refused connection, a timed-out socket, descriptors
    exhausted) at most once every `interval_s` per event name; the next line that gets through
    says how many were held back (`suppressed`), so a flood costs a line, never a log flood."""

    def __init__(self, interval_s: float = THROTTLE_S, logger_name: str = "moe_embed.limits"
                 ) -> None:
        self.interval_s = interval_s
        self._log = structlog.get_logger(logger_name)
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()  # the stderr pump and logging handlers run in threads

    def _allow(self, event: str) -> int | None:
        """None to hold the line back, else how many were held back before it."""
        now = time.monotonic()
        last = self._last.get(event)
        if last is not None and now - last < self.interval_s:
            self._held[event] = self._held.get(event, 0) + 1
            return None
        self._last[event] = now
        return self._held.pop(event, 0)

    def info(self, event: str, **fields: object) -> None:
        self.emit("info", event, fields)

    def warning(self, event: str, **fields: object) -> None:
        self.emit("warning", event, fields)

    def error(self, event: str, **fields: object) -> None:
        self.emit("error", event, fields)

    def emit(self, level: str, event: str, fields: dict, key: str | None = None) -> None:
        """Log `event` at `level` unless a line of the same `key` (default: the event) went
        out less than `interval_s` ago."""
        with self._lock:
            held = self._allow(event if key is None else key)
        if held is not None:
            getattr(self._log, level)(event, suppressed=held, **fields)


class ToStructlog(logging.Handler):
    """stdlib log records as structlog events (JSON lines), a traceback as its `exception`
    field; one line per logger and message every THROTTLE_S (they can repeat in a loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.throttle = Throttle()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record must not break serving
            message = str(record.msg)
        level = record.levelname.lower()
        fields: dict[str, object] = {"logger": record.name, "message": message[:2000]}
        if record.exc_info and record.exc_info[1] is not None:
            fields["exc_info"] = record.exc_info
        level = level if level in ("info", "warning", "error") else "error"
        event = record.name.split(".")[0] or "log"  # uvicorn, asyncio, grpc
        self.throttle.emit(level, event, fields,
                           key=f"{record.name}:{str(record.msg)[:80]}")


def install_loop_handler(loop: asyncio.AbstractEventLoop) -> None:
    """The event loop's unhandled errors as JSON lines, rate-limited; descriptors running out
    (asyncio's accept loop retries every second) as one `descriptors_exhausted` line."""
    throttle = Throttle()

    def handle(_loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        message = str(context.get("message", ""))
        if isinstance(exc, OSError) and exc.errno in _EXHAUSTED:
            throttle.error("descriptors_exhausted", error=str(exc), message=message,
                           note="new connections wait in the listen backlog until descriptors "
                                "free up; lower --http-max-connections or raise the limit")
            return
        fields: dict[str, object] = {"message": message[:2000]}
        if exc is not None:
            fields["exc_info"] = (type(exc), exc, exc.__traceback__)
        throttle.emit("error", "event_loop_error", fields, key=message[:80])

    loop.set_exception_handler(handle)


def json_stderr() -> None:
    """Route the stderr descriptor through a thread that passes JSON lines on and wraps any
    other line (gRPC core writes to fd 2 from C) as a `stderr` event, rate-limited. structlog
    keeps writing to the real stderr, so the server's own lines never wait for that thread."""
    real = os.dup(2)
    sys.stderr.flush()
    out = os.fdopen(real, "w", buffering=1, encoding="utf-8", errors="replace",
                    closefd=False)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    sys.stderr = os.fdopen(2, "w", buffering=1, encoding="utf-8", errors="replace",
                           closefd=False)
    structlog.configure(logger_factory=structlog.WriteLoggerFactory(file=out))
    throttle = Throttle(logger_name="moe_embed.stderr")
    passing = structlog.WriteLogger(out)  # a line as it is, under structlog's lock for `out`

    def pump() -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            for raw in pipe:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if not line.strip():
                    continue
                if _is_json_object(line):  # a worker's line
                    passing.msg(line)
                    continue
                prefix = _ABSL_PREFIX.match(line)  # gRPC core: "E1203 08:20:01.123 42 f.cc:7] ..."
                level = _ABSL_LEVELS.get(line[0], "warning") if prefix else "warning"
                rest = line[prefix.end():] if prefix else line
                throttle.emit(level, "stderr", {"line": line[:STDERR_LINE_CHARS]},
                              key=rest[:60])

    threading.Thread(target=pump, name="json-stderr", daemon=True).start()


def _is_json_object(line: str) -> bool:
    if not line.startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False
