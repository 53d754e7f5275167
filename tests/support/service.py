"""Helpers for the service tests: a real server on a loopback port in a background thread,
gRPC stubs, the in-process embedder the service must agree with, and a Prometheus scraper.

Nothing here stands in for our code: the server is `EmbedServer` with real worker processes,
the clients are real gRPC channels.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_embed.service.config import ServeConfig
from moe_embed.service.logging import configure_logging
from moe_embed.service.server import EmbedServer
from moe_embed.v1 import embedder_pb2 as pb
from moe_embed.v1 import embedder_pb2_grpc as pb_grpc
from moe_embed.workers.runtime.embedder import LocalEmbedder
from moe_embed.workers.runtime.tasks import TASKS as TASK_TABLE
from moe_embed.workers.runtime.tasks import task_named

IN_PROCESS_THREADS = 2  # the ORT pool is process-wide: every test module must agree on it
TASKS = {t.name: pb.Task.Value(t.proto) for t in TASK_TABLE}  # API name -> proto enum
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """An EmbedServer on 127.0.0.1 whose event loop runs in a daemon thread."""

    def __init__(self, bundle: Path, **settings: Any) -> None:
        settings = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "workers": 1,
                    "threads_per_worker": 1, "log_level": "warning", **settings}
        self.config = ServeConfig(**settings)
        configure_logging(self.config.log_level)
        self.server = EmbedServer(self.config, bundle)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="test-server-loop")
        self._loading: Any = None

    def run(self, coro: Any, timeout: float = 180.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, wait_ready: bool = True) -> ServerThread:
        self.thread.start()
        self.run(self.server.listen())
        self._loading = asyncio.run_coroutine_threadsafe(self.server.load(), self.loop)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 180.0) -> None:
        self._loading.result(timeout)

    def stop(self, grace_s: float = 5.0) -> None:
        try:
            self.run(self.server.drain(grace_s))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def pool(self):
        return self.server.engine.pool

    @property
    def scheduler(self):
        return self.server.engine.scheduler

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        """Run a plain function on the server's loop (to read its state consistently)."""
        async def call() -> Any:
            return fn()
        return self.run(call(), 10)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def stub(self) -> pb_grpc.EmbedderStub:
        return pb_grpc.EmbedderStub(self.channel())


def health_status(target: str, service: str = "") -> int | None:
    with grpc.insecure_channel(target) as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2).status
        except grpc.RpcError:
            return None


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.02) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def scrape(port: int) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def vectors(resp: pb.EmbedResponse) -> np.ndarray:
    return np.array([list(e.values) for e in resp.embeddings], dtype=np.float32)


class Expected:
    """In-process embeddings (the LocalEmbedder the CLI uses), memoized per text/task/dims."""

    def __init__(self, bundle: Path) -> None:
        self.embedder = LocalEmbedder(bundle, IN_PROCESS_THREADS)
        self._memo: dict[tuple[str, str, int], np.ndarray] = {}

    def __call__(self, texts: list[str], task: str, dims: int = 0) -> np.ndarray:
        for t in texts:  # one at a time: the reference is the text embedded alone
            if (t, task, dims) not in self._memo:
                self._memo[(t, task, dims)] = self.embedder.embed([t], task, dims).vectors[0]
        return np.stack([self._memo[(t, task, dims)] for t in texts])

    def tokens(self, texts: list[str], task: str) -> list[int]:
        return [len(x) for x in self.embedder.tokenizer.encode(texts, task_named(task))]
