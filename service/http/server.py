"""uvicorn on the frontend's event loop, beside grpc.aio: the HTTP API and the metrics port.

The listening socket is bound here (so a port in use is an error at startup, not uvicorn's
sys.exit, and port 0 is known at once); uvicorn installs no signal handlers (the frontend
handles SIGTERM/SIGINT and drains both protocols) and no logging config: its log records
become JSON lines like everything else. Every connection runs under `ConnectionLimits`
(service/http/connections.py): header, body and keep-alive deadlines, a bound per port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import structlog
import uvicorn

from ..logging import ToStructlog
from .connections import ConnectionLimits

log = structlog.get_logger("moe_embed.http")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the frontend owns the signals
        yield


def _route_uvicorn_logs() -> None:
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(h, ToStructlog) for h in logger.handlers):
            logger.addHandler(ToStructlog())
        logger.setLevel(logging.WARNING)  # startup banners are not news; errors are
        logger.propagate = False
    logging.getLogger("uvicorn.access").disabled = True  # our own log lines cover requests


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one); raises OSError."""
    host = host.strip("[]")
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class HttpServer:
    """One uvicorn server for an ASGI `app` on an already bound socket."""

    def __init__(self, app: Any, sock: socket.socket, ssl_context: ssl.SSLContext | None,
                 limits: ConnectionLimits, keepalive_s: float) -> None:
        _route_uvicorn_logs()
        config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False,
                                proxy_headers=False, server_header=False,
                                timeout_keep_alive=keepalive_s, http=limits.protocol())
        config.load()
        config.ssl = ssl_context  # ours: its certificates follow the reloads
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self._server = _Server(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._server.serve(sockets=[self.sock]), name="http-server")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError("the HTTP server stopped while starting")
            await asyncio.sleep(0.005)

    async def stop(self, grace_s: float) -> None:
        """Close the port, let requests in flight finish within `grace_s`, then cancel."""
        if self._task is None:
            self.sock.close()
            return
        self._server.config.timeout_graceful_shutdown = max(0.1, grace_s)
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace_s + 5)
        except (TimeoutError, Exception) as exc:  # never let HTTP block the drain
            log.warning("http_stop_incomplete", error=repr(exc))
            self._server.force_exit = True
            self._task.cancel()
        finally:
            self.sock.close()
