"""Prometheus metrics of the service, on their own registry and HTTP port.

One registry per server instance (tests run several servers in one process). Everything is
counted in the frontend: workers report tokens per expert with each result, so there is no
multiprocess collector to set up.
"""

from __future__ import annotations

import socketserver
import threading
import time
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # scrapes are not news
        pass


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

    def serve(self, port: int, host: str = "127.0.0.1") -> Callable[[], None]:
        """Serve GET /metrics over HTTP (404 on any other path); returns a function that
        stops the server."""
        exposition = make_wsgi_app(self.registry)

        def app(environ: dict, start_response: Callable) -> list[bytes]:
            if environ.get("PATH_INFO") == "/metrics":
                return exposition(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: metrics are at /metrics\n"]

        server = make_server(host, port, app, _ThreadingServer, handler_class=_QuietHandler)
        thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
        thread.start()

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        return stop
