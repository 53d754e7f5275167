"""The scheduler with real worker processes: dispatch policy, cancellation before dispatch,
resend-first after a death, a worker-side invalid input, a stuck worker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from types import SimpleNamespace

import numpy as np
import pytest

from moe_embed.service.batching import BatchQueue, Job
from moe_embed.service.errors import Code, EngineError
from moe_embed.service.metrics import Metrics
from moe_embed.service.scheduler import FIRST_S_PER_TOKEN, STUCK_FACTOR, Scheduler
from moe_embed.service.worker_pool import Worker, WorkerPool
from moe_embed.workers.process import policy
from moe_embed.workers.process.policy import next_to_step


@contextlib.asynccontextmanager
async def running(bundle, max_wait_s: float = 0.002, batch_timeout_s: float = 30.0,
                  workers: int = 1, max_batch_tokens: int = 8192,
                  rejoin_s: float = policy.REJOIN_S, rejoin_scale: float = 1.0):
    metrics = Metrics()
    pool = WorkerPool(bundle, workers, 1, "warning", metrics)
    await pool.start()
    sched = Scheduler(BatchQueue(max_batch_tokens, 1000), pool, metrics, max_wait_s,
                      batch_timeout_s, rejoin_s=rejoin_s, rejoin_scale=rejoin_scale)
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


async def held_by_stopped_worker(sched: Scheduler, first: Job) -> int:
    """Stop the only worker, send it `first`, and return its pid once the batch has gone."""
    pid = sched.pool.pids()[0]
    os.kill(pid, signal.SIGSTOP)
    sched.submit(first)
    await until(lambda: sent(sched) == (1, len(first.ids)))
    return pid


async def completion_order(pid: int, jobs: list[tuple[str, Job]],
                           timeout: float = 60.0) -> list[str]:
    """Resume the stopped worker `pid` and return the jobs' names in the order they finish."""
    done: list[str] = []
    for name, j in jobs:
        j.future.add_done_callback(lambda f, name=name: done.append(name))
    os.kill(pid, signal.SIGCONT)
    await asyncio.wait_for(asyncio.gather(*(j.future for _, j in jobs)), timeout)
    return done


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


def test_a_busy_workers_next_batch_gathers_until_the_running_one_should_end(tiny_bundle) -> None:
    """Many small callers: what arrives while a batch runs joins one next batch, sent just
    before the running batch is expected to end, not a batch cut after the max wait."""
    async def main() -> None:
        async with running(tiny_bundle, max_wait_s=0.002) as sched:
            sched.s_per_token = 0.3  # the first batch (10 tokens) is expected to run 3 s
            pid = await held_by_stopped_worker(sched, job([10], caller="a"))
            started = time.monotonic()
            b, c = job([6], caller="b"), job([7], caller="c")
            sched.submit(b)
            await asyncio.sleep(0.2)
            sched.submit(c)
            await asyncio.sleep(0.3)
            assert sent(sched) == (1, 1)  # far past the max wait: still gathering
            await until(lambda: sent(sched) == (2, 3), 10)  # then both go as one batch
            assert time.monotonic() - started >= 3.0 - policy.AHEAD_LEAD_S - 0.5
            os.kill(pid, signal.SIGCONT)
            await asyncio.wait_for(asyncio.gather(b.future, c.future), 10)
    asyncio.run(main())


def test_the_running_batchs_end_is_estimated_from_its_own_tokens() -> None:
    w = Worker(0, None, None, None)
    assert w.running_ends_in(0.01, 100.0) == 0.0  # holds nothing
    w.running_since, w.batch_tokens = 100.0, {7: 50, 8: 400}
    assert w.running_ends_in(0.01, 100.1) == pytest.approx(0.4)  # the oldest's 50 tokens
    assert w.running_ends_in(0.01, 101.0) == 0.0  # overdue: never negative


