"""The OpenAI-compatible HTTP API as a FastAPI app: a thin adapter from JSON to the same
`Engine` calls the gRPC adapter makes.

Every API route goes through `serve`: request id (`x-request-id` in, and back), API key, the
handler, the one error table (`HTTP_STATUS`) into OpenAI's error shape, the metrics
(`moe_embed_requests_total{method="http:/v1/embeddings"}`, codes by their canonical names, as for
gRPC) and the log line. A client that disconnects cancels its request: inputs still queued never
reach a worker. Bodies are written by orjson straight from the float32 vectors, a large one a
vector at a time off the event loop (`embeddings_body`; json.dumps of Python floats took ~150 ms
on the event loop; one orjson call over 256 x 768 values held the GIL ~4.5 ms: body_stall.py).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import errors
from ..engine import EmbedOutcome, Engine
from ..errors import Code, EngineError
from ..logging import REQUEST_ID_HEADER, bind_request_id, request_id_from
from ..metrics import Metrics
from ..security import Security, unauthenticated
from ..validation import Input, ids_too_long
from . import schema
from .embeddings_body import INLINE_VALUES, embeddings_body, values_in
from .json_scan import TooManyValues, ValueCounter

log = structlog.get_logger("moe_embed.http")

EMBEDDINGS = "/v1/embeddings"
MAX_MESSAGE_CHARS = 1000  # an error message quotes request values: never echo megabytes
JSON = "application/json"
# the engine's field names as OpenAI's schema calls them
HTTP_FIELDS = {"inputs": "input"}
RETRY_AFTER_S = 1  # seconds, sent with 429 and 503
INLINE_PARSE_BYTES = 64 * 1024  # larger bodies are parsed in the parsing thread
FRAMED_TWICE = "Content-Length"  # the "field" of a body framed by both headers
FIELD_ALLOWANCE = 64  # values and strings a body may hold beside its inputs (fields, keys)
# the HTTP status, OpenAI error `type` and `code` (a stable reason) of each engine failure
HTTP_STATUS: dict[Code, tuple[int, str, str]] = {
    Code.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_argument"),
    Code.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    Code.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    Code.TOO_LARGE: (413, "invalid_request_error", "request_too_large"),
    Code.QUEUE_FULL: (429, "rate_limit_error", "queue_full"),
    Code.CANCELLED: (499, "invalid_request_error", "cancelled"),  # the client went away
    Code.FAILED_PRECONDITION: (500, "server_error", "failed_precondition"),
    Code.INTERNAL: (500, "server_error", "internal"),
    Code.UNAVAILABLE: (503, "server_error", "unavailable"),
    Code.DEADLINE_EXCEEDED: (504, "server_error", "deadline_exceeded"),
}
_ERROR_CONTENT = {JSON: {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
ERROR_RESPONSES: dict[int | str, dict] = {
    400: {"description": "Bad input: `param` names the field and index (`input[3]`); "
                         "also a malformed JSON body or a value of the wrong type",
          "content": _ERROR_CONTENT},
    401: {"description": "Missing or wrong API key (`Authorization: Bearer <key>`)",
          "content": _ERROR_CONTENT},
    404: {"description": "`model` names a model this server does not serve",
          "content": _ERROR_CONTENT},
    413: {"description": "The body is over --max-message-bytes, or the response would be",
          "content": _ERROR_CONTENT},
    429: {"description": "The queue is full (or this caller holds its fair share of it): "
                         "retry after `Retry-After` seconds", "content": _ERROR_CONTENT},
    500: {"description": "A failure of the server (a batch lost with two workers)",
          "content": _ERROR_CONTENT},
    503: {"description": "Loading or draining: retry (elsewhere) after `Retry-After`",
          "content": _ERROR_CONTENT},
}
DESCRIPTION = """\
OpenAI-compatible embeddings for nomic-embed-text-v2-moe, served by moe-embed on the same
queue, batches and workers as its gRPC API.

The model was trained with task prefixes (`search_query: `, `search_document: `,
`classification: `, `clustering: `). OpenAI's schema has no such field, so texts go in **as
given**: add the prefix yourself, or set the extension field `task` and the server adds it.

