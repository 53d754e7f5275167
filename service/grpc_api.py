"""The gRPC adapter: protobuf in, one engine call, protobuf out.

Engine failures become gRPC statuses from one table (`GRPC_STATUS`); a bad field travels as a
structured `google.rpc.BadRequest` detail whose field path names the field and the index in the
caller's request (`inputs[3]`), next to the readable message. Responses are built from the
vectors' float32 bytes (the packed wire form), not float by float.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import numpy as np
import structlog
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..v1 import embedder_pb2 as pb
from ..v1 import embedder_pb2_grpc as pb_grpc
from . import errors
from .config import ServeConfig
from .engine import EmbedOutcome, Engine
from .errors import Code, EngineError
from .logging import REQUEST_ID_HEADER, Throttle, bind_request_id, request_id_from
from .metrics import Metrics
from .security import AUTHORIZATION, Security, metadata_value
from .wire import TASK_OF_PROTO

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Embedder"].full_name  # moe_embed.v1.Embedder
KEEPALIVE_TIMEOUT_MS = 20_000  # an unanswered keepalive ping closes the connection
MIN_CLIENT_PING_MS = 10_000  # clients pinging more often are told off (GOAWAY)
# Calls gRPC core holds before a handler takes them, server-wide. Its defaults (1,000, and 3,000
# hard) cancel calls past them with CANCELLED, unseen by any handler or metric: a burst of 1,500
# calls on one connection lost 51. The engine's queue and each caller's share of it refuse
# visibly (RESOURCE_EXHAUSTED, counted) long before this many wait.
PENDING_CALLS = 16_384
STREAM_WINDOW = 512  # requests per stream not yet answered; past it the stream is read no further
# bytes the answers of a stream's window may take; past them the stream is read no further
# (512 answers of 256 full-size vectors, never read by their client, would be ~400 MB)
STREAM_ANSWER_BYTES = 4 << 20
# the gRPC status of each engine failure, in this one table
GRPC_STATUS: dict[Code, grpc.StatusCode] = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.QUEUE_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Code.CANCELLED: grpc.StatusCode.CANCELLED,
    Code.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Code.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
}

log = structlog.get_logger("moe_embed.grpc")
_DONE = object()
_streams = itertools.count(1)


def status_of(err: EngineError) -> grpc.Status:
    """The gRPC status of a failure, with its BadRequest detail (`abort_with_status`)."""
    code = GRPC_STATUS[err.code]
    status = status_pb2.Status(code=code.value[0], message=err.message)
    if err.field is not None:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=err.path,
                                                        description=err.detail)]))
        status.details.append(detail)
    return rpc_status.to_status(status)


def task_name(task: int) -> str | int | None:
    """The engine's name of a task enum value: None when unspecified (the engine says it is
    required), the number itself when no task has it (the engine names it)."""
    if task == pb.TASK_UNSPECIFIED:
        return None
    return TASK_OF_PROTO.get(task, task)


class Malformed:
    """A request message that could not be parsed (bad bytes, invalid UTF-8)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def engine_error(self) -> EngineError:
        return EngineError(Code.INVALID_ARGUMENT, f"malformed request message: {self.error}")


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A deserializer that hands a parse failure to the handler instead of failing the call
    (gRPC would answer UNKNOWN, and end a whole stream)."""
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except (DecodeError, ValueError, UnicodeDecodeError) as exc:
            return Malformed(exc)
    return deserialize


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _embeddings_wire(vectors: list[np.ndarray]) -> bytes:
    """`repeated Embedding embeddings = 2`, each `repeated float values = 1` packed: the wire
    bytes built from the float32 buffers (~10x faster than extending float by float)."""
    parts = []
    for v in vectors:
        data = np.ascontiguousarray(v, dtype="<f4").tobytes()
        body = b"\x0a" + _varint(len(data)) + data
        parts.append(b"\x12" + _varint(len(body)) + body)
    return b"".join(parts)


def response_bytes(n: int, dimensions: int) -> int:
    """An upper bound on an EmbedResponse for n inputs: each vector a packed float field
    (4 bytes a value + tags and lengths), its token count and flag; then id, model, timing."""
    return n * (4 * dimensions + 24) + 1024


def to_response(request_id: str, model: str, out: EmbedOutcome) -> pb.EmbedResponse:
    resp = pb.EmbedResponse.FromString(_embeddings_wire(out.vectors))
    resp.id = request_id
    resp.token_counts.extend(out.token_counts)
    resp.truncated.extend(out.truncated)
    resp.total_tokens = sum(out.token_counts)
    resp.dimensions = out.dimensions
    resp.model = model
    resp.timing.queue_ms = out.queue_ms
    resp.timing.compute_ms = out.compute_ms
    resp.timing.total_ms = out.total_ms
    return resp


def error_response(request_id: str, err: EngineError) -> pb.EmbedResponse:
    error = pb.Error(code=GRPC_STATUS[err.code].value[0], message=err.message,
                     field=err.field or "")
    if err.index is not None:
        error.index = err.index
    return pb.EmbedResponse(id=request_id, error=error)


def _cancel_code(context: grpc.aio.ServicerContext) -> str:
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"


class StreamWindow:
    """What one stream may hold before it is read no further: `requests` requests not yet
    answered and written, whose answers may take up to `answer_bytes` (each request's counted
    from its inputs and dimensions when it is read; one request is always let in). A client
    that stops reading stops the server from reading, computing and buffering more."""

    def __init__(self, requests: int, answer_bytes: int, metrics: Metrics) -> None:
        self.requests = requests
        self.free = requests
        self.held = 0  # bytes of the answers of the requests in the window
        self.answer_bytes = answer_bytes
        self.metrics = metrics
        self._changed = asyncio.Event()

    def _room(self, size: int) -> bool:
        return self.free > 0 and (self.held == 0 or self.held + size <= self.answer_bytes)

    async def acquire(self, size: int) -> None:
        """Wait for room for one more request whose answer takes `size` bytes."""
        while not self._room(size):
            self._changed.clear()
            await self._changed.wait()
        self.free -= 1
        self.held += size
        self.metrics.stream_window_requests.inc()
        self.metrics.stream_window_bytes.inc(size)

    def release(self, size: int) -> None:
        """A request's answer was written, or will never be: its room comes back."""
        self.free += 1
        self.held -= size
        self.metrics.stream_window_requests.dec()
        self.metrics.stream_window_bytes.dec(size)
        self._changed.set()

    def close(self) -> None:
        """The stream ended: what its window still holds will never be written."""
        self.metrics.stream_window_requests.dec(self.requests - self.free)
        self.metrics.stream_window_bytes.dec(self.held)
        self.free, self.held = self.requests, 0