def test_the_stuck_limit_grows_with_the_batchs_tokens() -> None:
    """A batch is taken for stuck past the floor plus 20x its expected time (its tokens times
    the recent time per token); before any batch has finished, plus a generous prior a token."""
    sched = Scheduler(BatchQueue(8192, 1000), None, Metrics(), 0.002, 10.0)
    big, small = SimpleNamespace(tokens=6000), SimpleNamespace(tokens=100)
    assert sched.limit_s(big) == pytest.approx(10.0 + 6000 * FIRST_S_PER_TOKEN)  # 40 s
    assert sched.limit_s(small) == pytest.approx(10.0 + 100 * FIRST_S_PER_TOKEN)
    sched.s_per_token = 0.004  # the big batch is expected to take 24 s
    assert sched.limit_s(big) == pytest.approx(10.0 + STUCK_FACTOR * 6000 * 0.004)
    assert sched.limit_s(small) == pytest.approx(10.0 + STUCK_FACTOR * 100 * 0.004)


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


def test_a_batch_the_worker_refuses_fails_internal_naming_it_and_the_worker_goes_on(
        tiny_bundle) -> None:
    """Requests are validated once, before queuing: a batch a worker still refuses is a bug
    upstream. Its requests fail INTERNAL naming the batch; the worker serves the next one."""
    async def main() -> None:
        async with running(tiny_bundle) as sched:
            bad = job([4, 4], caller="y")
            bad.ids[1] = np.array([0, 250048, 2], dtype=np.int32)  # out of the vocabulary
            sched.submit(bad)
            with pytest.raises(EngineError) as exc:
                await asyncio.wait_for(bad.future, 10)
            assert exc.value.code == Code.INTERNAL
            assert exc.value.field is None
            assert "batch 1 " in exc.value.message and "vocabulary" in exc.value.message
            good = job([5, 6], caller="x")
            sched.submit(good)
            await asyncio.wait_for(good.future, 10)
            assert sched.pool.restarts == 0
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
    """A busy worker's second slot gets an express batch, and the worker runs it first when it
    is far smaller: a light request sent after a large batch is answered before it."""
    async def main() -> None:
        async with running(tiny_bundle, max_wait_s=0.0) as sched:
            large = job([400] * 20, caller="heavy")
            pid = await held_by_stopped_worker(sched, large)
            more = job([400] * 20, caller="heavy")  # queued behind, more than an express fits
            small = job([5], caller="light")
            sched.submit(more)
            sched.submit(small)
            await until(lambda: sent(sched)[0] == 2)  # the express batch, to the busy worker
            done = await completion_order(pid, [("large", large), ("small", small),
                                                ("more", more)])
            assert done.index("small") < done.index("large"), done
    asyncio.run(main())


def test_a_burst_from_one_caller_is_sent_ahead_whole(tiny_bundle) -> None:
    """Express batches are for callers with nothing in flight: the rest of one client's burst
    goes to the busy worker as a full batch, not cut into small ones that would run first."""
    async def main() -> None:
        async with running(tiny_bundle, max_wait_s=0.0) as sched:
            first = job([400] * 20, caller="burst")
            pid = await held_by_stopped_worker(sched, first)
            rest = job([400] * 20, caller="burst")
            sched.submit(rest)
            await until(lambda: sent(sched)[0] == 2)
            assert sent(sched) == (2, 40)  # all 20 inputs sent ahead, not 512 tokens of them
            await completion_order(pid, [("first", first), ("rest", rest)])
    asyncio.run(main())


def test_a_batch_sent_ahead_never_passes_max_batch_tokens(tiny_bundle) -> None:
    """What waits for a busy worker is sent ahead in parts of at most --max-batch-tokens (a
    burst once went as one batch of everything that waited)."""
    async def main() -> None:
        async with running(tiny_bundle, max_wait_s=0.0, max_batch_tokens=1000) as sched:
            first = job([400, 400], caller="burst")
            pid = await held_by_stopped_worker(sched, first)
            rest = job([400] * 10, caller="burst")
            sched.submit(rest)
            await until(lambda: sent(sched)[0] == 2)
            assert sent(sched) == (2, 4)  # 800 tokens ahead, not the 4000 that wait
            await completion_order(pid, [("first", first), ("rest", rest)])
            r = sched.metrics.registry
            assert r.get_sample_value("moe_embed_batch_size_tokens_bucket", {"le": "1024.0"}) \
                == r.get_sample_value("moe_embed_batch_size_tokens_count") == 6
    asyncio.run(main())


