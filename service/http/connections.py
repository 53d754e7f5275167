"""uvicorn's h11 protocol with a deadline on every phase of a connection and a bound on how many
a port holds.

uvicorn times out only an idle keep-alive connection; a client that sends nothing, half a header
or half a body would hold its socket (a descriptor) for ever. Here a connection must deliver its
request headers within `header_timeout_s` of opening (or of its previous response), and the
whole body within `body_timeout_s` of the headers; otherwise it is closed (a 408 when no response
has begun). Past `max_connections` open on one port a new connection is closed at once: the
server refuses clients rather than running out of descriptors. Both are counted and logged, at
most one line per reason every few seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..logging import Throttle

REQUEST_TIMEOUT = b"request timeout: the request was not received in time\n"


def _uncounted(_reason: str) -> None:
    pass


@dataclass
class ConnectionLimits:
    """One port's connection bounds; `count(reason)` is told of each connection they close
    (`max_connections`, `headers_timeout`, `body_timeout`)."""

    header_timeout_s: float
    body_timeout_s: float
    max_connections: int
    port_name: str = "http"
    count: Callable[[str], None] = _uncounted
    throttle: Throttle = field(default_factory=Throttle)

    def protocol(self) -> type[H11Protocol]:
        """An H11Protocol class bound to these limits (uvicorn's `http=` setting)."""
        return type("BoundedH11Protocol", (BoundedH11Protocol,), {"limits": self})


class BoundedH11Protocol(H11Protocol):
    """H11Protocol with header and body deadlines and a per-port connection bound."""

    limits: ConnectionLimits

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase = "headers"

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        limits = self.limits
        if len(self.connections) >= limits.max_connections:
            limits.count("max_connections")
            limits.throttle.warning(
                "connection_refused", port=limits.port_name,
                max_connections=limits.max_connections,
                note="the port holds its maximum of open connections; new ones are closed")
            transport.abort()
            return
        super().connection_made(transport)
        self._arm("headers", limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.transport is None:  # refused in connection_made
            return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # the next request's headers are awaited under keep-alive's timer (uvicorn's)
        self._disarm()
        self._phase = "idle"

    def _follow(self) -> None:
        """Move the deadline with the request: headers in -> the body's; body in -> none (the
        handler runs); bytes of a next request after a response -> the headers' again."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.more_body:
                if self._phase != "body":
                    self._arm("body", self.limits.body_timeout_s)
            elif self._phase != "handling":
                self._disarm()
                self._phase = "handling"
        elif self._phase == "idle":  # uvicorn stopped its keep-alive timer for these bytes
            self._arm("headers", self.limits.header_timeout_s)

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._phase = phase
        self._deadline = self.loop.call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        """Close a connection late with its request: a 408 if it was mid-body (h11 allows a
        response only once the headers are in), then close."""
        self._deadline = None
        if self.transport.is_closing():
            return
        limits = self.limits
        limits.count(f"{self._phase}_timeout")
        limits.throttle.info(
            "connection_timed_out", port=limits.port_name, phase=self._phase,
            timeout_s=limits.header_timeout_s if self._phase == "headers"
            else limits.body_timeout_s,
            note="a client did not send its request in time; its connection is closed")
        cycle = self.cycle
        if self._phase == "body" and cycle is not None and not cycle.response_started:
            cycle.response_started = True  # the handler's own response is not sent
            try:
                for event in (h11.Response(status_code=408, reason=b"Request Timeout", headers=[
                                  (b"content-type", b"text/plain; charset=utf-8"),
                                  (b"content-length", str(len(REQUEST_TIMEOUT)).encode()),
                                  (b"connection", b"close")]),
                              h11.Data(data=REQUEST_TIMEOUT), h11.EndOfMessage()):
                    self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:
                pass
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the handler's receive() reports a disconnect
            cycle.message_event.set()
        self.transport.close()
