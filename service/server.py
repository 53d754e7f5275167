"""The server: the gRPC adapter (protobuf to the engine), the OpenAI-compatible HTTP adapter
beside it on the same event loop (service/http/), health, reflection, TLS and API keys
(service/security.py), metrics and the drain on SIGTERM.

Health (overall "" and "moe_embed.v1.Embedder"; HTTP /ready) is NOT_SERVING until every worker
has loaded, SERVING while at least one worker can serve, NOT_SERVING when none can (all dead or
restarting), and NOT_SERVING for good from the moment a drain starts. Health needs no API key;
with TLS on, `--health-port` serves it in plaintext for the kubelet's probes.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import signal
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import structlog
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from ..v1 import embedder_pb2 as pb
from ..v1 import embedder_pb2_grpc as pb_grpc
from ..workers.runtime.tasks import TASKS
from . import errors
from .config import ServeConfig
from .engine import EmbedOutcome, Engine
from .errors import ServiceError
from .logging import REQUEST_ID_HEADER, bind_request_id, request_id_from
from .metrics import Metrics
from .security import (
    AUTHORIZATION,
    RELOAD_POLL_S,
    ApiKeyInterceptor,
    Security,
    SecurityError,
    metadata_value,
)
from .worker_pool import WorkerStartError

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Embedder"].full_name  # moe_embed.v1.Embedder
HEALTH_SERVICES = ("", SERVICE_NAME)
LAME_DUCK_S = 0.5  # after a drain, the port closes once no call has come for this long
FINAL_GRACE_S = 1.0  # after a drain, for the last responses to be written
KEEPALIVE_TIMEOUT_MS = 20_000  # an unanswered keepalive ping closes the connection
MIN_CLIENT_PING_MS = 10_000  # clients pinging more often are told off (GOAWAY)
STREAM_WINDOW = 512  # requests per stream not yet answered; past it the stream is read no further
TASK_NAMES = {pb.Task.Value(t.proto): t.name for t in TASKS}

log = structlog.get_logger("moe_embed.server")
_DONE = object()
_streams = itertools.count(1)


class Malformed:
    """A request message that could not be parsed (bad bytes, invalid UTF-8)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def service_error(self) -> ServiceError:
        return ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"malformed request message: {self.error}")


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A deserializer that hands a parse failure to the handler instead of failing the call
    (gRPC would answer UNKNOWN, and end a whole stream)."""
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except (DecodeError, ValueError, UnicodeDecodeError) as exc:
            return Malformed(exc)
    return deserialize


def task_name(task: int) -> str:
    name = TASK_NAMES.get(task)
    if name is not None:
        return name
    choices = ", ".join(t.proto for t in TASKS)
    if task == pb.TASK_UNSPECIFIED:
        raise errors.invalid_argument("task", f"is required: one of {choices}")
    raise errors.invalid_argument("task", f"unknown value {task}; expected one of {choices}")


def to_response(request_id: str, model: str, out: EmbedOutcome) -> pb.EmbedResponse:
    resp = pb.EmbedResponse(
        id=request_id, token_counts=out.token_counts, total_tokens=sum(out.token_counts),
        dimensions=out.dimensions, model=model,
        timing=pb.Timing(queue_ms=out.queue_ms, compute_ms=out.compute_ms,
                         total_ms=out.total_ms))
    for vector in out.vectors:
        resp.embeddings.add().values.extend(vector.tolist())
    return resp


def error_response(request_id: str, err: ServiceError) -> pb.EmbedResponse:
    error = pb.Error(code=errors.status_number(err.code), message=err.message,
                     field=err.field or "")
    if err.index is not None:
        error.index = err.index
    return pb.EmbedResponse(id=request_id, error=error)


def _cancel_code(context: grpc.aio.ServicerContext) -> str:
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"


class EmbedderServicer(pb_grpc.EmbedderServicer):
    """Protobuf in, engine call, protobuf out; errors become statuses via errors.py."""

    def __init__(self, engine: Engine, metrics: Metrics,
                 security: Security | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.security = security
        self.model = engine.bundle.manifest.model_id
        self.last_call = time.monotonic()  # when the latest call began (for the lame duck)

    def _caller(self, context: grpc.aio.ServicerContext) -> str:
        """The fairness unit: the API key with keys on (checked by ApiKeyInterceptor), else
        the client connection."""
        if self.security is not None and self.security.keys is not None:
            key = self.security.caller(metadata_value(context.invocation_metadata(),
                                                      AUTHORIZATION))
            if key:
                return key
        return context.peer()

    async def _embed(self, request: pb.EmbedRequest | Malformed, timeout_s: float | None,
                     caller: str) -> pb.EmbedResponse:
        if isinstance(request, Malformed):
            raise request.service_error()
        out = await self.engine.embed(
            list(request.inputs), task_name(request.task), request.dimensions,
            truncate=request.truncate if request.HasField("truncate") else True,
            normalize=request.normalize if request.HasField("normalize") else True,
            timeout_s=timeout_s, caller=caller)
        return to_response(request.id, self.model, out)

    def _begin(self, context: grpc.aio.ServicerContext) -> str:
        self.last_call = time.monotonic()
        request_id = request_id_from(context.invocation_metadata())
        bind_request_id(request_id)
        context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
        return request_id

    async def Embed(self, request: pb.EmbedRequest | Malformed,
                    context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        start = time.perf_counter()
        self._begin(context)
        code = "OK"
        try:
            resp = await self._embed(request, context.time_remaining(), self._caller(context))
            log.debug("request_done", method="Embed", inputs=len(resp.embeddings),
                      tokens=resp.total_tokens, total_ms=round(resp.timing.total_ms, 3))
            return resp
        except ServiceError as exc:
            code = exc.code.name
            log.info("request_failed", method="Embed", code=code, error=exc.message)
            await context.abort_with_status(exc.rpc_status())
        except asyncio.CancelledError:
            code = _cancel_code(context)
            raise
        finally:
            self.metrics.observe_request("Embed", code, time.perf_counter() - start)

    async def EmbedStream(self, request_iterator: AsyncIterator[pb.EmbedRequest | Malformed],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.EmbedResponse]:
        """Requests are read while fewer than STREAM_WINDOW are unanswered: a slot is given
        back when its response has been written, so a client that stops reading stops the
        server from reading (and from buffering) more."""
        self._begin(context)
        caller = f"{self._caller(context)}/stream-{next(_streams)}"
        out: asyncio.Queue = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)
        tasks: set[asyncio.Task] = set()
        counts = {"requests": 0, "errors": 0}

        async def one(request: pb.EmbedRequest | Malformed) -> None:
            start = time.perf_counter()
            request_id = "" if isinstance(request, Malformed) else request.id
            code = "OK"
            try:
                resp = await self._embed(request, None, caller)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as exc:  # reported in this response; the stream goes on
                err = errors.service_error(exc)
                code = err.code.name
                counts["errors"] += 1
                resp = error_response(request_id, err)
            finally:
                self.metrics.observe_request("EmbedStream", code, time.perf_counter() - start)
            out.put_nowait(resp)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await window.acquire()
                    counts["requests"] += 1
                    task = asyncio.create_task(one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.wait(set(tasks))
            finally:
                out.put_nowait(_DONE)

        reader = asyncio.create_task(read())
        try:
            while (item := await out.get()) is not _DONE:
                yield item
                window.release()  # written: the client has taken it
            await reader
            log.info("stream_closed", requests=counts["requests"], errors=counts["errors"])
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def Tokenize(self, request: pb.TokenizeRequest | Malformed,
                       context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        start = time.perf_counter()
        self._begin(context)
        code = "OK"
        try:
            if isinstance(request, Malformed):
                raise request.service_error()
            pairs = await self.engine.tokenize(list(request.inputs), task_name(request.task))
            return pb.TokenizeResponse(tokens=[pb.Tokens(ids=ids, pieces=pieces)
                                               for ids, pieces in pairs])
        except ServiceError as exc:
            code = exc.code.name
            await context.abort_with_status(exc.rpc_status())
        except asyncio.CancelledError:
            code = _cancel_code(context)
            raise
        finally:
            self.metrics.observe_request("Tokenize", code, time.perf_counter() - start)

    async def Info(self, request: pb.InfoRequest | Malformed,
                   context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        start = time.perf_counter()
        try:
            return pb.InfoResponse(version=package_version(), **self.engine.info())
        finally:
            self.metrics.observe_request("Info", "OK", time.perf_counter() - start)


def add_servicer(servicer: EmbedderServicer, server: grpc.aio.Server) -> None:
    """Register the Embedder service with lenient request parsing (see `_lenient`)."""
    methods = {
        "Embed": (grpc.unary_unary_rpc_method_handler, pb.EmbedRequest, pb.EmbedResponse),
        "EmbedStream": (grpc.stream_stream_rpc_method_handler, pb.EmbedRequest,
                        pb.EmbedResponse),
        "Tokenize": (grpc.unary_unary_rpc_method_handler, pb.TokenizeRequest,
                     pb.TokenizeResponse),
        "Info": (grpc.unary_unary_rpc_method_handler, pb.InfoRequest, pb.InfoResponse),
    }
    handlers = {name: make(getattr(servicer, name), _lenient(request.FromString),
                           response.SerializeToString)
                for name, (make, request, response) in methods.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME,
                                                                         handlers),))


@functools.cache
def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moe-embed")
    except PackageNotFoundError:
        return "unknown"


def server_options(cfg: ServeConfig) -> list[tuple[str, int]]:
    """Message size, per-connection stream and keepalive limits of the gRPC server."""
    options = [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.max_concurrent_streams", cfg.max_concurrent_streams),
        ("grpc.keepalive_time_ms", int(cfg.keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_MS),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if cfg.max_connection_age_s > 0:
        options += [("grpc.max_connection_age_ms", int(cfg.max_connection_age_s * 1000)),
                    ("grpc.max_connection_age_grace_ms", int(cfg.drain_grace_s * 1000))]
    return options


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
        self.engine: Engine | None = None
        self.port: int | None = None
        self.http_port: int | None = None
        self.health_port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._http = None  # service.http.server.HttpServer when HTTP is on
        self._watch_task: asyncio.Task | None = None
        self._stop_metrics = None
        self._drained: asyncio.Event | None = None
        self._health_task: asyncio.Task | None = None
        self._serving: int | None = None
        self.servicer: EmbedderServicer | None = None

    async def start(self) -> None:
        """Listen at once (health NOT_SERVING), then load the workers (health SERVING)."""
        await self.listen()
        await self.load()

    async def listen(self) -> int:
        """Open the gRPC, HTTP, health and metrics ports; Embed answers UNAVAILABLE until
        `load` is done. Raises SecurityError naming a TLS or key file that cannot be used."""
        cfg = self.config
        self._drained = asyncio.Event()
        self.security.load()
        self.engine = Engine(cfg, self.bundle_path, self.metrics)
        interceptors = ([ApiKeyInterceptor(self.security, self.metrics, SERVICE_NAME)]
                        if self.security.keys is not None else [])
        server = self._server = grpc.aio.server(options=server_options(cfg),
                                                interceptors=interceptors)
        self.servicer = EmbedderServicer(self.engine, self.metrics, self.security)
        add_servicer(self.servicer, server)
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
            self._stop_metrics = self.metrics.serve(cfg.metrics_port,
                                                    cfg.metrics_host or cfg.host)
            self.metrics_port = cfg.metrics_port
        if self.security.files:
            self._watch_task = asyncio.get_running_loop().create_task(
                self.security.watch(self.reload_poll_s), name="credentials-watch")

    async def _listen_http(self) -> None:
        from .http.app import HttpContext, create_app  # FastAPI only when HTTP is on
        from .http.server import HttpServer, bind

        assert self.engine is not None
        cfg = self.config

        def note_call() -> None:
            if self.servicer is not None:
                self.servicer.last_call = time.monotonic()

        app = create_app(HttpContext(self.engine, self.metrics, self.security, note_call,
                                     _created(self.engine)))
        sock = bind(cfg.host, cfg.http_port)
        self._http = HttpServer(app, sock,
                                self.security.http_ssl_context() if cfg.tls else None)
        self.http_port = self._http.port
        await self._http.start()

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
        while self.servicer is not None and (now := time.monotonic()) < deadline:
            quiet_at = self.servicer.last_call + LAME_DUCK_S
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
        if self._stop_metrics is not None:
            self._stop_metrics()
            self._stop_metrics = None
        if self._drained is not None:
            self._drained.set()

    async def wait_stopped(self) -> None:
        assert self._drained is not None
        await self._drained.wait()


def _created(engine: Engine) -> int:
    """The bundle's export time in Unix seconds (OpenAI's model `created`)."""
    try:
        return int(datetime.fromisoformat(engine.bundle.manifest.created).timestamp())
    except (TypeError, ValueError):
        return int(engine.bundle.path.stat().st_mtime)


async def serve(config: ServeConfig, bundle_path: str | Path) -> int:
    """Run until SIGTERM/SIGINT, then drain. Exit status: 0 after a drain, 1 if the workers
    could not start."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = EmbedServer(config, bundle_path)
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