class EmbedderServicer(pb_grpc.EmbedderServicer):
    """Protobuf in, engine call, protobuf out; failures become statuses via GRPC_STATUS."""

    def __init__(self, engine: Engine, metrics: Metrics,
                 security: Security | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.security = security
        self._open: dict[str, int] = {}  # Embedder calls open per client connection (peer)
        self._limit_log = Throttle()

    @contextlib.contextmanager
    def _counted(self, context: grpc.aio.ServicerContext) -> Iterator[None]:
        """Count the connection's open calls: one that reaches --max-concurrent-streams is
        counted (gRPC's clients hold their calls past it until a stream frees up)."""
        peer = context.peer()
        n = self._open[peer] = self._open.get(peer, 0) + 1
        limit = self.engine.config.max_concurrent_streams
        if n == limit:
            self.metrics.transport_refusals.inc()
            self._limit_log.warning(
                "stream_limit_reached", max_concurrent_streams=limit,
                note="a client connection has every call it may open in flight; its client "
                     "holds calls past it until one ends: use more channels or keep fewer "
                     "calls in flight")
        try:
            yield
        finally:
            left = self._open[peer] - 1
            if left:
                self._open[peer] = left
            else:
                del self._open[peer]

    def _answer_bytes(self, request: pb.EmbedRequest | Malformed) -> int:
        """The most an answer to `request` can take (an error's when it is malformed)."""
        if isinstance(request, Malformed):
            return response_bytes(0, 0)
        most = self.engine.bundle.manifest.dimensions.max  # more is refused, with a short error
        return response_bytes(len(request.inputs), min(request.dimensions or most, most))

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
            raise request.engine_error()
        out = await self.engine.embed(  # the texts decoded once (each access decodes anew)
            list(request.inputs), task_name(request.task), request.dimensions,
            truncate=request.truncate if request.HasField("truncate") else True,
            normalize=request.normalize if request.HasField("normalize") else True,
            timeout_s=timeout_s, caller=caller, response_size=response_bytes)
        return to_response(request.id, self.engine.model.name, out)

    def _begin(self, context: grpc.aio.ServicerContext) -> str:
        self.engine.note_call()
        request_id = request_id_from(context.invocation_metadata())
        bind_request_id(request_id)
        context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
        return request_id

    async def Embed(self, request: pb.EmbedRequest | Malformed,
                    context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        with self._counted(context):
            return await self._unary_embed(request, context)

    async def _unary_embed(self, request: pb.EmbedRequest | Malformed,
                           context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        start = time.perf_counter()
        self._begin(context)
        code = "OK"
        try:
            resp = await self._embed(request, context.time_remaining(), self._caller(context))
            log.debug("request_done", method="Embed", inputs=len(resp.embeddings),
                      tokens=resp.total_tokens, total_ms=round(resp.timing.total_ms, 3))
            return resp
        except EngineError as exc:
            code = exc.code.status
            log.info("request_failed", method="Embed", code=code, error=exc.message)
            await context.abort_with_status(status_of(exc))
        except asyncio.CancelledError:
            code = _cancel_code(context)
            raise
        finally:
            self.metrics.observe_request("Embed", code, time.perf_counter() - start)

    async def EmbedStream(self, request_iterator: AsyncIterator[pb.EmbedRequest | Malformed],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.EmbedResponse]:
        """Requests are read while the stream's window is open (StreamWindow): a request's
        room comes back when its response has been written, so a client that stops reading
        stops the server from reading (and from buffering) more."""
        with self._counted(context):
            async with contextlib.aclosing(self._stream(request_iterator, context)) as stream:
                async for resp in stream:
                    yield resp

    async def _stream(self, request_iterator: AsyncIterator[pb.EmbedRequest | Malformed],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.EmbedResponse]:
        self._begin(context)
        caller = f"{self._caller(context)}/stream-{next(_streams)}"
        out: asyncio.Queue = asyncio.Queue()
        window = StreamWindow(STREAM_WINDOW, STREAM_ANSWER_BYTES, self.metrics)
        tasks: set[asyncio.Task] = set()
        counts = {"requests": 0, "errors": 0}

        async def one(request: pb.EmbedRequest | Malformed, size: int) -> None:
            start = time.perf_counter()
            request_id = "" if isinstance(request, Malformed) else request.id
            code = "OK"
            try:
                with self.engine.tracing.span("EmbedStream.request", request_id=request_id):
                    resp = await self._embed(request, None, caller)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as exc:  # reported in this response; the stream goes on
                err = errors.engine_error(exc)
                code = err.code.status
                counts["errors"] += 1
                resp = error_response(request_id, err)
            finally:
                self.metrics.observe_request("EmbedStream", code, time.perf_counter() - start)
            out.put_nowait((resp, size))

        async def read() -> None:
            try:
                async for request in request_iterator:
                    size = self._answer_bytes(request)
                    await window.acquire(size)
                    counts["requests"] += 1
                    task = asyncio.create_task(one(request, size))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.wait(set(tasks))
            finally:
                out.put_nowait(_DONE)

        reader = asyncio.create_task(read())
        try:
            while (item := await out.get()) is not _DONE:
                resp, size = item
                yield resp
                window.release(size)  # written: the client has taken it
            await reader
            log.info("stream_closed", requests=counts["requests"], errors=counts["errors"])
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            window.close()

    async def Tokenize(self, request: pb.TokenizeRequest | Malformed,
                       context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        with self._counted(context):
            return await self._tokenize(request, context)

    async def _tokenize(self, request: pb.TokenizeRequest | Malformed,
                        context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        start = time.perf_counter()
        self._begin(context)
        code = "OK"
        try:
            if isinstance(request, Malformed):
                raise request.engine_error()
            resp = pb.TokenizeResponse()
            await self.engine.tokenize(  # the response is filled input by input, as they come
                list(request.inputs), task_name(request.task),
                each=lambda ids, pieces: resp.tokens.add(ids=ids, pieces=pieces))
            self._check_size(resp, len(resp.tokens))
            return resp
        except EngineError as exc:
            code = exc.code.status
            log.info("request_failed", method="Tokenize", code=code, error=exc.message)
            await context.abort_with_status(status_of(exc))
        except asyncio.CancelledError:
            code = _cancel_code(context)
            raise
        finally:
            self.metrics.observe_request("Tokenize", code, time.perf_counter() - start)

    def _check_size(self, resp: pb.TokenizeResponse, n: int) -> None:
        """A Tokenize response's size is known only once the inputs are tokenized (pieces vary
        in length; tokenizing costs at most max_tokens per input): one over the limit is refused
        here, counted RESOURCE_EXHAUSTED, instead of failing in gRPC after it is counted OK."""
        size, limit = resp.ByteSize(), self.engine.config.max_message_bytes
        if size > limit:
            raise errors.too_large(
                "inputs", f"the Tokenize response to {n} inputs would be {size} bytes, over "
                f"max_message_bytes {limit}; send fewer or shorter inputs per call")

    async def Info(self, request: pb.InfoRequest | Malformed,
                   context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        start = time.perf_counter()
        try:
            return pb.InfoResponse(**self.engine.info())
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


def server_options(cfg: ServeConfig) -> list[tuple[str, int]]:
    """Message size, per-connection stream and keepalive limits of the gRPC server."""
    options = [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.max_concurrent_streams", cfg.max_concurrent_streams),
        # gRPC core's "overload protection" counts a connection's streams until their memory is
        # freed, not while open, and refuses (REFUSED_STREAM: UNAVAILABLE) streams that a client
        # within the advertised limit opens: 350 of a burst of 1,500 on one connection, none of
        # it visible to the server. Off, only streams past the limit really open are refused.
        ("grpc.http.overload_protection", 0),
        ("grpc.server.max_pending_requests", PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS),
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
