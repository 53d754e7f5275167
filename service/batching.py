"""The request queue and how batches are formed from it: plain data, no I/O, no clock of its
own (callers pass `now`), so the policy can be tested on its own.

Every request's tokenized inputs, unary and stream alike, wait in one bounded queue, kept per
caller (a connection's unary calls, or one stream) so that callers share it fairly:
- admission: a caller that already has inputs waiting may hold at most max_queue / (k + 1)
  of them, k being the callers with inputs waiting (itself included), so there is always room
  for one more caller; a caller with nothing waiting is admitted while the queue has room.
  Room is taken before tokenizing (`reserve`): inputs being tokenized count as waiting, so a
  flood is refused at the door instead of piling up, deserialized, before the tokenizer;
- batches: the oldest waiting input always goes first (nothing starves), then callers take
  turns, one input each, while the batch's real tokens fit `max_batch_tokens`. A heavy caller
  fills what light callers leave, and a light caller's input rides in the next batch.
The budget counts real tokens, what the runtime's linear layers compute: padding is never
computed by a linear layer, and attention's padded width is bounded per chunk in the worker.
Inputs of cancelled or failed requests are dropped before they reach a worker.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import Counter, OrderedDict, deque
from collections.abc import Collection, Hashable

import numpy as np

from ..workers.process import policy, protocol
from . import errors
from .errors import EngineError


class Job:
    """One request's inputs on their way through the queue, the workers and back."""

    __slots__ = ("ids", "dims", "normalize", "caller", "future", "admitted", "deadline",
                 "vectors", "remaining", "queued", "cancelled", "queue_ms", "compute_ms",
                 "span", "admitted_ns", "tokens")

    def __init__(self, ids: list[np.ndarray], dims: int, normalize: bool, caller: Hashable,
                 future: asyncio.Future, admitted: float, deadline: float | None = None) -> None:
        self.ids = ids
        self.tokens = sum(len(x) for x in ids)  # real tokens of every input
        self.dims = dims
        self.normalize = normalize
        self.caller = caller
        self.future = future
        self.admitted = admitted  # time.monotonic()
        self.deadline = deadline  # time.monotonic() based, None = no deadline
        self.vectors: list[np.ndarray | None] = [None] * len(ids)
        self.remaining = len(ids)
        self.queued = 0
        self.cancelled = False
        self.queue_ms = 0.0
        self.compute_ms = 0.0
        self.span = None  # the request's trace span, when tracing is on
        self.admitted_ns = 0  # wall clock of `admitted`, when tracing is on

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

    def fail(self, error: EngineError) -> None:
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

    __slots__ = ("batch_id", "items", "attempts", "tokens")

    def __init__(self, batch_id: int, items: list[Item]) -> None:
        self.batch_id = batch_id
        self.items = items
        self.attempts = 0  # workers it has been sent to
        self.tokens = sum(it.length for it in items)

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

    def cohort(self) -> int:
        """policy.cohort: its requests whose callers the scheduler waits for (or 0)."""
        jobs = {id(it.job): it.job for it in self.items}.values()
        return policy.cohort([j.tokens for j in jobs], self.tokens)

    def message(self) -> protocol.Batch:
        """The batch as the worker takes it: packed ids, offsets, dims, normalize."""
        parts = [it.job.ids[it.index] for it in self.items]
        offsets = np.zeros(len(parts) + 1, dtype=np.int32)
        np.cumsum([p.size for p in parts], out=offsets[1:])
        dims = np.fromiter((it.job.dims for it in self.items), np.int32, len(parts))
        norm = np.fromiter((it.job.normalize for it in self.items), np.bool_, len(parts))
        return protocol.Batch(self.batch_id, np.concatenate(parts), offsets, dims, norm)