def test_a_light_request_never_rides_in_a_heavy_callers_batch(tiny_bundle) -> None:
    """Even an idle worker does not take a light caller's input in one batch with a heavy
    caller's: the light one goes alone (express) and runs first, instead of waiting for
    thousands of another client's tokens."""
    async def main() -> None:
        async with running(tiny_bundle, max_wait_s=0.0) as sched:
            pid = sched.pool.pids()[0]
            os.kill(pid, signal.SIGSTOP)  # the worker is idle, but holds what it is sent
            heavy, light = job([400] * 10, caller="heavy"), job([20], caller="light")
            sched.submit(heavy)
            sched.submit(light)  # both wait when the dispatcher next looks
            await until(lambda: sent(sched)[1] == 11)
            await asyncio.sleep(0.1)
            assert sent(sched) == (2, 11)  # two batches: the light input alone, then the rest
            one_input = sched.metrics.registry.get_sample_value(
                "moe_embed_batch_size_inputs_bucket", {"le": "1.0"})
            assert one_input == 1, "the light input went with some of the heavy caller's"
            done = await completion_order(pid, [("heavy", heavy), ("light", light)])
            assert done == ["light", "heavy"], done
    asyncio.run(main())


def test_a_burst_is_shared_between_busy_workers(tiny_bundle) -> None:
    """What is sent ahead to a busy worker is a part of the queue, not all of it: with two busy
    workers, a quarter of the rest of a burst goes to one (2000 of 8000 tokens), a quarter of
    what is left to the other (1200), and the rest waits for whichever is free first."""
    async def main() -> None:
        async with running(tiny_bundle, max_wait_s=0.0, workers=2) as sched:
            pids = sched.pool.pids()
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            first, second = job([400] * 2, caller="burst"), job([400] * 2, caller="burst")
            sched.submit(first)
            await until(lambda: sent(sched) == (1, 2))
            sched.submit(second)
            await until(lambda: sent(sched) == (2, 4))  # one on each worker
            rest = job([400] * 20, caller="burst")
            sched.submit(rest)
            await until(lambda: sent(sched)[1] == 12)
            await asyncio.sleep(0.2)
            assert sent(sched) == (4, 12)  # 5 and 3 inputs sent ahead; 12 wait for a slot
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
            await asyncio.wait_for(asyncio.gather(first.future, second.future, rest.future), 60)
    asyncio.run(main())


def test_batches_of_similar_size_keep_their_order(tiny_bundle) -> None:
    """Only a far smaller batch overtakes: a slightly smaller one sent ahead to the busy worker
    waits its turn, so a stream of small batches cannot starve an equally small first one."""
    async def main() -> None:
        async with running(tiny_bundle, max_wait_s=0.0) as sched:
            first = job([100] * 4, caller="a")
            pid = await held_by_stopped_worker(sched, first)
            second = job([100] * 3, caller="b")  # express-sized, 3/4 of the first
            sched.submit(second)
            await until(lambda: sent(sched) == (2, 7))  # both held by the stopped worker
            done = await completion_order(pid, [("first", first), ("second", second)])
            assert done == ["first", "second"], done
    asyncio.run(main())


def test_the_worker_lets_only_far_smaller_batches_ahead_and_only_so_much() -> None:
    """The worker's own rule (the frontend relies on it): oldest first, unless a later batch is
    at most a quarter of its size, and never more than its own tokens in all."""
    def batch(tokens: int) -> SimpleNamespace:
        return SimpleNamespace(tokens=tokens, yielded=0, overtook=False)

    old, similar = batch(400), batch(300)
    assert next_to_step([old, similar]) is old  # similar sizes keep their order
    big = batch(1000)
    assert next_to_step([big, batch(600), batch(250)]).tokens == 250  # the far smaller one
    big, lights = batch(1000), [batch(250) for _ in range(5)]
    ahead = []
    for light in lights:
        chosen = next_to_step([big, light])
        ahead.append(chosen is light)
    assert ahead == [True] * 4 + [False]  # 4 x 250 = its own 1000 tokens, then it runs
    assert big.yielded == 1000


