"""The composition root: one running service wires the engine, the gRPC adapter
(service/grpc_api.py), the OpenAI-compatible HTTP adapter beside it on an event loop of its own
whose engine calls run on the engine's (service/http/), health, reflection, TLS and API keys
(service/security.py), metrics and the drain on SIGTERM. The adapters know the engine, never
each other.

Health (overall "" and "moe_embed.v1.Embedder"; HTTP /ready) is NOT_SERVING until every worker
has loaded, SERVING while at least one worker can serve, NOT_SERVING when none can (all dead or
restarting), and NOT_SERVING for good from the moment a drain starts. Health needs no API key;
with TLS on, `--health-port` serves it in plaintext for the kubelet's probes.
"""

from __future__ import annotations

import asyncio
import resource
import signal
import time
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from . import heap
from .config import ServeConfig
from .engine import Engine
from .grpc_api import SERVICE_NAME, EmbedderServicer, add_servicer, server_options
from .logging import install_loop_handler
from .metrics import Metrics
from .security import RELOAD_POLL_S, ApiKeyInterceptor, Security, SecurityError
from .tracing import Tracing
from .worker_pool import WorkerStartError

HEALTH_SERVICES = ("", SERVICE_NAME)
METRICS_MAX_CONNECTIONS = 256  # scrapers open one or two: room for them beside idle sockets
LAME_DUCK_S = 0.5  # after a drain, the port closes once no call has come for this long
FINAL_GRACE_S = 1.0  # after a drain, for the last responses to be written

log = structlog.get_logger("moe_embed.server")


