"""The batcher on plain data: batch choice under the token budget, the bounded queue,
cancellation, and the dispatch policy against a pool of recorded slots."""

from __future__ import annotations

import asyncio
import random

import grpc
import numpy as np
import pytest

from moe_embed.service.batcher import Batch, Batcher, Job, choose_batch
from moe_embed.service.errors import ServiceError


def test_oldest_input_always_goes_even_over_budget() -> None:
    assert choose_batch([600, 10, 10], budget=512) == [0]
    assert 0 in choose_batch([500, 3, 7, 480, 490], budget=2000)


def test_batch_respects_budget_counted_with_padding() -> None:
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 512) for _ in range(rng.randint(1, 80))]
        budget = rng.choice([512, 2048, 8192])
        chosen = choose_batch(lengths, budget)
        assert 0 in chosen and len(set(chosen)) == len(chosen)
        if len(chosen) > 1:
            assert max(lengths[i] for i in chosen) * len(chosen) <= budget
        assert [lengths[i] for i in chosen] == sorted(lengths[i] for i in chosen)


def test_batch_groups_similar_lengths() -> None:
    # oldest is short: the long ones would add more padding than the other short ones
    lengths = [10, 500, 12, 9, 480, 11, 500, 10]
    chosen = choose_batch(lengths, budget=100)
    assert sorted(lengths[i] for i in chosen) == [9, 10, 10, 11, 12]


def test_fills_the_budget_when_enough_waits() -> None:
    chosen = choose_batch([64] * 200, budget=8192)
    assert len(chosen) == 128


def _job(loop: asyncio.AbstractEventLoop, lengths: list[int], dims: int = 64) -> Job:
    ids = [np.arange(n, dtype=np.int32) for n in lengths]
    return Job(ids, dims, True, loop.create_future())


class Slots:
    """A target with a fixed number of free slots that records what it was sent."""

    def __init__(self, free: int, busy: bool = False) -> None:
        self.free = free
        self.busy = busy
        self.sent: list[Batch] = []

    def pick(self):
        return ("worker", self.busy) if self.free > 0 else None

    def send(self, worker, batch: Batch) -> None:
        self.free -= 1
        self.sent.append(batch)


def test_queue_bound_refuses_at_once_with_resource_exhausted() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        b = Batcher(8192, 0.002, max_queue=5)
        b.admit(_job(loop, [3, 3, 3]))
        with pytest.raises(ServiceError) as exc:
            b.admit(_job(loop, [3, 3, 3]))
        assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queue 5" in exc.value.message
        assert b.waiting == 3

    asyncio.run(main())


def test_cancelled_request_never_reaches_a_worker() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        dropped = []
        b = Batcher(8192, 0.002, max_queue=100, on_dropped=dropped.append)
        keep, cancel = _job(loop, [4, 5]), _job(loop, [6, 7, 8])
        b.admit(keep)
        b.admit(cancel)
        b.cancel(cancel)
        assert b.waiting == 2 and dropped == [3]
        target = Slots(free=4)
        b.attach(target)
        await asyncio.sleep(0)  # the scheduled dispatch runs
        assert len(target.sent) == 1
        assert [it.job for it in target.sent[0].items] == [keep, keep]
        assert b.waiting == 0

    asyncio.run(main())


def test_idle_worker_gets_work_at_once_busy_one_after_max_wait() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        busy = Slots(free=1, busy=True)
        b = Batcher(8192, max_wait_s=0.05, max_queue=100)
        b.attach(busy)
        b.admit(_job(loop, [5]))
        await asyncio.sleep(0.01)
        assert busy.sent == []  # waits for companions
        b.admit(_job(loop, [6]))
        await asyncio.sleep(0.08)
        assert len(busy.sent) == 1 and len(busy.sent[0].items) == 2

        idle = Slots(free=1, busy=False)
        b2 = Batcher(8192, max_wait_s=10.0, max_queue=100)
        b2.attach(idle)
        b2.admit(_job(loop, [5]))
        await asyncio.sleep(0)
        assert len(idle.sent) == 1

    asyncio.run(main())


def test_requeued_batch_goes_first_without_finished_requests() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        b = Batcher(8192, 0.0, max_queue=100)
        a, c = _job(loop, [4]), _job(loop, [4])
        b.admit(a)
        b.admit(c)
        first = b.take()
        assert first is not None and len(first.items) == 2
        first.attempts = 1
        b.admit(_job(loop, [9]))
        a.fail(ServiceError(grpc.StatusCode.CANCELLED, "gone"))
        target = Slots(free=2)
        b.attach(target)
        b.requeue(first)
        await asyncio.sleep(0)
        resent = target.sent[0]
        assert resent.batch_id == first.batch_id and resent.attempts == 1
        assert [it.job for it in resent.items] == [c]
        assert target.sent[1].items[0].length == 9

    asyncio.run(main())


def test_results_fill_jobs_in_input_order() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        job = _job(loop, [3, 9, 1], dims=2)
        b = Batcher(8192, 0.0, max_queue=100)
        b.admit(job)
        batch = b.take()
        assert [it.length for it in batch.items] == [1, 3, 9]  # sorted by length
        ids, offsets, dims, norm = batch.arrays()
        assert offsets.tolist() == [0, 1, 4, 13] and dims.tolist() == [2, 2, 2]
        for it in reversed(batch.items):
            job.deliver(it.index, np.full(2, it.length, np.float32), 1.5)
        await job.future
        assert [v[0] for v in job.vectors] == [3, 9, 1]

    asyncio.run(main())