def test_a_large_batch_yields_at_most_its_own_size(tiny_bundle) -> None:
    """Light batches overtake a heavy one only up to its own token count: a steady stream of
    them delays it by at most its own size, then it finishes ahead of the rest."""
    async def main() -> None:
        async with running(tiny_bundle, max_wait_s=0.0) as sched:
            big = job([400] * 20, caller="heavy")  # 8000 tokens
            pid = await held_by_stopped_worker(sched, big)
            # 24 express batches of 5 x 100 tokens: 16 of them (8000 tokens) may overtake
            smalls = [job([100], caller=f"light{i}") for i in range(120)]
            for j in smalls:
                sched.submit(j)
            await until(lambda: sent(sched)[0] >= 2)  # express batches beside it
            done = await completion_order(pid, [("big", big)] + [("small", j) for j in smalls],
                                          timeout=120)
            before = done.index("big")
            assert 60 <= before <= 90, done  # 80 let through (+- the batch held beside it)
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
            with pytest.raises(EngineError) as exc:
                await asyncio.wait_for(late.future, 5)
            assert exc.value.code == Code.DEADLINE_EXCEEDED
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


async def running_batch(sched: Scheduler, callers: str = "abc", length: int = 5
                        ) -> tuple[int, list[Job]]:
    """Stop the only worker and send it one batch of one-text requests of `length` tokens, one
    from each of `callers`; returns the worker's pid and the requests."""
    pid = sched.pool.pids()[0]
    os.kill(pid, signal.SIGSTOP)
    first = [job([length], caller=c) for c in callers]
    for j in first:
        sched.submit(j)
    await until(lambda: sent(sched) == (1, len(callers)))
    return pid, first


def test_nothing_goes_ahead_while_fewer_requests_wait_than_the_running_batch_carries(
        tiny_bundle) -> None:
    """Many small closed-loop clients: a request that arrives while their batch runs waits for
    them to come back instead of running alone ahead of them (a lone request once split 8
    clients into batches of 1 and 7 for good). As many as the running batch carries go ahead."""
    async def main() -> None:
        async with running(tiny_bundle, max_wait_s=0.002) as sched:
            pid, first = await running_batch(sched)
            sched.s_per_token = 1e-6  # the running batch "should have ended": only the rule holds
            later = [job([6], caller=c) for c in "de"]
            for j in later:
                sched.submit(j)
            await asyncio.sleep(0.5)
            assert sent(sched) == (1, 3)  # two wait, three run: nothing sent ahead
            last = job([7], caller="f")
            sched.submit(last)
            await until(lambda: sent(sched) == (2, 6), 10)  # three wait: they go ahead
            os.kill(pid, signal.SIGCONT)
            await asyncio.wait_for(asyncio.gather(*(j.future for j in [*first, *later, last])),
                                   10)
    asyncio.run(main())


def test_work_goes_ahead_of_a_batch_past_the_cohort_size(tiny_bundle) -> None:
    """A heavy batch keeps its pipeline: one request waiting goes ahead of it (after the max
    wait and the running batch's expected end) though the batch carries five."""
    async def main() -> None:
        async with running(tiny_bundle, max_wait_s=0.002) as sched:
            # five light callers (nothing heavy in flight: no express batch), 2,500 tokens
            pid, first = await running_batch(sched, "abcde", policy.EXPRESS_TOKENS - 12)
            assert 5 * (policy.EXPRESS_TOKENS - 12) > policy.COHORT_TOKENS
            sched.s_per_token = 1e-6
            lone = job([6], caller="f")
            sched.submit(lone)
            await until(lambda: sent(sched) == (2, 6), 10)
            os.kill(pid, signal.SIGCONT)
            await asyncio.wait_for(asyncio.gather(*(j.future for j in [*first, lone])), 20)
    asyncio.run(main())