def descriptor_limit() -> int:
    """This process's soft limit on open file descriptors."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class EmbedServer:
    """One running service: gRPC server, HTTP server, engine (workers), health, metrics
    endpoint, and the TLS material and API keys they use."""

    reload_poll_s = RELOAD_POLL_S  # how often TLS and key files are checked for a change

    def __init__(self, config: ServeConfig, bundle_path: str | Path) -> None:
        self.config = config
        self.bundle_path = Path(bundle_path)
        self.metrics = Metrics()
        self.health = health_aio.HealthServicer()
        self.security = Security(config)
        self.tracing = Tracing(config.otlp_endpoint)
        self.engine: Engine | None = None
        self.port: int | None = None
        self.http_port: int | None = None
        self.health_port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._http = None  # service.http.server.HttpServer when HTTP is on
        self._watch_task: asyncio.Task | None = None
        self._metrics_http = None  # service.http.server.HttpServer when metrics are on
        self._drained: asyncio.Event | None = None
        self._health_task: asyncio.Task | None = None
        self._serving: int | None = None

    async def start(self) -> None:
        """Listen at once (health NOT_SERVING), then load the workers (health SERVING)."""
        await self.listen()
        await self.load()

    async def listen(self) -> int:
        """Open the gRPC, HTTP, health and metrics ports; Embed answers UNAVAILABLE until
        `load` is done. Raises SecurityError naming a TLS or key file that cannot be used."""
        cfg = self.config
        self._drained = asyncio.Event()
        install_loop_handler(asyncio.get_running_loop())
        self.security.load()
        self.engine = Engine(cfg, self.bundle_path, self.metrics, self.tracing)
        interceptors = [i for i in (
            self.tracing.grpc_interceptor(),
            ApiKeyInterceptor(self.security, self.metrics, SERVICE_NAME)
            if self.security.keys is not None else None) if i is not None]
        server = self._server = grpc.aio.server(options=server_options(cfg),
                                                interceptors=interceptors)
        add_servicer(EmbedderServicer(self.engine, self.metrics, self.security), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if cfg.reflection:
            reflection.enable_server_reflection((
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ), server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{cfg.host}:{cfg.port}"
        self.port = (server.add_secure_port(address, self.security.grpc_credentials())
                     if cfg.tls else server.add_insecure_port(address))
        if not self.port:
            raise OSError(f"cannot listen on {address}")
        await server.start()
        try:
            await self._listen_beside()
        except BaseException:
            await self._shutdown(grace_s=0)
            raise
        info = self.engine.info()
        log.info("listening", host=cfg.host, port=self.port, http_port=self.http_port,
                 health_port=self.health_port, metrics_port=cfg.metrics_port, tls=cfg.tls,
                 mtls=bool(cfg.tls_client_ca_file),
                 api_keys=len(self.security.keys) if self.security.keys else 0,
                 reflection=cfg.reflection, model_id=info["model_id"],
                 bundle=str(self.bundle_path), workers=cfg.workers,
                 threads_per_worker=cfg.threads_per_worker)
        return self.port

    async def _listen_beside(self) -> None:
        """The ports beside gRPC: plaintext health, HTTP, metrics; and the file watch."""
        cfg = self.config
        if cfg.health_port:
            health = self._health_server = grpc.aio.server(options=server_options(cfg))
            health_pb2_grpc.add_HealthServicer_to_server(self.health, health)
            self.health_port = health.add_insecure_port(f"{cfg.host}:{cfg.health_port}")
            if not self.health_port:
                raise OSError(f"cannot listen on {cfg.host}:{cfg.health_port}")
            await health.start()
        if cfg.http_port:
            await self._listen_http()
        if cfg.metrics_port:
            await self._listen_metrics()
        if self.security.files:
            self._watch_task = asyncio.get_running_loop().create_task(
                self.security.watch(self.reload_poll_s), name="credentials-watch")

    def _limits(self, port_name: str, max_connections: int):
        """The connection deadlines and bound of one HTTP port (service/http/connections.py),
        the bound at most half the descriptor limit so that HTTP alone cannot exhaust it."""
        from .http.connections import ConnectionLimits

        cfg = self.config
        allowed = min(max_connections, max(16, descriptor_limit() // 2))
        if allowed < max_connections:
            log.warning("http_max_connections_lowered", port=port_name,
                        configured=max_connections, allowed=allowed,
                        descriptor_limit=descriptor_limit())
        return ConnectionLimits(cfg.http_header_timeout_s, cfg.http_body_timeout_s, allowed,
                                port_name, self.metrics.connection_closed(port_name))

    async def _listen_http(self) -> None:
        from .http.app import HttpContext, create_app  # FastAPI only when HTTP is on
        from .http.server import HttpServer, bind, runner_on

        assert self.engine is not None
        cfg = self.config
        app = create_app(HttpContext(self.engine, self.metrics, self.security,
                                     runner_on(asyncio.get_running_loop())))
        self.tracing.instrument_http(app)
        sock = bind(cfg.host, cfg.http_port)
        # on a loop of its own: a flood of HTTP connections never holds up gRPC's turns
        self._http = HttpServer(app, sock,
                                self.security.http_ssl_context() if cfg.tls else None,
                                self._limits("http", cfg.http_max_connections),
                                cfg.http_keepalive_s, own_loop=True)
        self.http_port = self._http.port
        await self._http.start()

    async def _listen_metrics(self) -> None:
        """/metrics on its own port, served on this event loop (no thread per connection)."""
        from .http.server import HttpServer, bind

        cfg = self.config
        sock = bind(cfg.metrics_host or cfg.host, cfg.metrics_port)
        self._metrics_http = HttpServer(self.metrics.asgi_app(), sock, None,
                                        self._limits("metrics", METRICS_MAX_CONNECTIONS),
                                        cfg.http_keepalive_s)
        self.metrics_port = self._metrics_http.port
        await self._metrics_http.start()

    def reload_credentials(self) -> bool:
        """SIGHUP: re-read the TLS and API-key files now (new connections use them)."""
        if not self.security.files:
            log.info("reload_skipped", note="no TLS or API-key file configured")
            return False
        return self.security.reload(force=True)

    async def load(self) -> None:
        """Start the workers and wait for every one to load; then health follows the workers
        (SERVING while one can serve)."""
        assert self.engine is not None
        try:
            await self.engine.start()
        except BaseException:
            await self._shutdown(grace_s=0)
            raise
        await self._follow_workers()
        self._health_task = asyncio.get_running_loop().create_task(self._watch_workers())
        log.info("serving", workers=self.engine.pool.ready_count)

    async def _follow_workers(self) -> None:
        assert self.engine is not None
        if self.engine.draining:
            return
        status = (health_pb2.HealthCheckResponse.SERVING if self.engine.pool.ready_count
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        if status != self._serving:
            await self._set_health(status)
            if status != health_pb2.HealthCheckResponse.SERVING:
                log.warning("no_worker_can_serve")

    async def _watch_workers(self) -> None:
        assert self.engine is not None
        while True:
            await self.engine.pool.changes.wait()
            await self._follow_workers()

    async def _set_health(self, status: int) -> None:
        self._serving = status
        for service in HEALTH_SERVICES:
            await self.health.set(service, status)

    async def drain(self, grace_s: float | None = None) -> bool:
        """Health NOT_SERVING, refuse new work, let admitted work finish within the grace,
        then stop. Returns whether everything admitted finished in time."""
        grace_s = self.config.drain_grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace_s
        if self._health_task is not None:
            self._health_task.cancel()
        await self.health.enter_graceful_shutdown()
        finished = True
        if self.engine is not None:
            self.engine.begin_drain()
            log.info("draining", grace_s=grace_s)
            finished = await self.engine.wait_idle(grace_s)
        await self._lame_duck(deadline)
        # what is left: idle streams and health watchers
        await self._shutdown(min(FINAL_GRACE_S, max(0.0, deadline - time.monotonic())))
        log.info("stopped", finished_in_grace=finished)
        return finished

    async def _lame_duck(self, deadline: float) -> None:
        """Admitted work is done. Go on refusing new calls with UNAVAILABLE until none has come
        for LAME_DUCK_S (or the grace ends): gRPC's stop cancels calls that arrive as it
        happens, and CANCELLED is not retried where UNAVAILABLE is."""
        while self.engine is not None and (now := time.monotonic()) < deadline:
            quiet_at = self.engine.last_call + LAME_DUCK_S
            if quiet_at <= now:
                return
            await asyncio.sleep(min(quiet_at, deadline) - now)

    async def _shutdown(self, grace_s: float) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        if self._watch_task is not None:
            self._watch_task.cancel()
        stopping = []
        if self._server is not None:
            stopping.append(self._server.stop(grace_s))
        if self._http is not None:
            stopping.append(self._http.stop(grace_s))
            self._http = None
        await asyncio.gather(*stopping)
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self.engine is not None:
            await self.engine.close()
        if self._metrics_http is not None:
            await self._metrics_http.stop(0)
            self._metrics_http = None
        await asyncio.get_running_loop().run_in_executor(None, self.tracing.shutdown)
        if self._drained is not None:
            self._drained.set()

    async def wait_stopped(self) -> None:
        assert self._drained is not None
        await self._drained.wait()


async def serve(config: ServeConfig, bundle_path: str | Path) -> int:
    """Run until SIGTERM/SIGINT, then drain. Exit status: 0 after a drain, 1 if the workers
    could not start."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("heap", large_blocks_mapped=heap.fix_mmap_threshold(),  # before the tokenizer
             arenas_limited=heap.limit_arenas())  # before the server's threads start
    server = EmbedServer(config, bundle_path)
    trimmer = heap.Trimmer(on_trim=server.metrics.heap_trims.inc)
    trimming = asyncio.create_task(trimmer.run(), name="heap-trim")
    try:
        return await _serve(server, loop, stop)
    finally:
        trimming.cancel()


async def _serve(server: EmbedServer, loop: asyncio.AbstractEventLoop,
                 stop: asyncio.Event) -> int:
    loop.add_signal_handler(signal.SIGHUP, server.reload_credentials)
    starting = asyncio.create_task(server.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done() and starting.exception() is not None:
        stopping.cancel()
        exc = starting.exception()
        log.error("start_failed", error=str(exc))
        if isinstance(exc, SecurityError):
            return 2
        return 1 if isinstance(exc, WorkerStartError | OSError) else 2
    await stopping
    if not starting.done():
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        log.info("stopped_while_starting")
        await server._shutdown(0)
        return 0
    await server.drain()
    return 0
