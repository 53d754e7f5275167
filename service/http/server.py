"""uvicorn for the HTTP API (on an event loop of its own, in a thread) and the metrics port (on
the frontend's loop, beside grpc.aio).

The HTTP API runs its connections on a loop of its own so that a flood of HTTP connections (each
~1.5 ms of uvicorn, h11 and routing) never makes gRPC and its health checks wait for a turn of
the loop: the two loops take turns on the GIL at its switch interval (5 ms) instead. Its handlers
run engine calls on the engine's loop (`runner_on`).

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
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import structlog
import uvicorn

from ..logging import ToStructlog, install_loop_handler
from .connections import ConnectionLimits

log = structlog.get_logger("moe_embed.http")
T = TypeVar("T")


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


def runner_on(loop: asyncio.AbstractEventLoop
              ) -> Callable[[Coroutine[Any, Any, T]], Awaitable[T]]:
    """A function that runs a coroutine on `loop` (the engine's) for a caller on another
    thread's loop: its result or error comes back, and cancelling the caller cancels it there.
    The coroutine runs in a copy of the caller's context (request id, trace)."""
    def run(coro: Coroutine[Any, Any, T]) -> Awaitable[T]:
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))
    return run


class HttpServer:
    """One uvicorn server for an ASGI `app` on an already bound socket; with `own_loop`, on an
    event loop of its own in a thread (start and stop are still awaited from the caller's)."""

    def __init__(self, app: Any, sock: socket.socket, ssl_context: ssl.SSLContext | None,
                 limits: ConnectionLimits, keepalive_s: float, own_loop: bool = False) -> None:
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
        self._own_loop = own_loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        if not self._own_loop:
            return await self._start_here()
        loop = self._loop = asyncio.new_event_loop()
        install_loop_handler(loop)  # its accept errors are JSON lines too
        self._thread = threading.Thread(target=self._run, args=(loop,), daemon=True,
                                        name="moe-embed-http")
        self._thread.start()
        try:
            await self._on_own_loop(self._start_here())
        except BaseException:
            await self._end_thread()
            raise

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    def _on_own_loop(self, coro: Coroutine[Any, Any, T]) -> Awaitable[T]:
        assert self._loop is not None
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def _end_thread(self) -> None:
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        thread, self._thread = self._thread, None
        await asyncio.get_running_loop().run_in_executor(None, thread.join)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop its connections run on (None before `start`)."""
        return self._loop

    async def _start_here(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(
            self._server.serve(sockets=[self.sock]), name="http-server")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError("the HTTP server stopped while starting")
            await asyncio.sleep(0.005)

    async def stop(self, grace_s: float) -> None:
        """Close the port, let requests in flight finish within `grace_s`, then cancel."""
        if not self._own_loop or self._thread is None:
            return await self._stop_here(grace_s)
        try:
            await self._on_own_loop(self._stop_here(grace_s))
        finally:
            await self._end_thread()

    async def _stop_here(self, grace_s: float) -> None:
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
