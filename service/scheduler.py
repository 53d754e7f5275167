"""Dispatch, delivery, retry and batch metrics, in one place.

One dispatch loop takes batches from the queue and hands each to a worker slot, by the rules of
the one scheduling policy (workers/process/policy.py: light callers and express batches, slots,
budgets of batches sent ahead).

Each batch then has one coroutine that sees it through: it runs it on its worker, delivers the
vectors to the requests it carries, and, if the worker dies (or is killed for running far past
what the batch should take), sends what is still wanted once more, ahead of new work; a second
death fails it with INTERNAL. A batch that raises in a live worker is a bug (requests are
validated before they are queued): its requests fail INTERNAL, naming the batch.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Awaitable, Hashable

import structlog

from ..workers.process import policy, protocol
from . import errors
from .batching import Batch, BatchQueue, Job
from .errors import EngineError
from .metrics import Metrics
from .tracing import Tracing, now_ns
from .worker_pool import BatchFailed, NoWorkerCanServe, Worker, WorkerDied, WorkerPool

MAX_ATTEMPTS = 2  # workers a batch may be sent to
STUCK_FACTOR = 20.0  # a batch may run this many times its expected time past the floor
RATE_SMOOTHING = 0.2  # weight of the newest batch in the seconds-per-token estimate
# Before any batch has finished there is no estimate: a first batch may take this long a token
# past the floor (the full-size fp32 model runs ~1.2 ms a token on 2 busy cores; 4x that), so
# a first batch of 6,000 tokens on a slow machine is not taken for stuck after the floor alone.
FIRST_S_PER_TOKEN = 0.005

log = structlog.get_logger("moe_embed.scheduler")


async def _first(*waits: Awaitable[object], timeout: float | None = None) -> None:
    """Return when any of `waits` completes or `timeout` passes; cancel the rest."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


