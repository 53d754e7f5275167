"""Dynamic batching: every request's tokenized inputs, unary and stream alike, wait in one
bounded queue and leave it in batches under a token budget.

A batch is counted with padding (longest input x inputs), so it is grown around the oldest
waiting input (which always goes: nothing starves) toward the neighbours in length order that
add the least padding. An idle worker gets a batch at once; a busy worker with a free pipeline
slot gets one when a full batch is waiting or when the oldest input has waited `max_wait`.
Inputs of cancelled or failed requests are dropped before they reach a worker.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from . import errors
from .errors import ServiceError

WINDOW = 512  # queued inputs considered when forming one batch


def choose_batch(lengths: Sequence[int], budget: int) -> list[int]:
    """Positions in `lengths` (queue order, 0 = oldest) of the next batch, shortest first.

    Position 0 is always taken. The batch then grows one input at a time toward the shorter
    or the longer neighbour in length order, whichever adds less padding, while
    longest * count stays within `budget`.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    lo = hi = order.index(0)
    width, n = lengths[0], 1
    while True:
        left = order[lo - 1] if lo > 0 else None
        right = order[hi + 1] if hi + 1 < len(order) else None
        fits_left = left is not None and width * (n + 1) <= budget
        fits_right = right is not None and lengths[right] * (n + 1) <= budget
        if not (fits_left or fits_right):
            break
        pad_left = width - lengths[left] if fits_left else None
        pad_right = (lengths[right] - width) * n if fits_right else None
        if pad_right is None or (pad_left is not None and pad_left <= pad_right):
            lo -= 1
        else:
            hi += 1
            width = lengths[right]
        n += 1
    return [order[k] for k in range(lo, hi + 1)]


class Job:
    """One request's inputs on their way through the queue, the workers and back."""

    __slots__ = ("ids", "dims", "normalize", "future", "admitted", "deadline", "vectors",
                 "remaining", "queued", "cancelled", "queue_ms", "compute_ms")

    def __init__(self, ids: list[np.ndarray], dims: int, normalize: bool,
                 future: asyncio.Future, deadline: float | None = None) -> None:
        self.ids = ids
        self.dims = dims
        self.normalize = normalize
        self.future = future
        self.admitted = time.monotonic()
        self.deadline = deadline  # time.monotonic() based, None = no deadline
        self.vectors: list[np.ndarray | None] = [None] * len(ids)
        self.remaining = len(ids)
        self.queued = 0
        self.cancelled = False
        self.queue_ms = 0.0
        self.compute_ms = 0.0

    @property
    def done(self) -> bool:
        return self.cancelled or self.future.done()

    def dispatched(self, now: float) -> None:
        self.queue_ms = max(self.queue_ms, (now - self.admitted) * 1e3)

    def deliver(self, index: int, vector: np.ndarray, compute_ms: float) -> None:
        if self.done or self.vectors[index] is not None:
            return
        self.vectors[index] = vector
        self.compute_ms = max(self.compute_ms, compute_ms)
        self.remaining -= 1
        if self.remaining == 0:
            self.future.set_result(None)

    def fail(self, error: ServiceError) -> None:
        if not self.done:
            self.future.set_exception(error)


class Item:
    """One input of a job, as queued."""

    __slots__ = ("job", "index", "length")

    def __init__(self, job: Job, index: int) -> None:
        self.job = job
        self.index = index
        self.length = len(job.ids[index])


class Batch:
    """Inputs that travel to a worker together."""

    __slots__ = ("batch_id", "items", "attempts", "tokens", "padded")

    def __init__(self, batch_id: int, items: list[Item]) -> None:
        self.batch_id = batch_id
        self.items = items
        self.attempts = 0  # workers it has been sent to
        self.tokens = sum(it.length for it in items)
        self.padded = max(it.length for it in items) * len(items)

    def live(self) -> Batch | None:
        """This batch without the inputs of finished requests (None if nothing is left)."""
        items = [it for it in self.items if not it.job.done]
        if len(items) == len(self.items):
            return self
        if not items:
            return None
        kept = Batch(self.batch_id, items)
        kept.attempts = self.attempts
        return kept

    def requests(self) -> int:
        return len({id(it.job) for it in self.items})

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """ids, offsets, dims, normalize for the wire."""
        parts = [it.job.ids[it.index] for it in self.items]
        offsets = np.zeros(len(parts) + 1, dtype=np.int32)
        np.cumsum([p.size for p in parts], out=offsets[1:])
        ids = np.concatenate(parts).astype(np.int32, copy=False)
        dims = np.fromiter((it.job.dims for it in self.items), np.int32, len(parts))
        norm = np.fromiter((it.job.normalize for it in self.items), np.bool_, len(parts))
        return ids, offsets, dims, norm


