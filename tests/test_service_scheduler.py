"""The scheduler with real worker processes: dispatch policy, cancellation before dispatch,
resend-first after a death, a worker-side invalid input, a stuck worker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import grpc
import numpy as np
import pytest

from moe_embed.service.batching import BatchQueue, Job
from moe_embed.service.errors import ServiceError
from moe_embed.service.metrics import Metrics
from moe_embed.service.scheduler import Scheduler
from moe_embed.service.worker_pool import WorkerPool


@contextlib.asynccontextmanager
async def running(bundle, max_wait_s: float = 0.002, batch_timeout_s: float = 30.0,
                  workers: int = 1):
    metrics = Metrics()
    pool = WorkerPool(bundle, workers, 1, "warning", metrics)
    await pool.start()
    sched = Scheduler(BatchQueue(8192, 1000), pool, metrics, max_wait_s, batch_timeout_s)
    sched.start()
    try:
        yield sched
    finally:
        for pid in pool.pids():
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(pid, signal.SIGCONT)
        await sched.close()
        await pool.close()


def job(lengths: list[int], caller: str = "c", deadline: float | None = None) -> Job:
    ids = [np.array([0] + [35378] * (n - 2) + [2], dtype=np.int32) for n in lengths]
    return Job(ids, 64, True, caller, asyncio.get_running_loop().create_future(),
               time.monotonic(), deadline)


def sent(sched: Scheduler) -> tuple[float, float]:
    """(batches sent, inputs sent) so far."""
    r = sched.metrics.registry
    return (r.get_sample_value("moe_embed_batch_size_inputs_count"),
            r.get_sample_value("moe_embed_batch_size_inputs_sum"))


async def until(predicate, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.01)


def test_idle_worker_gets_work_at_once(tiny_bundle) -> None:
    async def main() -> None:
        async with running(tiny_bundle, max_wait_s=10.0) as sched:
            j = job([5])
            sched.submit(j)
            await asyncio.wait_for(j.future, 5)  # not after max_wait
    asyncio.run(main())


def test_busy_worker_gets_a_batch_after_max_wait(tiny_bundle) -> None:
    async def main() -> None:
        async with running(tiny_bundle, max_wait_s=1.0) as sched:
            pid = sched.pool.pids()[0]
            os.kill(pid, signal.SIGSTOP)
            first = job([5])
            sched.submit(first)
            await until(lambda: sent(sched) == (1, 1))
            b, c = job([6]), job([7])
            sched.submit(b)
            await asyncio.sleep(0.2)
            sched.submit(c)
            await asyncio.sleep(0.3)
            assert sent(sched) == (1, 1)  # the busy worker's free slot waits for companions
            await until(lambda: sent(sched) == (2, 3), 5)  # then both go as one batch
            os.kill(pid, signal.SIGCONT)
            await asyncio.wait_for(asyncio.gather(first.future, b.future, c.future), 10)
    asyncio.run(main())


def test_cancelled_request_never_reaches_a_worker(tiny_bundle) -> None:
    async def main() -> None:
        async with running(tiny_bundle, max_wait_s=10.0) as sched:
            pid = sched.pool.pids()[0]
            os.kill(pid, signal.SIGSTOP)
            first = job([5])
            sched.submit(first)
            await until(lambda: sent(sched) == (1, 1))
            keep, cancel = job([4, 5]), job([6, 7, 8])
            sched.submit(keep)
            sched.submit(cancel)
            await asyncio.sleep(0.1)
            cancel.future.cancel()
            sched.cancel(cancel)
            os.kill(pid, signal.SIGCONT)
            await asyncio.wait_for(asyncio.gather(first.future, keep.future), 10)
            assert sent(sched) == (2, 3)  # `first`, then `keep` alone
            assert sched.metrics.registry.get_sample_value(
                "moe_embed_inputs_dropped_total") == 3
    asyncio.run(main())


def test_resent_batch_goes_first_without_finished_requests(tiny_bundle) -> None:
    async def main() -> None:
        async with running(tiny_bundle, max_wait_s=10.0) as sched:
            pid = sched.pool.pids()[0]
            os.kill(pid, signal.SIGSTOP)
            a, c = job([4]), job([4])
            sched.submit(a)
            sched.submit(c)
            await until(lambda: sent(sched) == (1, 2))
            d = job([9])
            sched.submit(d)  # waits: the worker is busy and max_wait is long
            a.future.cancel()
            sched.cancel(a)
            done: list[str] = []
            c.future.add_done_callback(lambda f: done.append("c"))
            d.future.add_done_callback(lambda f: done.append("d"))
            os.kill(pid, signal.SIGKILL)
            await asyncio.wait_for(asyncio.gather(c.future, d.future), 60)
            assert done == ["c", "d"]  # the resent batch went before new work
            assert sched.resent_batches == 1
            assert sent(sched) == (2, 3)  # [a, c] once, then d: a resend is not a new batch
    asyncio.run(main())


def test_worker_side_invalid_input_fails_only_its_request(tiny_bundle) -> None:
    """The frontend validates first; should a worker still refuse an input, only that
    request fails, with INVALID_ARGUMENT naming its index in that request."""
    async def main() -> None:
        async with running(tiny_bundle) as sched:
            good = job([5, 6], caller="x")
            bad = job([4, 4], caller="y")
            bad.ids[1] = np.array([0, 250048, 2], dtype=np.int32)  # out of the vocabulary
            sched.submit(good)
            sched.submit(bad)
            await asyncio.wait_for(good.future, 10)
            with pytest.raises(ServiceError) as exc:
                await asyncio.wait_for(bad.future, 10)
            assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert (exc.value.field, exc.value.index) == ("inputs", 1)
            assert "vocabulary" in exc.value.message
    asyncio.run(main())


def test_stuck_worker_is_killed_and_its_batch_resent(tiny_bundle) -> None:
    async def main() -> None:
        async with running(tiny_bundle, batch_timeout_s=1.0) as sched:
            victim = sched.pool.pids()[0]
            os.kill(victim, signal.SIGSTOP)
            j = job([5, 7])
            start = time.monotonic()
            sched.submit(j)
            await asyncio.wait_for(j.future, 60)
            assert time.monotonic() - start >= 1.0
            assert sched.pool.pids()[0] != victim and sched.resent_batches == 1
    asyncio.run(main())


def test_a_small_batch_overtakes_a_large_one(tiny_bundle) -> None:
    """A busy worker's second slot gets an express batch, and the worker runs the smaller of
    its batches first: a light request sent after a large batch is answered before it."""
    async def main() -> None:
        async with running(tiny_bundle, max_wait_s=0.0) as sched:
            pid = sched.pool.pids()[0]
            os.kill(pid, signal.SIGSTOP)
            large = job([400] * 20, caller="heavy")
            sched.submit(large)
            await until(lambda: sent(sched) == (1, 20))
            more = job([400] * 20, caller="heavy")  # queued behind, more than an express fits
            small = job([5], caller="light")
            sched.submit(more)
            sched.submit(small)
            await until(lambda: sent(sched)[0] == 2)  # the express batch, to the busy worker
            done: list[str] = []
            for name, j in (("large", large), ("small", small), ("more", more)):
                j.future.add_done_callback(lambda f, name=name: done.append(name))
            os.kill(pid, signal.SIGCONT)
            await asyncio.wait_for(asyncio.gather(large.future, small.future, more.future), 60)
            assert done.index("small") < done.index("large"), done
    asyncio.run(main())


def test_a_request_past_its_deadline_is_dropped_before_any_worker(tiny_bundle) -> None:
    async def main() -> None:
        async with running(tiny_bundle, max_wait_s=30.0) as sched:
            pid = sched.pool.pids()[0]
            os.kill(pid, signal.SIGSTOP)
            first = job([5])
            sched.submit(first)
            await until(lambda: sent(sched) == (1, 1))
            late = job([4, 5, 6], deadline=time.monotonic() + 0.3)
            sched.submit(late)  # waits: the only worker is busy and max_wait is long
            with pytest.raises(ServiceError) as exc:
                await asyncio.wait_for(late.future, 5)
            assert exc.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "deadline passed in the queue" in exc.value.message
            assert sched.metrics.registry.get_sample_value(
                "moe_embed_inputs_dropped_total") == 3
            os.kill(pid, signal.SIGCONT)
            await asyncio.wait_for(first.future, 10)
            assert sent(sched) == (1, 1)  # the late request never reached the worker
    asyncio.run(main())


def test_the_least_loaded_worker_gets_the_next_batch(tiny_bundle) -> None:
    async def main() -> None:
        async with running(tiny_bundle, workers=2) as sched:
            stopped = sched.pool.pids()[0]
            os.kill(stopped, signal.SIGSTOP)
            held = job([5])
            sched.submit(held)  # both idle: worker 0 takes it, and holds it
            await until(lambda: sent(sched) == (1, 1))
            nxt = job([6])
            sched.submit(nxt)  # worker 0 still has a free slot, but worker 1 has no work
            await asyncio.wait_for(nxt.future, 10)
            os.kill(stopped, signal.SIGCONT)
            await asyncio.wait_for(held.future, 10)
    asyncio.run(main())