class Scheduler:
    def __init__(self, queue: BatchQueue, pool: WorkerPool, metrics: Metrics,
                 max_wait_s: float, batch_timeout_s: float, tracing: Tracing | None = None,
                 precision: str = "", rejoin_s: float = policy.REJOIN_S,
                 rejoin_scale: float = 1.0) -> None:
        self.queue = queue
        self.tracing = tracing
        self.precision = precision
        self.pool = pool
        self.metrics = metrics
        self.max_wait_s = max_wait_s
        # policy.rejoin_wait's bounds; tests lengthen them (the scale multiplies a batch's time)
        self.rejoin_s, self.rejoin_scale = rejoin_s, rejoin_scale
        self.batch_timeout_s = batch_timeout_s
        self.s_per_token: float | None = None  # recent worker time per token
        self.resent_batches = 0
        self._wake = asyncio.Event()
        self._dropped_seen = 0
        self._loop_task: asyncio.Task | None = None
        self._batches: set[asyncio.Task] = set()
        self._in_flight: Counter[Hashable] = Counter()  # tokens in flight per caller
        # per worker index: when its last batch ended, its policy.cohort, requests admitted by
        # then, its compute seconds
        self._ended: dict[int, tuple[float, int, int, float]] = {}

    # -- requests in and out ------------------------------------------------------------
    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._dispatch())

    async def close(self) -> None:
        for task in [self._loop_task, *self._batches]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*[t for t in [self._loop_task, *self._batches] if t is not None],
                             return_exceptions=True)

    def reserve(self, caller: Hashable, n: int) -> None:
        """Room in the queue for `n` inputs from `caller` while they are tokenized:
        RESOURCE_EXHAUSTED now if they would not be admitted, before any tokenizing is spent
        on them. `release` it (in a `finally`) right before `submit`."""
        self.queue.reserve(caller, n)

    def release(self, caller: Hashable, n: int) -> None:
        self.queue.release(caller, n)

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
        self.metrics.queue_tokens.set(self.queue.queued_tokens)
        self.metrics.oldest_admitted = self.queue.oldest()
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
            express = policy.is_express(light, len(self.queue.callers_waiting()), worker.busy,
                                        policy.heavy_in_flight(self._in_flight))
            delay = self._hold(worker, express, now, oldest)
            if delay > 0 and not self.queue.full(policy.EXPRESS_TOKENS if express else None):
                timeout = min((t for t in (delay, until_deadline)
                               if t is not None and t != math.inf), default=None)
                await _first(self._wake.wait(), self.pool.changes.wait(), timeout=timeout)
                continue
            budget = policy.budget(worker.busy, express, self.queue.queued_tokens,
                                   self.pool.ready_count, self.queue.max_batch_tokens)
            batch = self.queue.take(now, budget, lightest_first=express,
                                    only=light if express else None)
            self._queue_changed()
            if batch is None:
                continue
            worker = await self.pool.acquire(express=express)  # free_slot said it is free
            task = asyncio.get_running_loop().create_task(self._run(batch, worker))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    def _hold(self, worker: Worker, express: bool, now: float, oldest: float) -> float:
        """Seconds the next batch for `worker` still waits (<= 0: form it now; inf: until the
        worker's running batch ends), by the policy's rules: a batch for a busy worker goes
        ahead of its running one after the max wait and just before that one's expected end,
        unless fewer requests wait than it carries; an idle worker waits a little for the
        callers of the batch it has just finished. Express batches wait for nothing else."""
        if worker.busy:
            if not express and policy.holds_back(self.queue.requests_waiting,
                                                 worker.running_cohort):
                return math.inf
            ends_in = None if express or self.s_per_token is None else \
                worker.running_ends_in(self.s_per_token, now)
            return policy.ahead_wait(now - oldest, self.max_wait_s, ends_in)
        ended = self._ended.get(worker.index)
        if express or ended is None:
            return 0.0
        at, cohort, admitted, took_s = ended
        return policy.rejoin_wait(self.queue.admitted - admitted, cohort, now - at,
                                  took_s * self.rejoin_scale, self.rejoin_s)

    # -- one coroutine per batch ----------------------------------------------------------
    def limit_s(self, batch: Batch) -> float:
        """How long a batch may run before its worker is taken for stuck."""
        if self.s_per_token is None:
            return self.batch_timeout_s + batch.tokens * FIRST_S_PER_TOKEN
        return self.batch_timeout_s + STUCK_FACTOR * batch.tokens * self.s_per_token

    def _light_callers(self) -> set[Hashable]:
        """Callers with inputs waiting that are light (policy.light_callers)."""
        waiting = {c: self.queue.tokens_waiting(c) for c in self.queue.callers_waiting()}
        return policy.light_callers(waiting, self._in_flight)

    async def _run(self, batch: Batch, worker: Worker | None) -> None:
        self._observe_sent(batch)
        batch.attempts = 1
        callers: Counter[Hashable] = Counter()
        for it in batch.items:
            callers[it.job.caller] += it.length
        self._in_flight.update(callers)
        span = None
        try:
            span = self._batch_span(batch, worker)
            while worker is not None:
                try:
                    if span is not None:
                        span.set_attributes({"worker": worker.index, "attempts": batch.attempts})
                    result = await self.pool.run(worker, batch.message(), batch.tokens,
                                                 self.limit_s(batch), batch.cohort())
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
                except BatchFailed as exc:  # the worker lives on
                    self._after_failure(batch, exc)
                    return
                self._deliver(batch, result)
                self._ended[worker.index] = (time.monotonic(), batch.cohort(),
                                             self.queue.admitted, result.compute_ms / 1e3)
                if span is not None:  # the worker's own time, as it measured it
                    end = now_ns()
                    self.tracing.past_span("worker.compute", span,
                                           end - int(result.compute_ms * 1e6), end)
                return
        except Exception as exc:  # a bug here must fail the requests, never leave them hanging
            log.exception("batch_error", batch_id=batch.batch_id)
            self._fail(batch, errors.internal(f"batch {batch.batch_id}: internal error: {exc!r}"))
        finally:
            if span is not None:
                span.end()
            self._in_flight.subtract(callers)
            self._in_flight += Counter()  # drop the zeros
            if worker is not None:
                self.pool.release(worker)

    def _batch_span(self, batch: Batch, worker: Worker | None):
        """The batch's trace span, linked to its requests' spans (None: tracing off)."""
        if self.tracing is None or not self.tracing.enabled:
            return None
        requests = list({id(it.job.span): it.job.span for it in batch.items
                         if it.job.span is not None}.values())
        return self.tracing.batch_span(
            requests, batch_id=batch.batch_id, inputs=len(batch.items), tokens=batch.tokens,
            requests=batch.requests(), precision=self.precision,
            worker=worker.index if worker is not None else -1)

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

    def _after_failure(self, batch: Batch, exc: BatchFailed) -> None:
        """The batch raised in a live worker: a bug, since requests are validated before they
        are queued. Its requests fail INTERNAL, naming the batch; the worker goes on."""
        self._fail(batch, errors.internal(
            f"batch {batch.batch_id} failed in worker {exc.worker}: {exc.failure.message}"))

    def no_worker(self) -> EngineError:
        return errors.unavailable(f"no worker can serve: {self.pool.last_load_error}; "
                                  "retry elsewhere")

    def _fail_waiting(self, error: EngineError) -> None:
        """Fail every request with inputs waiting (no worker will take them)."""
        for job in self.queue.jobs():
            self._fail_job(job, error)

    def _fail_job(self, job: Job, error: EngineError) -> None:
        job.fail(error)
        self.cancel(job)

    def _fail(self, batch: Batch, error: EngineError) -> None:
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