class BatchQueue:
    """The bounded, per-caller queue and batch formation."""

    def __init__(self, max_batch_tokens: int, max_queue: int) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self.waiting = 0  # inputs in the queue
        self.queued_tokens = 0  # their real tokens
        self.dropped = 0  # inputs dropped before reaching a worker, since the start
        self.admitted = 0  # requests admitted, since the start
        self.requests_waiting = 0  # requests with inputs in the queue
        self.tokenizing = 0  # inputs given room (`reserve`) and not yet queued
        self._tokenizing: Counter[Hashable] = Counter()  # the same, per caller
        self._callers: OrderedDict[Hashable, deque[Item]] = OrderedDict()  # in turn order
        self._tokens: Counter[Hashable] = Counter()  # real tokens waiting, per caller
        self._ids = itertools.count(1)
        self._seq = itertools.count()
        self._deadlines: list[tuple[float, int, Job]] = []  # min-heap of waiting requests

    # -- admission ------------------------------------------------------------------------
    def _holds(self, caller: Hashable) -> int:
        """Inputs `caller` has waiting or being tokenized."""
        return len(self._callers.get(caller, ())) + self._tokenizing.get(caller, 0)

    def share(self, caller: Hashable) -> int:
        """The most inputs `caller` may have waiting: room is always left for one more."""
        holders = len(self._callers) + sum(c not in self._callers for c in self._tokenizing)
        k = holders + (not self._holds(caller))
        return self.max_queue // (k + 1)

    def check(self, caller: Hashable, n: int) -> None:
        """RESOURCE_EXHAUSTED unless `n` more inputs from `caller` fit."""
        held = self._holds(caller)
        if self.waiting + self.tokenizing + n > self.max_queue:
            raise errors.queue_full(f"{self.waiting} inputs waiting + {self.tokenizing} being "
                                    f"tokenized + {n} asked > max_queue {self.max_queue}")
        if held and held + n > self.share(caller):
            raise errors.queue_full(
                f"this caller has {held} inputs waiting or being tokenized + {n} asked > its "
                f"fair share {self.share(caller)} of max_queue {self.max_queue} "
                f"({len(self._callers) - 1} other callers waiting)")

    def reserve(self, caller: Hashable, n: int) -> None:
        """Room for `n` inputs of `caller` while they are tokenized (RESOURCE_EXHAUSTED at once
        if they would not be admitted); `release` it just before `admit`."""
        self.check(caller, n)
        self.tokenizing += n
        self._tokenizing[caller] += n

    def release(self, caller: Hashable, n: int) -> None:
        """Give back the room `reserve` took."""
        self.tokenizing -= n
        self._tokenizing[caller] -= n
        if self._tokenizing[caller] <= 0:
            del self._tokenizing[caller]

    def admit(self, job: Job) -> None:
        """Queue every input of `job`, or raise RESOURCE_EXHAUSTED at once."""
        n = len(job.ids)
        self.check(job.caller, n)
        items = self._callers.setdefault(job.caller, deque())
        for i in range(n):
            item = Item(job, i)
            items.append(item)
            self.queued_tokens += item.length
            self._tokens[job.caller] += item.length
        job.queued = n
        self.waiting += n
        self.admitted += 1
        self.requests_waiting += n > 0
        if job.deadline is not None:
            heapq.heappush(self._deadlines, (job.deadline, next(self._seq), job))

    def cancel(self, job: Job) -> int:
        """Drop a request's inputs that have not reached a worker yet; returns how many."""
        if job.cancelled:
            return 0
        job.cancelled = True
        dropped, job.queued = job.queued, 0
        if dropped:
            items = self._callers[job.caller]
            kept = deque(it for it in items if it.job is not job)
            tokens = sum(it.length for it in items if it.job is job)
            self.queued_tokens -= tokens
            self._tokens[job.caller] -= tokens
            if kept:
                self._callers[job.caller] = kept
            else:
                del self._callers[job.caller]
                del self._tokens[job.caller]
            self.waiting -= dropped
            self.dropped += dropped
            self.requests_waiting -= 1
        return dropped

    def _live_deadlines(self) -> None:
        """Drop heap entries of requests with nothing left waiting."""
        while self._deadlines and (self._deadlines[0][2].queued == 0
                                   or self._deadlines[0][2].done):
            heapq.heappop(self._deadlines)

    def jobs(self) -> list[Job]:
        """Every request with inputs waiting."""
        return list({id(it.job): it.job for items in self._callers.values()
                     for it in items}.values())

    def expired(self, now: float) -> list[Job]:
        """Requests with inputs waiting whose deadline has passed (the caller fails and
        cancels them)."""
        jobs = []
        self._live_deadlines()
        while self._deadlines and self._deadlines[0][0] <= now:
            jobs.append(heapq.heappop(self._deadlines)[2])
            self._live_deadlines()
        return jobs

    def next_deadline(self) -> float | None:
        """The earliest deadline of a request with inputs waiting."""
        self._live_deadlines()
        return self._deadlines[0][0] if self._deadlines else None

    # -- batches --------------------------------------------------------------------------
    def oldest(self) -> float | None:
        """When the oldest waiting input was admitted (None: nothing waits)."""
        return min((items[0].job.admitted for items in self._callers.values()), default=None)

    def callers_waiting(self) -> list[Hashable]:
        """Callers with inputs waiting."""
        return list(self._callers)

    def tokens_waiting(self, caller: Hashable) -> int:
        """The real tokens `caller` has waiting."""
        return self._tokens.get(caller, 0)

    def full(self, budget: int | None = None) -> bool:
        """A batch of `budget` tokens (default max_batch_tokens) would be full right now."""
        return self.queued_tokens >= (self.max_batch_tokens if budget is None else budget)

    def take(self, now: float, budget: int | None = None, lightest_first: bool = False,
             only: Collection[Hashable] | None = None) -> Batch | None:
        """Form the next batch (None if nothing waits) of at most `budget` real tokens
        (default max_batch_tokens). Callers take turns from the one with the oldest input or,
        `lightest_first`, from the one with the fewest inputs waiting; `only` these callers,
        if given (an express batch: light callers' inputs alone, so none waits behind a heavy
        caller's). Finished requests' inputs must have been cancelled first."""
        order = [c for c in self._callers if only is None or c in only]
        if not order:
            return None
        budget = self.max_batch_tokens if budget is None else budget
        if lightest_first:
            turn = sorted(order, key=lambda c: (len(self._callers[c]),
                                                self._callers[c][0].job.admitted))
        else:
            first = min(order, key=lambda c: self._callers[c][0].job.admitted)
            turn = order[order.index(first):] + order[:order.index(first)]
        taken: list[Item] = []
        tokens = 0
        progress = True
        while progress:
            progress = False
            for caller in turn:
                items = self._callers.get(caller)
                if not items or (taken and tokens + items[0].length > budget):
                    continue
                item = items.popleft()
                taken.append(item)
                tokens += item.length
                self._tokens[caller] -= item.length
                progress = True
        for caller in turn:  # callers served go to the back of the turn order
            if caller in self._callers:
                if self._callers[caller]:
                    self._callers.move_to_end(caller)
                else:
                    del self._callers[caller]
                    del self._tokens[caller]
        for it in taken:
            it.job.queued -= 1
            it.job.dispatched(now)
            self.requests_waiting -= it.job.queued == 0
        self.queued_tokens -= tokens
        self.waiting -= len(taken)
        return Batch(next(self._ids), taken)
