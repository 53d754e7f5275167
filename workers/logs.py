"""structlog JSON logging, one line per event, shared by the frontend and worker processes.

Lives in workers/ because worker processes configure it too and workers never import service/.
"""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def json_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """JSON lines on stderr at info level, whatever the process-wide structlog configuration
    filters at: for progress and one-off events that are asked for by a command, not a level."""
    return structlog.wrap_logger(
        structlog.PrintLogger(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.JSONRenderer()],
    ).bind(logger=name)


def configure_json_logging(level: str = "info", **static: object) -> None:
    """JSON lines on stderr: timestamp, level, event, bound context (e.g. request_id) and any
    `static` fields (e.g. worker=0) on every line."""
    def add_static(_logger: object, _name: str, event: dict) -> dict:
        for key, value in static.items():
            event.setdefault(key, value)
        return event

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_static,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
