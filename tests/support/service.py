"""Helpers for the service tests and benchmarks: a real server on a loopback port in a
background thread (`ServerThread`) or as `moe-embed serve` in its own process (`ServeProcess`),
gRPC stubs, the in-process embedder the service must agree with, and a Prometheus scraper.

Nothing here stands in for our code: the server is `EmbedServer` with real worker processes,
the clients are real gRPC channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
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
from moe_embed.service.local import LocalEmbedder
from moe_embed.service.logging import configure_logging
from moe_embed.service.server import EmbedServer
from moe_embed.service.tasks import task_named
from moe_embed.service.wire import PROTO_OF_TASK
from moe_embed.testing import procfs
from moe_embed.v1 import embedder_pb2 as pb
from moe_embed.v1 import embedder_pb2_grpc as pb_grpc

IN_PROCESS_THREADS = 2  # the ORT pool is process-wide: every test module must agree on it
CLI = Path(sys.executable).with_name("moe-embed")
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
PORT_FLAGS = ("--port", "--metrics-port", "--http-port")  # ServeProcess's order of its ports
TASKS = PROTO_OF_TASK  # API name -> proto enum
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """An EmbedServer on 127.0.0.1 whose event loop runs in a daemon thread."""

    def __init__(self, bundle: Path, **settings: Any) -> None:
        settings = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "http_port": 0,
                    "workers": 1, "threads_per_worker": 1, "log_level": "warning", **settings}
        self.config = ServeConfig(**settings)
        configure_logging(self.config.log_level)
        self.server = EmbedServer(self.config, bundle)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="test-server-loop")
        self._loading: Any = None

    def run(self, coro: Any, timeout: float = 180.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, wait_ready: bool = True, load: bool = True) -> ServerThread:
        """Listen; then load the workers (`load`), and wait for them (`wait_ready`). With
        load=False the server stays in its loading state until `load()`: a test that checks
        that state creates it instead of racing the workers' start."""
        self.thread.start()
        self.run(self.server.listen())
        if load:
            self.load()
        if wait_ready:
            self.wait_ready()
        return self

    def load(self) -> None:
        """Start loading the workers (once)."""
        if self._loading is None:
            self._loading = asyncio.run_coroutine_threadsafe(self.server.load(), self.loop)

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
    def url(self) -> str:
        """The HTTP API's base URL (plain http; the server has http_port set)."""
        return f"http://127.0.0.1:{self.server.http_port}"

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


def health_status(target: str, service: str = "", timeout: float = 10) -> int | None:
    with grpc.insecure_channel(target) as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
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


class ServeProcess:
    """`moe-embed serve` as its own process on loopback ports, its JSON log in a file.

    `args` are serve flags, passed through (workers, threads, limits...). The gRPC, metrics and
    HTTP ports are free loopback ports, except one that `args` sets itself (`--http-port 0`
    turns HTTP off): no flag is given twice. `cli` picks the executable (another checkout's, to
    compare); `strip_thread_env` drops OMP/OpenBLAS/MKL thread counts from the inherited
    environment, so the server's own settings decide; `env` adds variables.
    """

    def __init__(self, bundle: Path, log_path: Path, *args: str, cli: Path = CLI,
                 strip_thread_env: bool = False, **env: str) -> None:
        ports = {flag: _flag_value(args, flag) for flag in PORT_FLAGS}
        ours = {flag: str(free_port()) for flag, given in ports.items() if given is None}
        self.port, self.metrics_port, self.http_port = (
            int(ports[flag] or ours[flag]) for flag in PORT_FLAGS)
        self.log_path = log_path
        inherited = {k: v for k, v in os.environ.items()
                     if not (strip_thread_env and k in THREAD_ENV)}
        with open(log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                [str(cli), "serve", "--bundle", str(bundle), "--host", "127.0.0.1",
                 *(word for flag, port in ours.items() for word in (flag, port)), *args],
                env={**inherited, **env}, stdout=log_file, stderr=subprocess.STDOUT)
        self._launched = time.perf_counter()
        self.ready_s: float | None = None  # seconds from launch to SERVING (wait_serving)
        self.target = f"127.0.0.1:{self.port}"
        self.health_target = self.target  # where health answers in plaintext

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def wait_serving(self, timeout: float = 120) -> ServeProcess:
        """Wait for grpc.health SERVING (and record `ready_s`); fail with the log's tail if the
        server exits or takes longer than `timeout` seconds."""
        try:
            wait_for(lambda: health_status(self.health_target) == SERVING
                     or self.proc.poll() is not None,
                     timeout, "the server to serve", interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log:\n{self.log_tail()}") from None
        assert self.proc.poll() is None, \
            f"the server exited with {self.proc.returncode}; log:\n{self.log_tail()}"
        self.ready_s = time.perf_counter() - self._launched
        return self

    def log_tail(self, n: int = 3000) -> str:
        """The last `n` characters of the server's log ("" if there is none)."""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def events(self, name: str) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == name:
                    out.append(event)
        return out

    def worker_pids(self) -> list[int]:
        """Pids of the workers that reported ready (each logs `worker_ready`)."""
        return sorted({int(e["pid"]) for e in self.events("worker_ready") if "worker" in e})

    def worker_pid(self, index: int) -> int:
        """The pid worker `index` first reported."""
        return next(int(e["pid"]) for e in self.events("worker_ready") if e.get("worker") == index)

    def metrics(self) -> dict[str, float]:
        return scrape(self.metrics_port)

    def peak_rss_mb(self) -> float:
        """The frontend process's peak resident memory (VmHWM)."""
        kb = procfs.status_kb(self.proc.pid, "VmHWM")
        if kb is None:
            raise AssertionError("no VmHWM")
        return kb / 1024

    def memory(self) -> list[dict]:
        """RSS and peak RSS (VmHWM) in MB of the frontend and of each process below it, with
        its role: frontend, resource_tracker (multiprocessing's) or worker (the loader too)."""
        out = []
        for pid in [self.proc.pid, *procfs.descendants(self.proc.pid)]:
            try:
                command = procfs.cmdline(pid)
            except OSError:  # gone meanwhile
                continue
            role = ("frontend" if pid == self.proc.pid else
                    "resource_tracker" if "resource_tracker" in command else "worker")
            out.append({"pid": pid, "role": role, "rss_mb": procfs.rss_mb(pid),
                        "peak_rss_mb": procfs.peak_rss_mb(pid)})
        return out

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM (a drain), SIGKILL after `timeout` seconds; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        for pid in self.worker_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.stop()


def _flag_value(args: tuple[str, ...], flag: str) -> str | None:
    """The value `args` give `flag` (`--flag V` or `--flag=V`; the last one, as argparse)."""
    value = None
    for i, word in enumerate(args):
        if word == flag and i + 1 < len(args):
            value = args[i + 1]
        elif word.startswith(f"{flag}="):
            value = word.partition("=")[2]
    return value
