"""The worker processes: start them, feed them batches, notice deaths and restart them.

Each worker is a "spawn" process (torch and ONNX Runtime are not fork-safe) with two pipes:
batches go down one, results come up the other, read by the event loop when readable. A
worker that dies (even SIGKILL: its pipe reaches EOF) is restarted, and the batches it held
are sent again, once, to whichever worker is free first; a batch that was in flight on two
workers that died fails with INTERNAL naming it.
"""

from __future__ import annotations

import asyncio
import fcntl
import multiprocessing
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import structlog

from ..workers import protocol
from ..workers.worker import worker_main
from . import errors
from .batcher import Batch
from .errors import ServiceError

MAX_IN_FLIGHT = 2  # batches per worker: one running, one waiting in its pipe
PIPE_BYTES = 1 << 20  # grown pipes: a batch message never blocks the event loop on write
MAX_ATTEMPTS = 2  # workers a batch may be sent to
RESTART_BACKOFF_S = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)

log = structlog.get_logger("moe_embed.pool")


class WorkerStartError(RuntimeError):
    """A worker could not load its runtime at startup (bad bundle, out of memory...)."""


def _grow_pipe(conn: Connection) -> None:
    try:
        fcntl.fcntl(conn.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    except OSError:
        pass  # capped by /proc/sys/fs/pipe-max-size: writes may then wait on a busy worker


class Worker:
    """The frontend's handle on one worker process."""

    def __init__(self, index: int, process: multiprocessing.Process,
                 requests: Connection) -> None:
        self.index = index
        self.process = process
        self.requests = requests
        self.ready = False
        self.dead = False
        self.pid: int | None = process.pid
        self.results: Connection | None = None
        self.in_flight: dict[int, Batch] = {}
        self.padded_in_flight = 0
        self.started = time.monotonic()


class WorkerPool:
    """N worker processes behind `pick` / `send`, the interface the batcher dispatches to."""

    def __init__(self, bundle_path: str | Path, workers: int, threads: int, log_level: str,
                 on_result: Callable[[Batch, protocol.ResultMessage], None],
                 on_error: Callable[[Batch, ServiceError], None],
                 on_capacity: Callable[[], None],
                 on_requeue: Callable[[Batch], None],
                 on_sent: Callable[[Batch], None] = lambda b: None,
                 on_restart: Callable[[int], None] = lambda i: None) -> None:
        self.bundle_path = str(bundle_path)
        self.size = workers
        self.threads = threads
        self.log_level = log_level
        self._on_result = on_result
        self._on_error = on_error
        self._on_capacity = on_capacity
        self._on_requeue = on_requeue
        self._on_sent = on_sent
        self._on_restart = on_restart
        self._ctx = multiprocessing.get_context("spawn")
        self.workers: list[Worker | None] = [None] * workers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._starting: asyncio.Future | None = None
        self._closing = False
        self._early_deaths = [0] * workers  # consecutive deaths before READY, per slot
        self.restarts = 0
        self.started = False  # every worker loaded once; later restarts do not reset it
        self.resent_batches = 0

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self, timeout_s: float = 600.0) -> None:
        """Spawn every worker and wait until all have loaded; WorkerStartError otherwise."""
        self._loop = asyncio.get_running_loop()
        self._starting = self._loop.create_future()
        for i in range(self.size):
            self._spawn(i)
        try:
            await asyncio.wait_for(asyncio.shield(self._starting), timeout_s)
        except TimeoutError:
            raise WorkerStartError(f"workers not ready after {timeout_s:.0f}s") from None
        self.started = True

    @property
    def ready_count(self) -> int:
        return sum(1 for w in self.workers if w is not None and w.ready)

    def pids(self) -> list[int | None]:
        return [w.pid if w is not None else None for w in self.workers]

    def _spawn(self, index: int) -> None:
        req_r, req_w = self._ctx.Pipe(duplex=False)
        res_r, res_w = self._ctx.Pipe(duplex=False)
        _grow_pipe(req_w)
        _grow_pipe(res_w)
        process = self._ctx.Process(
            target=worker_main, name=f"moe-embed-worker-{index}", daemon=True,
            args=(req_r, res_w, self.bundle_path, self.threads, index, self.log_level))
        process.start()
        req_r.close()
        res_w.close()  # the worker holds the only write end: its death reads as EOF here
        worker = Worker(index, process, req_w)
        worker.results = res_r
        self.workers[index] = worker
        assert self._loop is not None
        self._loop.add_reader(res_r.fileno(), self._readable, worker)
        log.info("worker_spawned", worker=index, pid=process.pid)

    def _readable(self, worker: Worker) -> None:
        """A worker's result pipe is readable: one message, or EOF when the worker is gone.
        Read on the event loop itself (no reader thread): a worker writes each message whole,
        so the read never waits on the worker's compute."""
        conn = worker.results
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):
            self._stop_reading(worker)
            self._died(worker)
            return
        kind = msg[0]
        if kind == protocol.RESULT:
            payload: Any = protocol.decode_result(msg)
        elif kind == protocol.FAILED:
            payload = protocol.decode_failed(msg)
        else:
            payload = protocol.decode_json(msg)
        self._on_message(worker, kind, payload)

    def _stop_reading(self, worker: Worker) -> None:
        conn = worker.results
        if conn is not None and not conn.closed:
            assert self._loop is not None
            self._loop.remove_reader(conn.fileno())
            conn.close()

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop every worker (STOP, then SIGKILL after timeout_s)."""
        self._closing = True
        for w in self.workers:
            if w is None:
                continue
            try:
                w.requests.send_bytes(protocol.STOP_MESSAGE)
            except OSError:
                pass
        loop = asyncio.get_running_loop()
        for w in self.workers:
            if w is None:
                continue
            await loop.run_in_executor(None, w.process.join, timeout_s)
            if w.process.is_alive():
                w.process.kill()
                await loop.run_in_executor(None, w.process.join, timeout_s)
            w.requests.close()
            self._stop_reading(w)
            for batch in w.in_flight.values():
                self._on_error(batch, errors.unavailable("server shut down"))
            w.in_flight.clear()

    # -- dispatch (called by the batcher) -------------------------------------------------
    def pick(self) -> tuple[Worker, bool] | None:
        best = None
        for w in self.workers:
            if w is None or not w.ready or w.dead or len(w.in_flight) >= MAX_IN_FLIGHT:
                continue
            key = (len(w.in_flight), w.padded_in_flight)
            if best is None or key < best[0]:
                best = (key, w)
        if best is None:
            return None
        return best[1], bool(best[1].in_flight)

    def send(self, worker: Worker, batch: Batch) -> None:
        batch.attempts += 1
        worker.in_flight[batch.batch_id] = batch
        worker.padded_in_flight += batch.padded
        ids, offsets, dims, norm = batch.arrays()
        try:
            worker.requests.send_bytes(protocol.encode_batch(batch.batch_id, ids, offsets,
                                                             dims, norm))
        except OSError:
            pass  # the worker is dead; its reader reports EOF and the batch is sent again
        if batch.attempts == 1:
            self._on_sent(batch)

    # -- events from workers (on the event loop) ------------------------------------------
    def _on_message(self, worker: Worker, kind: int, payload: Any) -> None:
        if kind == protocol.READY:
            worker.ready = True
            worker.pid = payload["pid"]
            self._early_deaths[worker.index] = 0
            log.info("worker_ready", worker=worker.index, pid=worker.pid,
                     load_s=round(payload["load_s"], 3), ready=self.ready_count, of=self.size)
            if self._starting is not None and not self._starting.done() \
                    and self.ready_count == self.size:
                self._starting.set_result(None)
            self._on_capacity()
        elif kind == protocol.RESULT:
            batch = self._finish(worker, payload.batch_id)
            if batch is not None:
                self._on_result(batch, payload)
            self._on_capacity()
        elif kind == protocol.FAILED:
            batch_id, info = payload
            batch = self._finish(worker, batch_id)
            if batch is not None:
                msg = f"batch {batch_id} failed in worker {worker.index}: {info['message']}"
                err = (ServiceError(grpc.StatusCode.INVALID_ARGUMENT, msg)
                       if info["kind"] == "invalid_input" else errors.internal(msg))
                self._on_error(batch, err)
            self._on_capacity()
        elif kind == protocol.LOAD_FAILED:
            worker.dead = True
            message = f"worker {worker.index} could not load {self.bundle_path}: " \
                      f"{payload['message']}"
            if self._starting is not None and not self._starting.done():
                self._starting.set_exception(WorkerStartError(message))
            log.error("worker_load_failed", worker=worker.index, error=payload["message"])

    def _finish(self, worker: Worker, batch_id: int) -> Batch | None:
        batch = worker.in_flight.pop(batch_id, None)
        if batch is not None:
            worker.padded_in_flight -= batch.padded
        return batch

    def _died(self, worker: Worker) -> None:
        """EOF on a worker's pipe: it exited or was killed. Re-send its batches, restart it."""
        if self._closing or self.workers[worker.index] is not worker:
            return
        was_ready = worker.ready
        worker.dead = True
        worker.ready = False
        lost = list(worker.in_flight.values())
        worker.in_flight.clear()
        worker.padded_in_flight = 0
        worker.process.join(timeout=0.2)  # it closed its pipe: it is exiting
        log.warning("worker_died", worker=worker.index, pid=worker.pid,
                    exitcode=worker.process.exitcode, in_flight=len(lost))
        if self._starting is not None and not self._starting.done():
            self._starting.set_exception(WorkerStartError(
                f"worker {worker.index} exited with code {worker.process.exitcode} "
                "before loading its runtime"))
            return
        for batch in lost:
            if batch.attempts >= MAX_ATTEMPTS:
                self._on_error(batch, errors.internal(
                    f"batch {batch.batch_id} ({len(batch.items)} inputs, {batch.tokens} tokens) "
                    f"was in flight on {batch.attempts} workers that died; giving up on it"))
            else:
                self.resent_batches += 1
                self._on_requeue(batch)
        self.restarts += 1
        self._on_restart(worker.index)
        if not was_ready:
            self._early_deaths[worker.index] += 1
        n = self._early_deaths[worker.index]
        delay = RESTART_BACKOFF_S[min(n, len(RESTART_BACKOFF_S) - 1)]
        assert self._loop is not None
        self._loop.call_later(delay, self._restart, worker.index, worker)

    def _restart(self, index: int, old: Worker) -> None:
        if self._closing or self.workers[index] is not old:
            return
        self._spawn(index)