With API keys on, every `/v1` route needs `Authorization: Bearer <key>`; `/health`, `/ready`
and this document do not.
"""


def _on_this_loop(coro: Coroutine[Any, Any, Any]) -> Awaitable[Any]:
    return coro


@dataclass
class HttpContext:
    """What the routes need from the server that runs them. `on_engine_loop` runs an engine
    coroutine on the engine's event loop (service/http/server.runner_on) when the app runs on
    a loop of its own; the engine's other methods the routes call only read its state."""

    engine: Engine
    metrics: Metrics
    security: Security
    on_engine_loop: Callable[[Coroutine[Any, Any, Any]], Awaitable[Any]] = field(
        default=_on_this_loop)


class ClientGone(Exception):
    """The client closed the connection before its response."""


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """`body` as JSON; numpy float32 arrays as their shortest exact decimal forms."""
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status, headers,
                    JSON)


def response_bytes(encoding: str) -> Callable[[int, int], int]:
    """An upper bound on the body of n embeddings of d dimensions in `encoding`: a float32 is
    at most 15 characters and a comma in JSON (`-1.2345678e-38`), base64 takes 4/3 bytes a
    byte; plus each item's keys and the envelope."""
    def size(n: int, dimensions: int) -> int:
        per_value = 16 if encoding == "float" else 4 * 4 / 3
        return int(n * (dimensions * per_value + 96)) + 1024
    return size


