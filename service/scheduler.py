"""Dispatch, delivery, retry and batch metrics, in one place.

One dispatch loop takes batches from the queue and hands each to a worker slot: an idle
worker gets a full batch at once; a busy worker's second slot gets a batch when one is full or
when the oldest input has waited `max_wait`.

A caller is light while its tokens waiting and in flight together are at most EXPRESS_TOKENS
(many one-text requests on one connection; not one client's burst). Light callers' inputs go
in express batches of their own (at most EXPRESS_TOKENS, lightest callers first; a busy worker
keeps a slot for them when its others hold heavy work), never in a heavy caller's batch: to a
busy worker, and to an idle one too while heavy callers also wait. A worker runs a batch at
most a quarter of the one it holds first (up to that one's own token count in all;
workers/process/main.py), pausing the larger between session calls, so a light request does
not wait for a heavy batch to end. Otherwise a busy worker gets a batch sent ahead: everything
that waits with one worker, 1/(2N) of it with N (`_parts`), so a burst is neither cut into
small batches nor piled onto one worker while the others idle.

Each batch then has one coroutine that sees it through: it runs it on its worker, delivers the
vectors to the requests it carries, and, if the worker dies (or is killed for running far past
what the batch should take), sends what is still wanted once more, ahead of new work; a second
death fails it with INTERNAL.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Hashable

import grpc
import structlog

from ..workers.process import protocol
from . import errors
from .batching import Batch, BatchQueue, Job
from .errors import ServiceError
from .metrics import Metrics
from .worker_pool import BatchFailed, NoWorkerCanServe, Worker, WorkerDied, WorkerPool

MAX_ATTEMPTS = 2  # workers a batch may be sent to
EXPRESS_TOKENS = 512  # the batch a busy worker takes beside the one it runs (a chunk's worth)
STUCK_FACTOR = 20.0  # a batch may run this many times its expected time past the floor
RATE_SMOOTHING = 0.2  # weight of the newest batch in the seconds-per-token estimate

log = structlog.get_logger("moe_embed.scheduler")


async def _first(*waits: Awaitable[object], timeout: float | None = None) -> None:
    """Return when any of `waits` completes or `timeout` passes; cancel the rest."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


def _parts(workers: int) -> int:
    """Into how many parts a batch sent ahead cuts what waits: one worker takes all of it (big
    batches run fastest); with more, each takes 1/(2N), so no worker is left idle while another
    still has a large batch of the same burst to run (a burst's last batches get smaller)."""
    return 1 if workers <= 1 else 2 * workers