def test_work_goes_ahead_of_a_small_batch_of_big_requests(tiny_bundle) -> None:
    """Two requests of 600 tokens in a batch of 1,200 (under the cohort size): past an express
    batch's size each, so no cohort: a third request waiting goes ahead of them."""
    async def main() -> None:
        async with running(tiny_bundle, max_wait_s=0.002) as sched:
            pid = sched.pool.pids()[0]
            os.kill(pid, signal.SIGSTOP)
            big = [job([300, 300], caller=c) for c in "ab"]
            for j in big:
                sched.submit(j)
            await until(lambda: sent(sched) == (1, 4))
            sched.s_per_token = 1e-6
            third = job([300, 300], caller="c")
            sched.submit(third)
            await until(lambda: sent(sched) == (2, 6), 10)
            os.kill(pid, signal.SIGCONT)
            await asyncio.wait_for(asyncio.gather(*(j.future for j in [*big, third])), 20)
    asyncio.run(main())


def test_an_idle_worker_does_not_wait_for_the_callers_of_a_batch_past_the_cohort_size(
        tiny_bundle) -> None:
    async def main() -> None:
        async with running(tiny_bundle, rejoin_s=60.0, rejoin_scale=1e6) as sched:
            pid, first = await running_batch(sched, "abcde", policy.EXPRESS_TOKENS - 12)
            os.kill(pid, signal.SIGCONT)
            await asyncio.wait_for(asyncio.gather(*(j.future for j in first)), 20)
            after = job([7], caller="f")  # 1 of 5 back: it goes at once all the same
            sched.submit(after)
            await asyncio.wait_for(after.future, 20)
    asyncio.run(main())


async def one_waits_behind_three(sched: Scheduler) -> tuple[Job, float]:
    """A batch of three one-text requests (callers a, b, c) on the stopped worker, a fourth
    (caller d) queued behind it, then the worker resumed: returns the fourth request and when
    the worker resumed (the batch ended after that), once the three are answered."""
    pid, first = await running_batch(sched)
    waiting = job([6], caller="d")
    sched.submit(waiting)
    resumed = time.monotonic()
    os.kill(pid, signal.SIGCONT)
    await asyncio.wait_for(asyncio.gather(*(j.future for j in first)), 10)
    return waiting, resumed


def test_an_idle_worker_waits_for_the_callers_of_the_batch_it_finished(tiny_bundle) -> None:
    async def main() -> None:
        async with running(tiny_bundle, rejoin_s=60.0, rejoin_scale=1e6) as sched:
            waiting, _ = await one_waits_behind_three(sched)
            back = [job([5], caller=c) for c in "abc"]
            sched.submit(back[0])
            sched.submit(back[1])
            await asyncio.sleep(0.5)
            assert sent(sched) == (1, 3)  # the worker is idle, but only 2 of 3 are back
            sched.submit(back[2])
            await until(lambda: sent(sched) == (2, 7), 10)  # all back: one batch of four
            await asyncio.wait_for(asyncio.gather(*(j.future for j in [waiting, *back])), 10)
    asyncio.run(main())


def test_an_idle_worker_waits_no_longer_than_the_rejoin_time(tiny_bundle) -> None:
    async def main() -> None:
        async with running(tiny_bundle, rejoin_s=0.3, rejoin_scale=1e6) as sched:
            waiting, resumed = await one_waits_behind_three(sched)
            await asyncio.wait_for(waiting.future, 10)  # nobody came back: it went alone
            assert sent(sched) == (2, 4)
            assert waiting.admitted + waiting.queue_ms / 1e3 >= resumed + 0.3
    asyncio.run(main())


def test_one_closed_loop_client_is_never_held(tiny_bundle) -> None:
    """Its next request is the one the worker waits for: it goes at once."""
    async def main() -> None:
        async with running(tiny_bundle, rejoin_s=60.0, rejoin_scale=1e6) as sched:
            for length in (5, 6, 7):
                j = job([length], caller="only")
                sched.submit(j)
                await asyncio.wait_for(j.future, 20)
            assert sent(sched) == (3, 3)
    asyncio.run(main())


def test_a_cohort_is_waited_for_no_longer_than_its_batch_took_per_request(tiny_bundle) -> None:
    """The tiny model's batch of three takes milliseconds: a request that waits after it goes
    about that soon, not after the 60 s bound."""
    async def main() -> None:
        async with running(tiny_bundle, rejoin_s=60.0) as sched:
            waiting, _ = await one_waits_behind_three(sched)
            await asyncio.wait_for(waiting.future, 20)  # nobody came back: it went alone
            assert sent(sched) == (2, 4)
    asyncio.run(main())