def _short(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[:MAX_MESSAGE_CHARS] + f"... ({len(message) - MAX_MESSAGE_CHARS} more chars)"


def error_body(err: EngineError) -> tuple[int, dict]:
    """The HTTP status and OpenAI error body of a failure; the engine's field names are
    OpenAI's (`inputs[3]` -> `input[3]`)."""
    status, kind, code = HTTP_STATUS[err.code]
    param, message = None, err.message
    if err.field is not None:
        field = HTTP_FIELDS.get(err.field, err.field)
        param = field if err.index is None else f"{field}[{err.index}]"
        if message.startswith(f"{err.path}:"):
            message = f"{param}:{message[len(err.path) + 1:]}"
    return status, {"error": {"message": _short(message), "type": kind, "param": param,
                              "code": code}}


def error_response(err: EngineError, close: bool = False) -> Response:
    status, body = error_body(err)
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status in (429, 503):
        headers["Retry-After"] = str(RETRY_AFTER_S)
    if close:  # draining: the client reconnects, to another replica; or a request framed twice
        headers["Connection"] = "close"
    return _json(body, status, headers)


def _invalid_body(exc: ValidationError) -> EngineError:
    """The first problem pydantic found, as a 400 naming its field."""
    first = exc.errors(include_url=False)[0]
    loc, kind, msg = first["loc"], first["type"], first["msg"]
    if kind == "json_invalid":
        return EngineError(Code.INVALID_ARGUMENT,
                           f"the body is not valid JSON: {msg.removeprefix('Invalid JSON: ')}")
    if not loc:
        return EngineError(Code.INVALID_ARGUMENT,
                           "the body must be a JSON object with an `input` field")
    index = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None
    return errors.InvalidInput(str(loc[0]), msg[0].lower() + msg[1:] if msg else kind, index)


class BodyLimits:
    """What a body may hold: `max_bytes` (--max-message-bytes), and the values and strings of
    the largest request the server takes (max_inputs inputs of max_tokens token ids each),
    counted while the body arrives (service/http/json_scan.py)."""

    def __init__(self, max_bytes: int, max_inputs: int, max_tokens: int) -> None:
        self.max_bytes = max_bytes
        self.max_inputs = max_inputs
        self.max_tokens = max_tokens
        self.max_values = max_inputs * max_tokens + FIELD_ALLOWANCE
        self.max_strings = max_inputs + FIELD_ALLOWANCE

    def counter(self) -> ValueCounter:
        return ValueCounter(self.max_values, self.max_strings, self.max_tokens,
                            2 * self.max_strings)

    def refusal(self, exc: TooManyValues) -> EngineError:
        if exc.kind == "ids":
            if exc.field == "input":
                return errors.InvalidInput("input", ids_too_long(
                    f"more than {self.max_tokens}", self.max_tokens), exc.index)
            return errors.InvalidInput(exc.field[:40], f"holds a list of {exc}: no field takes "
                                       "that many")
        if exc.kind in ("strings", "containers"):
            return errors.InvalidInput(
                "input", f"the body holds {exc}: at most {self.max_inputs} inputs per request "
                "(max_inputs); split the request")
        return errors.too_large(
            "body", f"the body holds {exc}: a request takes at most {self.max_inputs} inputs "
            f"of {self.max_tokens} token ids (longer token-id inputs cost what they hold "
            "before truncation); send fewer or shorter token-id inputs")


async def _read_body(request: Request, limits: BodyLimits) -> bytearray:
    """The body, refused as soon as it is known to be over `limits`: 413 by Content-Length or
    size, 413 (or 400 for too many strings) once it holds more values than any request takes,
    before it is read whole or parsed."""
    limit = limits.max_bytes
    declared = request.headers.get("content-length")
    if declared is not None and "transfer-encoding" in request.headers:
        raise errors.InvalidInput(  # RFC 9112 6.1: a proxy and we could read two bodies
            FRAMED_TWICE, "sent with Transfer-Encoding; send one of the two")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise errors.too_large("body", f"{declared} bytes is over the limit of {limit} "
                               "(--max-message-bytes); send fewer or shorter inputs")
    body, counter = bytearray(), limits.counter()
    try:
        async for chunk in request.stream():
            if len(body) + len(chunk) > limit:
                raise errors.too_large("body", f"over the limit of {limit} bytes "
                                       "(--max-message-bytes); send fewer or shorter inputs")
            counter.feed(chunk)
            body += chunk
    except ClientDisconnect:  # hung up, or closed for a late body: not the server's failure
        raise ClientGone() from None
    except TooManyValues as exc:
        raise limits.refusal(exc) from None
    return body


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[EmbedOutcome]) -> EmbedOutcome:
    """Await `work`, cancelling it if the client goes away first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watch.cancel()
        raise
    watch.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone()
    return task.result()


def create_app(ctx: HttpContext) -> FastAPI:
    """The FastAPI application of one server."""
    app = FastAPI(title="moe-embed", version=ctx.engine.model.version, description=DESCRIPTION,
                  openapi_tags=[{"name": "embeddings"}, {"name": "health"}],
                  redoc_url=None)  # /docs is the one documented page
    engine, security, metrics = ctx.engine, ctx.security, ctx.metrics
    body_limits = BodyLimits(engine.config.max_message_bytes, engine.limits.max_inputs or 1,
                             engine.limits.max_tokens)
    # large bodies are parsed here, one at a time: their parse never holds up the event loop's
    # other work for more than a switch interval, and only one is in memory as objects at once
    parsing = ThreadPoolExecutor(1, thread_name_prefix="moe-embed-http-parse")
    # large response bodies are written here, one at a time, a vector at a time
    # (embeddings_body: orjson holds the GIL for a whole call)
    responding = ThreadPoolExecutor(1, thread_name_prefix="moe-embed-http-respond")

    async def parse(body: bytearray) -> schema.EmbeddingRequest:
        try:
            if len(body) <= INLINE_PARSE_BYTES:
                return schema.EmbeddingRequest.model_validate_json(body)
            return await asyncio.get_running_loop().run_in_executor(
                parsing, schema.EmbeddingRequest.model_validate_json, body)
        except ValidationError as exc:
            raise _invalid_body(exc) from None

    def caller_of(request: Request) -> str:
        """The fairness unit: the API key with keys on, else the client connection."""
        if security.keys is None:
            client = request.client
            return f"http:{client.host}:{client.port}" if client else "http:unknown"
        caller = security.caller(request.headers.get("authorization"))
        if caller is None:
            raise unauthenticated()
        return caller

    async def serve(request: Request, method: str,
                    handler: Callable[[str], Awaitable[Response]]) -> Response:
        start = time.perf_counter()
        engine.note_call()
        request_id = request_id_from(request.headers.items())
        bind_request_id(request_id)
        code = "OK"
        try:
            response = await handler(caller_of(request))
        except EngineError as err:
            code = err.code.status
            log.info("request_failed", method=method, code=code, error=_short(err.message))
            response = error_response(err, engine.draining or err.field == FRAMED_TWICE)
        except ClientGone:
            code = "CANCELLED"
            log.info("request_cancelled", method=method,
                     note="the client disconnected (or was closed for a late body)")
            response = Response(status_code=499)
        except asyncio.CancelledError:
            # only the server's stop cancels a request task (a client that goes away is
            # ClientGone): answer it as any call refused while draining, not with uvicorn's
            # 500 and traceback
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            err = errors.unavailable("server is stopping (draining); retry elsewhere")
            code = err.code.status
            log.info("request_failed", method=method, code=code, error=err.message)
            response = error_response(err, close=True)
        except Exception as exc:  # a bug: still an OpenAI-shaped 500, and logged
            err = errors.internal(f"internal error: {exc!r}")
            code = err.code.status
            log.exception("request_error", method=method)
            response = error_response(err)
        finally:
            metrics.observe_request(method, code, time.perf_counter() - start)
        response.headers[REQUEST_ID_HEADER] = request_id
        return response

    @app.post(EMBEDDINGS, tags=["embeddings"], response_model=schema.EmbeddingResponse,
              responses=ERROR_RESPONSES, summary="Create embeddings (OpenAI's schema)",
              openapi_extra={"requestBody": {"required": True, "content": {JSON: {
                  "schema": schema.EmbeddingRequest.model_json_schema()}}}})
    async def embeddings(request: Request) -> Response:
        async def handle(caller: str) -> Response:
            req = await parse(await _read_body(request, body_limits))
            engine.check_model(req.model)
            if req.model_extra:  # names only (cut short), never values
                log.info("fields_ignored", fields=[f[:40] for f in sorted(req.model_extra)[:8]])
            inputs: list[Input] = req.input
            out = await _unless_disconnected(request, ctx.on_engine_loop(engine.embed(
                inputs, req.task, req.dimensions or 0, truncate=req.truncate,
                normalize=req.normalize, caller=caller,
                response_size=response_bytes(req.encoding_format))))
            log.debug("request_done", method=EMBEDDINGS, inputs=len(out.vectors),
                      tokens=sum(out.token_counts), total_ms=round(out.total_ms, 3))
            body = functools.partial(embeddings_body, out.vectors, out.truncated,
                                     req.encoding_format, engine.model.name,
                                     sum(out.token_counts))
            if values_in(out.vectors) > INLINE_VALUES:
                return Response(await asyncio.get_running_loop().run_in_executor(
                    responding, body), media_type=JSON)
            return Response(body(), media_type=JSON)
        return await serve(request, "http:" + EMBEDDINGS, handle)

    def model_card() -> dict:
        info = engine.info()
        return {"id": engine.model.name, "object": "model", "created": engine.model.created,
                "owned_by": "moe-embed", "dimensions": info["dimensions"],
                "min_dimensions": info["min_dimensions"],
                "max_dimensions": info["max_dimensions"], "max_tokens": info["max_tokens"],
                "max_inputs": info["max_inputs"], "precision": info["precision"]}

    @app.get("/v1/models", tags=["embeddings"], response_model=schema.ModelList,
             responses={401: ERROR_RESPONSES[401]}, summary="The served model")
    async def models(request: Request) -> Response:
        async def handle(_caller: str) -> Response:
            return _json({"object": "list", "data": [model_card()]})
        return await serve(request, "http:/v1/models", handle)

    @app.get("/v1/models/{model:path}", tags=["embeddings"], response_model=schema.Model,
             responses={401: ERROR_RESPONSES[401], 404: ERROR_RESPONSES[404]},
             summary="One model, if served")
    async def model(request: Request, model: str) -> Response:
        async def handle(_caller: str) -> Response:
            engine.check_model(model)
            return _json(model_card())
        return await serve(request, "http:/v1/models", handle)

    @app.head("/health", include_in_schema=False)  # probes that send HEAD
    @app.get("/health", tags=["health"], response_model=schema.Health,
             summary="Liveness: 200 while the process answers (loading and draining too)")
    async def health() -> Response:
        return _json({"status": "ok"})

    @app.head("/ready", include_in_schema=False)
    @app.get("/ready", tags=["health"], response_model=schema.Health,
             responses={503: {"description": "Loading, draining, or no worker can serve",
                              "model": schema.Health}},
             summary="Readiness: 200 when embeddings can be served, else 503 with the reason")
    async def ready() -> Response:
        status = engine.readiness()
        if status == "ok":
            return _json({"status": status})
        return _json({"status": status}, 503, {"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid")
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _json({"error": {"message": str(exc.detail), "type": kind, "param": None,
                                "code": code}}, exc.status_code, dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        return error_response(errors.InvalidInput(
            ".".join(str(p) for p in first["loc"][1:]) or "request", first["msg"]))

    _add_error_schema(app)
    return app


def _add_error_schema(app: FastAPI) -> None:
    """Put ErrorResponse (which no route returns as a model) into the OpenAPI components."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = build()
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            defs = schema.ErrorResponse.model_json_schema(
                ref_template="#/components/schemas/{model}")
            components.update(defs.pop("$defs", {}))
            components["ErrorResponse"] = defs
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