class Scheduler:
    def __init__(self, queue: BatchQueue, pool: WorkerPool, metrics: Metrics,
                 max_wait_s: float, batch_timeout_s: float) -> None:
        self.queue = queue
        self.pool = pool
        self.metrics = metrics
        self.max_wait_s = max_wait_s
        self.batch_timeout_s = batch_timeout_s
        self.s_per_token: float | None = None  # recent worker time per token
        self.resent_batches = 0
        self._wake = asyncio.Event()
        self._dropped_seen = 0
        self._loop_task: asyncio.Task | None = None
        self._batches: set[asyncio.Task] = set()
        self._in_flight: Counter[Hashable] = Counter()  # tokens in flight per caller

    # -- requests in and out ------------------------------------------------------------
    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._dispatch())

    async def close(self) -> None:
        for task in [self._loop_task, *self._batches]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*[t for t in [self._loop_task, *self._batches] if t is not None],
                             return_exceptions=True)

    def check_room(self, caller: Hashable, n: int) -> None:
        """RESOURCE_EXHAUSTED now if `n` inputs from `caller` would not be admitted (before
        any tokenizing is spent on them)."""
        self.queue.check(caller, n)

    def submit(self, job: Job) -> None:
        """Queue a request's inputs (RESOURCE_EXHAUSTED at once if it does not fit)."""
        self.queue.admit(job)
        self._queue_changed()
        self._wake.set()

    def cancel(self, job: Job) -> None:
        """The request is over (cancelled, past its deadline or failed): drop what waits."""
        self.queue.cancel(job)
        self._queue_changed()

    def _queue_changed(self) -> None:
        self.metrics.queue_depth.set(self.queue.waiting)
        dropped = self.queue.dropped - self._dropped_seen
        if dropped:
            self.metrics.inputs_dropped.inc(dropped)
            self._dropped_seen = self.queue.dropped

    # -- the dispatch loop ----------------------------------------------------------------
    def _expire(self, now: float) -> float | None:
        """Fail queued requests whose deadline has passed; the next deadline, if any."""
        for job in self.queue.expired(now):
            job.fail(errors.deadline_exceeded("the request's deadline passed in the queue"))
            self.cancel(job)
        return self.queue.next_deadline()

    async def _dispatch(self) -> None:
        while True:
            self._wake.clear()
            now = time.monotonic()
            next_deadline = self._expire(now)
            until_deadline = None if next_deadline is None else max(0.0, next_deadline - now)
            oldest = self.queue.oldest()
            if oldest is None:
                await _first(self._wake.wait(), timeout=until_deadline)
                continue
            light = self._light_callers()
            worker = self.pool.free_slot(express=bool(light))
            if worker is None:
                if self.pool.started and not self.pool.can_serve():
                    self._fail_waiting(self.no_worker())
                    continue
                # a newcomer may be light, and light callers may take an express slot
                await _first(self.pool.changes.wait(), self._wake.wait(), timeout=until_deadline)
                continue
            delay = self.max_wait_s - (now - oldest)
            # light inputs never ride in a heavy caller's batch: they go express to a busy
            # worker, and to an idle one too while heavy callers also wait
            express = bool(light) and (worker.busy or len(light) < len(
                self.queue.callers_waiting()))
            if worker.busy and not self.queue.full(EXPRESS_TOKENS if express else None) \
                    and delay > 0:
                timeout = delay if until_deadline is None else min(delay, until_deadline)
                await _first(self._wake.wait(), self.pool.changes.wait(), timeout=timeout)
                continue
            if not worker.busy:
                budget = None
            elif express:
                budget = EXPRESS_TOKENS
            else:  # sent ahead: what waits, or 1/(2N) of it with N > 1 workers (factoring)
                budget = max(EXPRESS_TOKENS, -(-self.queue.queued_tokens // _parts(
                    self.pool.ready_count)))
            batch = self.queue.take(now, budget, lightest_first=express,
                                    only=light if express else None)
            self._queue_changed()
            if batch is None:
                continue
            worker = await self.pool.acquire(express=express)  # free_slot said it is free
            task = asyncio.get_running_loop().create_task(self._run(batch, worker))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    # -- one coroutine per batch ----------------------------------------------------------
    def limit_s(self, batch: Batch) -> float:
        """How long a batch may run before its worker is taken for stuck."""
        expected = 0.0 if self.s_per_token is None else batch.tokens * self.s_per_token
        return self.batch_timeout_s + STUCK_FACTOR * expected

    def _light_callers(self) -> set[Hashable]:
        """Callers with inputs waiting that have at most an express batch's worth of tokens
        waiting and in flight together (many one-text requests on one connection still count
        as light; a burst does not)."""
        return {c for c in self.queue.callers_waiting()
                if self._in_flight[c] + self.queue.tokens_waiting(c) <= EXPRESS_TOKENS}

    async def _run(self, batch: Batch, worker: Worker | None) -> None:
        self._observe_sent(batch)
        batch.attempts = 1
        callers: Counter[Hashable] = Counter()
        for it in batch.items:
            callers[it.job.caller] += it.length
        self._in_flight.update(callers)
        try:
            while worker is not None:
                try:
                    result = await self.pool.run(worker, batch.message(), batch.tokens,
                                                 self.limit_s(batch))
                except WorkerDied as exc:
                    self.pool.release(worker)
                    worker = None
                    retry = self._after_death(batch, str(exc))
                    if retry is None:
                        return
                    batch = retry
                    try:
                        worker = await self.pool.acquire(priority=True)
                    except NoWorkerCanServe:
                        self._fail(batch, self.no_worker())
                        return
                    batch.attempts += 1
                    continue
                except BatchFailed as exc:  # the worker lives on: the same slot goes on
                    retry = self._after_failure(batch, exc)
                    if retry is None:
                        return
                    batch = retry
                    continue
                self._deliver(batch, result)
                return
        finally:
            self._in_flight.subtract(callers)
            self._in_flight += Counter()  # drop the zeros
            if worker is not None:
                self.pool.release(worker)

    def _after_death(self, batch: Batch, why: str) -> Batch | None:
        """What to send again after the batch's worker died, or None (failed or not needed)."""
        if batch.attempts >= MAX_ATTEMPTS:
            self._fail(batch, errors.internal(
                f"batch {batch.batch_id} ({len(batch.items)} inputs, {batch.tokens} tokens) was "
                f"in flight on {batch.attempts} workers that died; giving up on it ({why})"))
            return None
        live = batch.live()
        if live is not None:
            self.resent_batches += 1
            self.metrics.batches_resent.inc()
            log.warning("batch_resent", batch_id=batch.batch_id, inputs=len(live.items),
                        why=why)
        return live

    def _after_failure(self, batch: Batch, exc: BatchFailed) -> Batch | None:
        """The batch raised in a live worker. An invalid input fails only its own request
        (with its index in that request); the rest is sent again. Anything else fails all."""
        failure = exc.failure
        if failure.reason == protocol.Reason.INVALID_INPUT and failure.row is not None \
                and failure.row < len(batch.items):
            item = batch.items[failure.row]
            self._fail_job(item.job, errors.invalid_argument(failure.field or "inputs",
                                                              failure.message, item.index))
            return batch.live()
        self._fail(batch, ServiceError(
            grpc.StatusCode.INTERNAL,
            f"batch {batch.batch_id} failed in worker {exc.worker}: {failure.message}"))
        return None

    def no_worker(self) -> ServiceError:
        return errors.unavailable(f"no worker can serve: {self.pool.last_load_error}; "
                                  "retry elsewhere")

    def _fail_waiting(self, error: ServiceError) -> None:
        """Fail every request with inputs waiting (no worker will take them)."""
        for job in self.queue.jobs():
            self._fail_job(job, error)

    def _fail_job(self, job: Job, error: ServiceError) -> None:
        job.fail(error)
        self.cancel(job)

    def _fail(self, batch: Batch, error: ServiceError) -> None:
        log.error("batch_failed", batch_id=batch.batch_id, code=error.code.name,
                  error=error.message)
        for job in {id(it.job): it.job for it in batch.items}.values():
            self._fail_job(job, error)

    def _deliver(self, batch: Batch, result: protocol.Result) -> None:
        for item, vector in zip(batch.items, result.vectors(), strict=True):
            item.job.deliver(item.index, vector, result.compute_ms)
        seconds = result.compute_ms / 1e3
        rate = seconds / max(1, batch.tokens)
        self.s_per_token = rate if self.s_per_token is None else \
            (1 - RATE_SMOOTHING) * self.s_per_token + RATE_SMOOTHING * rate
        self.metrics.compute_time.observe(seconds)
        self.metrics.observe_experts(result.moe_layers, result.expert_tokens)

    def _observe_sent(self, batch: Batch) -> None:
        m = self.metrics
        m.batch_requests.observe(batch.requests())
        m.batch_inputs.observe(len(batch.items))
        m.batch_tokens.observe(batch.tokens)

