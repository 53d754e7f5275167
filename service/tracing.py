"""OpenTelemetry tracing, off unless an OTLP endpoint is configured (`--otlp-endpoint`, or the
standard OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT; OTEL_SDK_DISABLED=true turns it off, and the
other OTEL_* variables, sampler and service name included, work as the SDK documents).

A request's trace: the server span of its protocol (the gRPC and FastAPI instrumentations make
it, taking W3C `traceparent` from metadata or headers) -> `tokenize` -> `queue` (admission until
its last input left for a worker). Each batch is a span of its own, linked to every request it
serves (and each request span links back), with a `worker.compute` child timed by the worker
itself (its time travels back with the result: no tracing code runs in a worker). Off, nothing
here runs: callers check `enabled` (or get None) before building anything.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import structlog

log = structlog.get_logger("moe_embed.tracing")

SPANS_EXCLUDED = ["receive", "send"]  # the ASGI instrumentation's per-message spans: noise


def _endpoint_from_env(env: dict[str, str]) -> str:
    return env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT", "")


class Tracing:
    """The tracer provider of one server, or nothing (`enabled` False)."""

    def __init__(self, endpoint: str = "", env: dict[str, str] | None = None) -> None:
        env = dict(os.environ if env is None else env)
        self.endpoint = endpoint or _endpoint_from_env(env)
        self.enabled = bool(self.endpoint) and \
            env.get("OTEL_SDK_DISABLED", "").strip().lower() != "true"
        self.provider: Any = None
        self.tracer: Any = None
        if self.enabled:
            self._start()

    def _start(self) -> None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from .model_info import package_version

        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME",
                                                                   "moe-embed"),
                                    "service.version": package_version()})
        self.provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER
        insecure = self.endpoint.startswith("http://")
        self.provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=self.endpoint, insecure=insecure)))
        self.tracer = self.provider.get_tracer("moe_embed")
        log.info("tracing_on", endpoint=self.endpoint)

    # -- the adapters' server spans ---------------------------------------------------------
    def grpc_interceptor(self) -> Any:
        """The gRPC instrumentation's server interceptor (None when off)."""
        if not self.enabled:
            return None
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        return aio_server_interceptor(tracer_provider=self.provider)

    def instrument_http(self, app: Any) -> None:
        """Server spans for the FastAPI app (nothing when off)."""
        if self.enabled:
            from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

            FastAPIInstrumentor.instrument_app(app, tracer_provider=self.provider,
                                               exclude_spans=SPANS_EXCLUDED)

    # -- the engine's spans -----------------------------------------------------------------
    @contextlib.contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[Any]:
        """A child of the current span (None when off)."""
        if not self.enabled:
            yield None
            return
        with self.tracer.start_as_current_span(name, attributes=attributes) as span:
            yield span

    def current(self) -> Any:
        """The current span (a request's), to link batches to; None when off."""
        if not self.enabled:
            return None
        from opentelemetry import trace

        span = trace.get_current_span()
        return span if span.get_span_context().is_valid else None

    def past_span(self, name: str, parent: Any, start_ns: int, end_ns: int,
                  **attributes: Any) -> Any:
        """A span that already happened (the queue wait, the worker's compute), a child of
        `parent` (a span; None: a root)."""
        from opentelemetry import trace

        context = trace.set_span_in_context(parent) if parent is not None else None
        span = self.tracer.start_span(name, context=context, start_time=start_ns,
                                      attributes=attributes)
        span.end(end_time=end_ns)
        return span

    def batch_span(self, served: list[Any], **attributes: Any) -> Any:
        """A batch's span: a root of its own, linked to every request span it serves (and
        each of them linked back)."""
        from opentelemetry import trace

        links = [trace.Link(r.get_span_context()) for r in served]
        span = self.tracer.start_span("batch", context=trace.set_span_in_context(
            trace.INVALID_SPAN), links=links, attributes=attributes)
        for r in served:
            r.add_link(span.get_span_context())
        return span

    def shutdown(self) -> None:
        """Export what is left (a drain ends here)."""
        if self.provider is not None:
            self.provider.shutdown()


def now_ns() -> int:
    return time.time_ns()
