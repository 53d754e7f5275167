"""The request queue on plain data: the real-token budget, the bound and its fair shares,
turns between callers, cancellation, deadlines, and the packed message a batch becomes."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from moe_embed.service.batching import BatchQueue, Job
from moe_embed.service.errors import Code, EngineError


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _job(loop, lengths: list[int], caller: str = "a", admitted: float = 0.0,
         deadline: float | None = None, dims: int = 64) -> Job:
    ids = [np.arange(n, dtype=np.int32) for n in lengths]
    return Job(ids, dims, True, caller, loop.create_future(), admitted, deadline)


def test_oldest_input_always_goes_even_over_budget(loop) -> None:
    q = BatchQueue(max_batch_tokens=512, max_queue=100)
    q.admit(_job(loop, [600], "a", admitted=0.0))
    q.admit(_job(loop, [10, 10], "b", admitted=1.0))
    batch = q.take(now=2.0)
    assert [it.length for it in batch.items] == [600]
    assert [it.length for it in q.take(now=2.0).items] == [10, 10]


def test_batch_respects_the_real_token_budget(loop) -> None:
    rng = random.Random(0)
    for _ in range(100):
        budget = rng.choice([512, 2048, 8192])
        q = BatchQueue(budget, max_queue=10_000)
        jobs = []
        for t in range(rng.randint(1, 30)):
            job = _job(loop, [rng.randint(1, 512) for _ in range(rng.randint(1, 8))],
                       caller=rng.choice("abcd"), admitted=float(t))
            q.admit(job)
            jobs.append(job)
        oldest = min((j for j in jobs), key=lambda j: j.admitted)
        batch = q.take(now=100.0)
        assert oldest in {it.job for it in batch.items}
        if len(batch.items) > 1:
            assert batch.tokens <= budget
        while (batch := q.take(now=100.0)) is not None:
            assert len(batch.items) == 1 or batch.tokens <= budget
        assert q.waiting == 0 and q.queued_tokens == 0


def test_fills_the_budget_when_enough_waits(loop) -> None:
    q = BatchQueue(8192, max_queue=1000)
    for i in range(4):
        q.admit(_job(loop, [64] * 50, caller=str(i), admitted=float(i)))
    assert len(q.take(now=5.0).items) == 128


def test_a_light_caller_rides_in_the_next_batch(loop) -> None:
    """Callers take turns: the heavy caller queued first, yet the light caller's input is in
    the very next batch."""
    q = BatchQueue(max_batch_tokens=100, max_queue=1000)
    heavy = [_job(loop, [10] * 10, "heavy", admitted=float(i)) for i in range(5)]
    for job in heavy:
        q.admit(job)
    light = _job(loop, [10], "light", admitted=10.0)
    q.admit(light)
    batch = q.take(now=11.0)
    assert light in {it.job for it in batch.items}
    assert sum(it.job is not light for it in batch.items) == 9


def test_queue_bound_refuses_at_once_with_resource_exhausted(loop) -> None:
    q = BatchQueue(8192, max_queue=5)
    q.admit(_job(loop, [3, 3, 3], "a"))
    with pytest.raises(EngineError) as exc:
        q.admit(_job(loop, [3, 3, 3], "b"))
    assert exc.value.code == Code.QUEUE_FULL
    assert "max_queue 5" in exc.value.message and "queue full" in exc.value.message
    assert q.waiting == 3


def test_one_caller_cannot_take_the_whole_queue(loop) -> None:
    """A caller with inputs waiting may hold max_queue / (k + 1): there is always room for
    one more caller."""
    q = BatchQueue(8192, max_queue=12)
    q.admit(_job(loop, [3] * 4, "heavy"))
    with pytest.raises(EngineError, match="fair share 6 of max_queue 12"):
        q.admit(_job(loop, [3] * 4, "heavy"))
    q.admit(_job(loop, [3] * 2, "heavy"))  # 6: its share while alone
    q.admit(_job(loop, [3] * 2, "light"))  # a newcomer gets in
    with pytest.raises(EngineError, match="fair share 4"):  # 2 callers: 12 // 3
        q.admit(_job(loop, [3], "heavy"))
    q.admit(_job(loop, [3] * 2, "light"))
    assert q.waiting == 10


def test_inputs_being_tokenized_hold_their_room(loop) -> None:
    """Room is taken before tokenizing: inputs being tokenized count against max_queue and the
    caller's share, so a flood is refused before its requests pile up at the tokenizer; the
    room comes back on release, and admitting then takes exactly what was released."""
    q = BatchQueue(8192, max_queue=12)
    q.reserve("heavy", 6)  # its share while alone (12 // 2)
    assert q.tokenizing == 6 and q.waiting == 0
    with pytest.raises(EngineError, match="fair share 6 of max_queue 12"):
        q.reserve("heavy", 1)  # what it is tokenizing counts as held
    q.reserve("light", 4)  # a newcomer still gets in: 2 holders, share 12 // 3
    with pytest.raises(EngineError, match=r"6 inputs waiting or being tokenized \+ 1 asked"):
        q.check("heavy", 1)
    with pytest.raises(EngineError, match=r"0 inputs waiting \+ 10 being tokenized \+ 3 asked"):
        q.check("third", 3)  # the total: 10 held + 3 > 12
    q.check("third", 2)  # the limit itself fits
    q.release("heavy", 6)
    q.admit(_job(loop, [3] * 6, "heavy"))  # released, then admitted: the same room
    assert q.tokenizing == 4 and q.waiting == 6
    q.release("light", 4)
    assert q.tokenizing == 0 and q.share("light") == 12 // 3
    q.admit(_job(loop, [3] * 4, "light"))
    assert q.waiting == 10


def test_cancelled_request_is_dropped_and_counted(loop) -> None:
    q = BatchQueue(8192, max_queue=100)
    keep, cancel = _job(loop, [4, 5], "a"), _job(loop, [6, 7, 8], "a")
    q.admit(keep)
    q.admit(cancel)
    assert q.cancel(cancel) == 3 and q.cancel(cancel) == 0
    assert q.waiting == 2 and q.dropped == 3 and q.queued_tokens == 9
    batch = q.take(now=1.0)
    assert [it.job for it in batch.items] == [keep, keep]
    assert q.take(now=1.0) is None


def test_expired_requests_are_found_by_deadline(loop) -> None:
    q = BatchQueue(8192, max_queue=100)
    late, later, none = (_job(loop, [4], "a", deadline=1.0), _job(loop, [4], "b", deadline=5.0),
                         _job(loop, [4], "c"))
    for job in (later, late, none):
        q.admit(job)
    assert q.next_deadline() == 1.0
    assert q.expired(now=2.0) == [late]
    q.cancel(late)
    assert q.next_deadline() == 5.0 and q.expired(now=2.0) == []


def test_results_fill_jobs_in_input_order(loop) -> None:
    job = _job(loop, [3, 9, 1], dims=2)
    q = BatchQueue(8192, max_queue=100)
    q.admit(job)
    batch = q.take(now=1.0)
    msg = batch.message()
    assert msg.offsets.tolist() == [0, 3, 12, 13] and msg.dims.tolist() == [2, 2, 2]
    assert msg.ids.tolist() == [0, 1, 2, *range(9), 0]
    for it in reversed(batch.items):
        job.deliver(it.index, np.full(2, it.length, np.float32), 1.5)
    loop.run_until_complete(job.future)
    assert [v[0] for v in job.vectors] == [3, 9, 1]
