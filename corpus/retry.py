"""Retry of the failures a busy or restarting service gives (UNAVAILABLE, RESOURCE_EXHAUSTED),
with exponential backoff; every other failure is final."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import structlog

T = TypeVar("T")
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
ATTEMPTS = 12  # ~1 minute of backoff in all: long enough for a worker or server restart
FIRST_DELAY_S = 0.1
MAX_DELAY_S = 10.0

log = structlog.get_logger("moe_embed.batch")


class BackendError(RuntimeError):
    """A failure that retrying will not mend (or that outlasted every retry)."""

    def __init__(self, where: str, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{where}: {code.name}: {message}")
        self.code = code


class Retryable(Exception):
    """Raised by an attempt that may succeed if made again."""

    def __init__(self, where: str, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{where}: {code.name}: {message}")
        self.where = where
        self.code = code
        self.message = message


async def with_retries(attempt: Callable[[], Awaitable[T]], attempts: int = ATTEMPTS,
                       first_delay_s: float = FIRST_DELAY_S) -> T:
    """`await attempt()` until it does not raise Retryable, at most `attempts` times."""
    delay = first_delay_s
    for n in range(1, attempts + 1):
        try:
            return await attempt()
        except Retryable as exc:
            if n == attempts:
                raise BackendError(exc.where, exc.code,
                                   f"{exc.message} (still failing after {attempts} attempts)"
                                   ) from exc
            log.warning("batch.retry", where=exc.where, code=exc.code.name, attempt=n,
                        delay_s=round(delay, 2), message=exc.message)
            await asyncio.sleep(delay)
            delay = min(MAX_DELAY_S, delay * 2)
    raise AssertionError("unreachable")
