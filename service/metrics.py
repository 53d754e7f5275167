"""Prometheus metrics of the service, on their own registry and HTTP port.

One registry per server instance (tests run several servers in one process). Everything is
counted in the frontend: workers report tokens per expert with each result, so there is no
multiprocess collector to set up. The port is an ASGI app that the server runs with uvicorn on
its event loop, under the same connection deadlines as the HTTP API (no thread per
connection, idle connections closed).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_asgi_app

NOT_FOUND = b"not found: metrics are at /metrics\n"

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0, 30.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "moe_embed_requests", "Finished requests by method and gRPC status code "
            "(each EmbedStream request counts once)", ["method", "code"], registry=r)
        self.errors = Counter(
            "moe_embed_errors", "Failed requests by method and gRPC status code",
            ["method", "code"], registry=r)
        self.latency = Histogram(
            "moe_embed_request_latency_seconds", "Time from receipt to response",
            ["method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(
            "moe_embed_queue_time_seconds", "Time a request's inputs waited for a worker",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.compute_time = Histogram(
            "moe_embed_batch_compute_seconds", "Worker time per batch",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_requests = Histogram(
            "moe_embed_batch_size_requests", "Requests with inputs in a batch",
            buckets=_SIZE_BUCKETS, registry=r)
        self.batch_inputs = Histogram(
            "moe_embed_batch_size_inputs", "Inputs in a batch", buckets=_SIZE_BUCKETS,
            registry=r)
        self.batch_tokens = Histogram(
            "moe_embed_batch_size_tokens", "Real (unpadded) tokens in a batch",
            buckets=_TOKEN_BUCKETS, registry=r)
        self.queue_depth = Gauge(
            "moe_embed_queue_depth", "Inputs waiting for a worker", registry=r)
        self.queue_tokens = Gauge(
            "moe_embed_queue_tokens", "Real tokens of the inputs waiting for a worker",
            registry=r)
        self.oldest_admitted: float | None = None  # time.monotonic() of the oldest waiting input
        self.queue_oldest_wait = Gauge(
            "moe_embed_queue_oldest_wait_seconds", "How long the oldest waiting input has "
            "waited (0 when nothing waits): the autoscaling signal", registry=r)
        self.queue_oldest_wait.set_function(self._oldest_wait)
        self.slots_busy = Gauge(
            "moe_embed_worker_slots_busy", "Worker batch slots holding a batch", registry=r)
        self.slots = Gauge(
            "moe_embed_worker_slots", "Worker batch slots of the ready workers", registry=r)
        self.truncated = Counter(
            "moe_embed_truncated_inputs", "Inputs cut to the model's max tokens (truncate=true)",
            registry=r)
        self.inputs_dropped = Counter(
            "moe_embed_inputs_dropped", "Queued inputs dropped before reaching a worker "
            "(request cancelled, past its deadline, or already failed)", registry=r)
        self.workers_ready = Gauge(
            "moe_embed_workers_ready", "Worker processes with a loaded runtime", registry=r)
        self.worker_restarts = Counter(
            "moe_embed_worker_restarts", "Worker processes restarted after dying",
            ["worker"], registry=r)
        self.batches_resent = Counter(
            "moe_embed_batches_resent", "Batches sent again after their worker died",
            registry=r)
        self.expert_tokens = Counter(
            "moe_embed_expert_tokens", "Tokens routed to each expert of each MoE layer",
            ["layer", "expert"], registry=r)
        self.connections_closed = Counter(
            "moe_embed_connections_closed", "HTTP connections the server closed or refused "
            "(reason: max_connections, headers_timeout, body_timeout)", ["port", "reason"],
            registry=r)
        self.transport_refusals = Counter(
            "moe_embed_grpc_stream_limit_reached", "Times a gRPC connection had "
            "--max-concurrent-streams calls open: gRPC clients hold their calls past that "
            "until one ends (a client that opens more anyway is refused UNAVAILABLE by gRPC)",
            registry=r)
        self.stream_window_requests = Gauge(
            "moe_embed_stream_window_requests", "EmbedStream requests read whose answers are "
            "not yet written to their client (each stream holds at most 512)", registry=r)
        self.stream_window_bytes = Gauge(
            "moe_embed_stream_window_bytes", "Bytes those answers take (each stream holds at "
            "most 4 MiB, or one answer): what clients that do not read cost the server",
            registry=r)
        self.heap_trims = Counter(
            "moe_embed_heap_trims", "Times the frontend gave free heap pages back to the "
            "kernel (malloc_trim, once RSS has grown 8 MB since the last, and at least every "
            "10 s)", registry=r)
        self._expert_children: dict[tuple[int, int], Counter] = {}
        self._request_children: dict[tuple[str, str], tuple[Counter, Counter | None]] = {}
        self._latency_children: dict[str, Histogram] = {}

    def _oldest_wait(self) -> float:
        oldest = self.oldest_admitted  # one read: set on the event loop, read at scrape time
        return 0.0 if oldest is None else max(0.0, time.monotonic() - oldest)

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        key = (method, code)
        children = self._request_children.get(key)
        if children is None:
            err = self.errors.labels(method, code) if code != "OK" else None
            children = self._request_children[key] = (self.requests.labels(method, code), err)
        children[0].inc()
        if children[1] is not None:
            children[1].inc()
        hist = self._latency_children.get(method)
        if hist is None:
            hist = self._latency_children[method] = self.latency.labels(method)
        hist.observe(seconds)

    def observe_experts(self, moe_layers: list[int], counts: np.ndarray) -> None:
        """Add one batch's tokens-per-expert matrix [layers, experts]."""
        for row, layer in enumerate(moe_layers):
            for expert, n in enumerate(counts[row].tolist()):
                if n:
                    key = (layer, expert)
                    child = self._expert_children.get(key)
                    if child is None:
                        child = self._expert_children[key] = self.expert_tokens.labels(
                            str(layer), str(expert))
                    child.inc(n)

    def connection_closed(self, port: str) -> Callable[[str], None]:
        """A counter of the connections one HTTP port closes, by reason."""
        def count(reason: str) -> None:
            self.connections_closed.labels(port, reason).inc()
        return count

    def asgi_app(self) -> Callable[[dict, Callable, Callable], Awaitable[None]]:
        """GET /metrics as an ASGI app (404 on any other path)."""
        exposition = make_asgi_app(self.registry)

        async def app(scope: dict, receive: Callable, send: Callable[[Any], Awaitable]) -> None:
            if scope.get("type") != "http":
                return
            if scope.get("path") == "/metrics":
                await exposition(scope, receive, send)
                return
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": NOT_FOUND})

        return app