class Target(Protocol):
    """What the batcher dispatches to (the worker pool)."""

    def pick(self) -> tuple[object, bool] | None:
        """The least-loaded worker with a free slot and whether it is busy, or None."""

    def send(self, worker: object, batch: Batch) -> None: ...


class Batcher:
    """The bounded queue and the dispatch policy; runs on the event loop, never blocks."""

    def __init__(self, max_batch_tokens: int, max_wait_s: float, max_queue: int,
                 on_depth: Callable[[int], None] = lambda n: None,
                 on_dropped: Callable[[int], None] = lambda n: None) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.waiting = 0  # live inputs in the queue
        self.queued_tokens = 0
        self._queue: deque[Item] = deque()
        self._retry: deque[Batch] = deque()
        self._ids = itertools.count(1)
        self._target: Target | None = None
        self._on_depth = on_depth
        self._on_dropped = on_dropped
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None

    def attach(self, target: Target) -> None:
        self._target = target

    # -- admission ------------------------------------------------------------------------
    def admit(self, job: Job) -> None:
        """Queue every input of `job`, or raise RESOURCE_EXHAUSTED at once."""
        n = len(job.ids)
        if self.waiting + n > self.max_queue:
            raise errors.queue_full(self.waiting, n, self.max_queue)
        for i in range(n):
            item = Item(job, i)
            self._queue.append(item)
            self.queued_tokens += item.length
        job.queued = n
        self.waiting += n
        self._on_depth(self.waiting)
        self.schedule()

    def cancel(self, job: Job) -> None:
        """Drop a request's inputs that have not reached a worker yet."""
        if job.cancelled:
            return
        job.cancelled = True
        self.waiting -= job.queued
        if job.queued:
            self._on_dropped(job.queued)
        job.queued = 0
        self._on_depth(self.waiting)

    def requeue(self, batch: Batch) -> None:
        """A batch whose worker died goes out again before anything else."""
        self._retry.append(batch)
        self.schedule()

    # -- forming batches ------------------------------------------------------------------
    def _pop_live(self) -> Item | None:
        while self._queue:
            item = self._queue.popleft()
            self.queued_tokens -= item.length
            job = item.job
            if job.done:
                self.cancel(job)  # a failed request's other inputs: stop counting them
                continue
            if job.deadline is not None and job.deadline <= time.monotonic():
                job.fail(errors.deadline_exceeded("the request's deadline passed in the queue"))
                self.cancel(job)
                continue
            return item
        return None

    def take(self) -> Batch | None:
        """Form the next batch from the queue (None if nothing live is waiting)."""
        window: list[Item] = []
        while len(window) < WINDOW and (item := self._pop_live()) is not None:
            window.append(item)
        if not window:
            return None
        chosen = set(choose_batch([it.length for it in window], self.max_batch_tokens))
        batch_items = []
        for pos in sorted(chosen, key=lambda p: window[p].length):
            batch_items.append(window[pos])
        rest = [it for pos, it in enumerate(window) if pos not in chosen]
        for it in reversed(rest):
            self._queue.appendleft(it)
            self.queued_tokens += it.length
        now = time.monotonic()
        for it in batch_items:
            it.job.queued -= 1
            it.job.dispatched(now)
        self.waiting -= len(batch_items)
        self._on_depth(self.waiting)
        return Batch(next(self._ids), batch_items)

    def _oldest_age(self) -> float | None:
        while self._queue and self._queue[0].job.done:
            item = self._queue.popleft()
            self.queued_tokens -= item.length
            self.cancel(item.job)
        if not self._queue:
            return None
        return time.monotonic() - self._queue[0].job.admitted

    # -- dispatch -------------------------------------------------------------------------
    def schedule(self) -> None:
        """Dispatch on the next loop iteration, so inputs that arrive together batch together."""
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.dispatch)

    def dispatch(self) -> None:
        """Hand batches to workers while one has a free slot and the policy says go."""
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        target = self._target
        if target is None:
            return
        while (picked := target.pick()) is not None:
            worker, busy = picked
            if self._retry:
                batch = self._retry.popleft().live()
                if batch is not None:
                    target.send(worker, batch)
                continue
            age = self._oldest_age()
            if age is None:
                return
            if busy and self.queued_tokens < self.max_batch_tokens and age < self.max_wait_s:
                delay = self.max_wait_s - age
                self._timer = asyncio.get_running_loop().call_later(delay, self.dispatch)
                return
            batch = self.take()
            if batch is None:
                return
            target.send(worker, batch)
