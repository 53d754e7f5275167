"""The worker processes behind one awaitable: "run this batch on a worker, return its result or
raise `WorkerDied`".

Workers with one thread each are forked from one loader process that has loaded the runtime
(`workers/process/loader.py`): they share every weight copy-on-write, and a restart takes
milliseconds. Workers with more threads are "spawn" processes that load their own runtime
(ONNX Runtime's thread pool does not survive fork). Either way a worker has two pipes: batches
go down one, results come up the other, read by the event loop when readable. A worker
holds at most `policy.slots` batches: a caller first `acquire`s a slot on the least-loaded
ready worker, then `run`s a batch on it. A worker
that dies (even SIGKILL: its pipe reaches EOF) fails every batch it held with `WorkerDied` and
is restarted with backoff; what to do with those batches is the caller's business.
"""

from __future__ import annotations

import asyncio
import fcntl
import multiprocessing
import os
import signal
import socket
import subprocess
import time
from multiprocessing.connection import Connection
from pathlib import Path

import structlog

from ..workers.process import loader as loader_program
from ..workers.process import policy, protocol
from ..workers.process.loader import send_fork
from ..workers.process.main import worker_main
from .metrics import Metrics

# Environment of the loader: no thread may run in it when it forks. ONNX Runtime's telemetry
# keeps a thread (and an SQLite store under ~/.cache) from import on, and would otherwise send
# usage events from a user's cluster; OpenBLAS starts a pool on numpy's import.
LOADER_ENV = {"ORT_DISABLE_TELEMETRY": "1", "OPENBLAS_NUM_THREADS": "1"}
PIPE_BYTES = 1 << 20  # grown pipes: a batch message never blocks the event loop on write
RESTART_BACKOFF_S = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)

log = structlog.get_logger("moe_embed.pool")


class WorkerStartError(RuntimeError):
    """A worker could not load its runtime at startup (bad bundle, out of memory...)."""


class WorkerDied(Exception):
    """The worker running a batch died (or was killed for running far too long)."""


class NoWorkerCanServe(Exception):
    """Every worker failed its last load (or died before loading) and none is ready."""


class BatchFailed(Exception):
    """The worker ran the batch and it raised; the worker lives on."""

    def __init__(self, failure: protocol.Failed, worker: int) -> None:
        super().__init__(failure.message)
        self.failure = failure
        self.worker = worker


class Changes:
    """Wakes every waiter when the pool's state changes (a slot frees, a worker becomes ready
    or dies)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self) -> None:
        await self._event.wait()


def _grow_pipe(conn: Connection) -> None:
    try:
        fcntl.fcntl(conn.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    except OSError:
        pass  # capped by /proc/sys/fs/pipe-max-size: writes may then wait on a busy worker


class Worker:
    """The frontend's handle on one worker process (a restart makes a new handle)."""

    def __init__(self, index: int, process: multiprocessing.Process | None,
                 requests: Connection, results: Connection) -> None:
        self.index = index
        self.process = process  # None when forked by the loader (not our child)
        self.requests = requests
        self.results = results
        self.ready = False
        self.dead = False
        self.killed = False  # killed by the pool (stuck): gets no more work, death pending
        self.pid: int | None = process.pid if process is not None else None  # forked: from Ready
        self.slots = 0  # acquired: batches running or about to be sent
        self.tokens = 0  # real tokens of the batches it holds
        self.in_flight: dict[int, asyncio.Future] = {}
        self.batch_tokens: dict[int, int] = {}  # tokens of each batch held, oldest first
        self.batch_cohort: dict[int, int] = {}  # each batch held's policy.cohort
        self.running_since = 0.0  # when its oldest batch held started running (monotonic)

    @property
    def busy(self) -> bool:
        return self.slots > 0

    def running_ends_in(self, s_per_token: float, now: float) -> float:
        """Seconds until the batch it runs now is expected to end (0 when it holds none)."""
        if not self.batch_tokens:
            return 0.0
        first = next(iter(self.batch_tokens.values()))
        return max(0.0, self.running_since + first * s_per_token - now)

    @property
    def running_cohort(self) -> int:
        """policy.cohort of the batch it runs now (0 when it holds none)."""
        return next(iter(self.batch_cohort.values()), 0)

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode if self.process is not None else None

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.is_alive()
        return self.pid is not None and _pid_alive(self.pid)

    def join(self, timeout_s: float) -> None:
        """Wait for the process to end (a forked worker is not our child: poll its pid)."""
        if self.process is not None:
            self.process.join(timeout_s)
            return
        deadline = time.monotonic() + timeout_s
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.01)

    def kill_now(self) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Loader:
    """The frontend's handle on the loader process (see workers/process/loader.py)."""

    def __init__(self, process: subprocess.Popen, control: Connection) -> None:
        self.process = process
        self.control = control
        self.failed = False  # reported LoadFailed: it exits; the next fork needs a new one
        self.gone = False  # its control connection closed

    @property
    def usable(self) -> bool:
        return not (self.failed or self.gone) and self.process.poll() is None

    def reap(self, timeout_s: float) -> None:
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass


class WorkerPool:
    def __init__(self, bundle_path: str | Path, workers: int, threads: int, log_level: str,
                 metrics: Metrics, share_weights: bool = True, nice: int = 0) -> None:
        self.bundle_path = str(bundle_path)
        self.size = workers
        self.threads = threads
        self.log_level = log_level
        self.nice = nice  # the workers' nice steps below the frontend (workers/process/priority.py)
        self.metrics = metrics
        self.changes = Changes()
        self._ctx = multiprocessing.get_context("spawn")
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # spawned workers: no telemetry
        self.workers: list[Worker | None] = [None] * workers
        # share the weights: fork the workers from one loader (ORT's pool does not survive fork)
        self.forked = share_weights and threads == 1
        self._loader: Loader | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._starting: asyncio.Future | None = None
        self._closing = False
        self._early_deaths = [0] * workers  # consecutive deaths before READY, per slot
        self._priority_waiting = 0
        self.restarts = 0
        self.started = False  # every worker loaded once; later restarts do not reset it
        self.last_load_error = ""

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

    def can_serve(self) -> bool:
        """A worker is ready, or one is (re)starting that has not failed to load since it was
        last ready: work may wait for it. False when every worker keeps failing to load."""
        return self.ready_count > 0 or any(n == 0 for n in self._early_deaths)

    @property
    def ready_count(self) -> int:
        return sum(1 for w in self.workers
                   if w is not None and w.ready and not w.dead and not w.killed)

    def pids(self) -> list[int | None]:
        return [w.pid if w is not None else None for w in self.workers]

    def loader_pid(self) -> int | None:
        """The pid of the process the workers are forked from (None: each loads its own)."""
        return self._loader.process.pid if self._loader is not None else None

    def _spawn(self, index: int) -> None:
        req_r, req_w = self._ctx.Pipe(duplex=False)
        res_r, res_w = self._ctx.Pipe(duplex=False)
        _grow_pipe(req_w)
        _grow_pipe(res_w)
        process = None
        if self.forked:
            loader = self._usable_loader()
            try:
                send_fork(loader.control, index, req_r.fileno(), res_w.fileno())
            except OSError:
                loader.gone = True  # the worker's pipe ends died with the message: EOF below
        else:
            process = self._ctx.Process(
                target=worker_main, name=f"moe-embed-worker-{index}", daemon=True,
                args=(req_r, res_w, self.bundle_path, self.threads, index, self.log_level,
                      self.nice))
            process.start()
        req_r.close()
        res_w.close()  # the worker holds the only write end: its death reads as EOF here
        worker = self.workers[index] = Worker(index, process, req_w, res_r)
        assert self._loop is not None
        self._loop.add_reader(res_r.fileno(), self._readable, worker)
        log.info("worker_spawned", worker=index, pid=worker.pid, forked=self.forked)

    def _usable_loader(self) -> Loader:
        """The loader to fork from, starting one if there is none (or it failed or died)."""
        if self._loader is not None and self._loader.usable:
            return self._loader
        if self._loader is not None:
            self._close_loader(self._loader)
        ours, theirs = socket.socketpair()
        with theirs:
            process = subprocess.Popen(
                loader_program.command(theirs.fileno(), self.bundle_path, self.log_level,
                                       self.nice),
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                env={**os.environ, **LOADER_ENV})
        control = Connection(ours.detach())
        loader = self._loader = Loader(process, control)
        assert self._loop is not None
        self._loop.add_reader(control.fileno(), self._loader_readable, loader)
        log.info("loader_spawned", pid=process.pid)
        return loader

    def _loader_readable(self, loader: Loader) -> None:
        try:
            msg = protocol.decode(loader.control.recv_bytes())
        except (EOFError, OSError):
            loader.gone = True
            self._close_loader(loader)
            loader.reap(0.2)  # it closed its end: it is exiting
            return
        if isinstance(msg, protocol.Ready):
            log.info("loader_ready", pid=msg.pid, load_s=round(msg.load_s, 3))
        elif isinstance(msg, protocol.LoadFailed):
            loader.failed = True  # each pending worker gets the LoadFailed on its own pipe

    def _close_loader(self, loader: Loader) -> None:
        conn = loader.control
        if not conn.closed:
            assert self._loop is not None
            self._loop.remove_reader(conn.fileno())
            conn.close()  # the loader exits on EOF; its workers live on

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop every worker (Stop, then SIGKILL after timeout_s)."""
        self._closing = True
        loop = asyncio.get_running_loop()
        for w in self.workers:
            if w is not None:
                # from a thread: a stopped or stuck worker's full pipe would block the loop;
                # the kill below ends such a write with an error
                loop.run_in_executor(None, self._send_stop, w)
        for w in self.workers:
            if w is None:
                continue
            await loop.run_in_executor(None, w.join, timeout_s)
            if w.alive():
                w.kill_now()
                await loop.run_in_executor(None, w.join, timeout_s)
            w.requests.close()
            self._stop_reading(w)
            self._fail_pending(w, "server shut down")
        if self._loader is not None:
            loader, self._loader = self._loader, None
            self._close_loader(loader)
            await loop.run_in_executor(None, loader.reap, timeout_s)
            if loader.process.poll() is None:
                loader.process.kill()
                await loop.run_in_executor(None, loader.reap, timeout_s)

    @staticmethod
    def _send_stop(worker: Worker) -> None:
        try:
            worker.requests.send_bytes(protocol.Stop().encode())
        except (OSError, ValueError):  # dead, or its pipe already closed
            pass

    # -- the awaitable ---------------------------------------------------------------------
    def _best(self, express: bool = False) -> Worker | None:
        best = None
        for w in self.workers:
            if w is None or not w.ready or w.dead or w.killed:
                continue
            if w.slots >= policy.slots(w.tokens, express):
                continue
            if best is None or (w.slots, w.tokens) < (best.slots, best.tokens):
                best = w
        return best

    def free_slot(self, express: bool = False) -> Worker | None:
        """The worker `acquire` would return now, without taking its slot."""
        return None if self._priority_waiting else self._best(express)

    async def acquire(self, priority: bool = False, express: bool = False) -> Worker:
        """A slot on the least-loaded ready worker, waiting for one if needed (`express`: an
        express slot may do). Priority callers (batches sent again after a death) are served
        before the others. Raises NoWorkerCanServe when no worker is ready or about to be."""
        while True:
            if self.started and not self.can_serve():
                raise NoWorkerCanServe(self.last_load_error or "no worker can serve")
            if priority or not self._priority_waiting:
                worker = self._best(express)
                if worker is not None:
                    worker.slots += 1
                    self._slots_changed()
                    return worker
            if priority:
                self._priority_waiting += 1
            try:
                await self.changes.wait()
            finally:
                if priority:
                    self._priority_waiting -= 1

    def release(self, worker: Worker) -> None:
        worker.slots -= 1
        self._slots_changed()
        self.changes.fire()

    def _slots_changed(self) -> None:
        """The slot gauges: busy slots of live workers, and the ready workers' slots."""
        live = [w for w in self.workers if w is not None and not w.dead]
        self.metrics.slots_busy.set(sum(w.slots for w in live))
        self.metrics.slots.set(self.ready_count * policy.MAX_IN_FLIGHT)

    async def run(self, worker: Worker, batch: protocol.Batch, tokens: int,
                  timeout_s: float | None = None, cohort: int = 0) -> protocol.Result:
        """Run `batch` on `worker` (a slot acquired beforehand). Raises WorkerDied if the worker
        dies meanwhile or runs past `timeout_s` (then it is killed: a stuck worker is treated
        as a dead one), BatchFailed if the batch raised in the worker."""
        if worker.dead or worker.killed:
            raise WorkerDied(f"worker {worker.index} is dead")
        assert self._loop is not None
        future = self._loop.create_future()
        if not worker.in_flight:
            worker.running_since = time.monotonic()
        worker.in_flight[batch.batch_id] = future
        worker.batch_tokens[batch.batch_id] = tokens
        worker.batch_cohort[batch.batch_id] = cohort
        worker.tokens += tokens
        try:
            try:
                worker.requests.send_bytes(batch.encode())
            except OSError:
                pass  # the worker is dead; its reader reports EOF and fails the future
            try:
                return await asyncio.wait_for(asyncio.shield(future), timeout_s)
            except TimeoutError:
                log.error("worker_stuck", worker=worker.index, pid=worker.pid,
                          batch_id=batch.batch_id, tokens=tokens, limit_s=timeout_s)
                self.kill(worker)
                raise WorkerDied(f"worker {worker.index} ran batch {batch.batch_id} "
                                 f"({tokens} tokens) past its limit of {timeout_s:.1f} s "
                                 "and was killed") from None
        finally:
            worker.in_flight.pop(batch.batch_id, None)
            worker.batch_tokens.pop(batch.batch_id, None)
            worker.batch_cohort.pop(batch.batch_id, None)
            worker.tokens -= tokens

    def kill(self, worker: Worker) -> None:
        """SIGKILL (and SIGCONT, in case it is stopped): its death is then handled as any."""
        worker.killed = True
        if worker.pid is not None and not worker.dead:
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(worker.pid, sig)
                except ProcessLookupError:
                    pass

    # -- events from workers (on the event loop) ------------------------------------------
    def _readable(self, worker: Worker) -> None:
        """A worker's result pipe is readable: one message, or EOF when the worker is gone.
        Read on the event loop itself (no reader thread): a worker writes each message whole,
        so the read never waits on the worker's compute."""
        try:
            msg = protocol.decode(worker.results.recv_bytes())
        except (EOFError, OSError):
            self._stop_reading(worker)
            self._died(worker)
            return
        if isinstance(msg, protocol.Ready):
            self._ready(worker, msg)
        elif isinstance(msg, protocol.Result | protocol.Failed):
            future = worker.in_flight.get(msg.batch_id)
            worker.running_since = time.monotonic()  # the next batch it holds starts now
            if future is not None and not future.done():
                if isinstance(msg, protocol.Result):
                    future.set_result(msg)
                else:
                    future.set_exception(BatchFailed(msg, worker.index))
        elif isinstance(msg, protocol.LoadFailed):
            self._load_failed(worker, msg)

    def _ready(self, worker: Worker, msg: protocol.Ready) -> None:
        worker.ready = True
        worker.pid = msg.pid
        self._early_deaths[worker.index] = 0
        self.last_load_error = ""
        log.info("worker_ready", worker=worker.index, pid=worker.pid,
                 load_s=round(msg.load_s, 3), ready=self.ready_count, of=self.size)
        if self._starting is not None and not self._starting.done() \
                and self.ready_count == self.size:
            self._starting.set_result(None)
        self.metrics.workers_ready.set(self.ready_count)
        self._slots_changed()
        self.changes.fire()

    def _load_failed(self, worker: Worker, msg: protocol.LoadFailed) -> None:
        message = f"worker {worker.index} could not load {self.bundle_path}: {msg.message}"
        self.last_load_error = message
        if self._starting is not None and not self._starting.done():
            self._starting.set_exception(WorkerStartError(message))
        log.error("worker_load_failed", worker=worker.index, error=msg.message)
        self.changes.fire()

    def _stop_reading(self, worker: Worker) -> None:
        conn = worker.results
        if not conn.closed:
            assert self._loop is not None
            self._loop.remove_reader(conn.fileno())
            conn.close()

    def _fail_pending(self, worker: Worker, why: str) -> None:
        for future in worker.in_flight.values():
            if not future.done():
                future.set_exception(WorkerDied(f"worker {worker.index}: {why}"))

    def _died(self, worker: Worker) -> None:
        """EOF on a worker's pipe: it exited or was killed. Fail its batches, restart it."""
        if self._closing or self.workers[worker.index] is not worker:
            return
        was_ready = worker.ready
        worker.dead = True
        worker.ready = False
        if worker.process is not None:  # our child: its exit code is worth a short wait
            worker.join(0.2)  # it closed its pipe: it is exiting
        code = worker.exitcode
        log.warning("worker_died", worker=worker.index, pid=worker.pid,
                    exitcode=code, in_flight=len(worker.in_flight))
        self._fail_pending(worker, "died" if code is None else f"died (exit code {code})")
        self.metrics.workers_ready.set(self.ready_count)
        self._slots_changed()
        self.changes.fire()
        if self._starting is not None and not self._starting.done():
            self._starting.set_exception(WorkerStartError(
                f"worker {worker.index} exited (exit code {code}) before loading its runtime"))
            return
        self.restarts += 1
        self.metrics.worker_restarts.labels(str(worker.index)).inc()
        if not was_ready:
            self._early_deaths[worker.index] += 1
            self.last_load_error = self.last_load_error or \
                f"worker {worker.index} exited (exit code {code}) while loading"
        n = self._early_deaths[worker.index]
        delay = RESTART_BACKOFF_S[min(n, len(RESTART_BACKOFF_S) - 1)]
        assert self._loop is not None
        self._loop.call_later(delay, self._restart, worker.index, worker)

    def _restart(self, index: int, old: Worker) -> None:
        if self._closing or self.workers[index] is not old:
            return
        self._spawn(index)
        self.changes.fire()
