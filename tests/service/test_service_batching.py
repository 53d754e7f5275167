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


def _callers(batch) -> list[str]:
    return [it.job.caller for it in batch.items]


def test_lightest_first_serves_the_callers_with_fewest_inputs_first(loop) -> None:
    """An express batch: callers by how few inputs they have waiting (then by age), not from
    the oldest input."""
    q = BatchQueue(max_batch_tokens=20, max_queue=100)
    q.admit(_job(loop, [10, 10, 10], "many", admitted=0.0))
    q.admit(_job(loop, [10], "late", admitted=2.0))
    q.admit(_job(loop, [10], "early", admitted=1.0))
    assert _callers(q.take(now=3.0, lightest_first=True)) == ["early", "late"]
    assert _callers(q.take(now=3.0, lightest_first=True)) == ["many", "many"]


def test_the_oldest_input_leads_then_callers_take_turns(loop) -> None:
    q = BatchQueue(max_batch_tokens=40, max_queue=100)
    q.admit(_job(loop, [10, 10], "a", admitted=1.0))
    q.admit(_job(loop, [10, 10], "b", admitted=0.0))  # the oldest input, queued second
    q.admit(_job(loop, [10, 10], "c", admitted=2.0))
    assert _callers(q.take(now=3.0)) == ["b", "c", "a", "b"]
    # served callers go to the back of the turn: c, then a (b has nothing left)
    assert q.callers_waiting() == ["c", "a"]


def test_only_the_named_callers_inputs_go_in_an_express_batch(loop) -> None:
    q = BatchQueue(max_batch_tokens=1000, max_queue=100)
    q.admit(_job(loop, [10, 10], "heavy", admitted=0.0))
    q.admit(_job(loop, [10], "light", admitted=1.0))
    assert q.take(now=2.0, only=set()) is None
    assert q.take(now=2.0, only={"nobody"}) is None
    assert _callers(q.take(now=2.0, only={"light"})) == ["light"]
    assert q.tokens_waiting("heavy") == 20 and q.waiting == 2
    assert _callers(q.take(now=2.0)) == ["heavy", "heavy"]


def test_every_count_is_back_to_zero_when_the_work_is_taken(loop) -> None:
    q = BatchQueue(max_batch_tokens=100, max_queue=100)
    assert (q.oldest(), q.callers_waiting(), q.jobs(), q.full(1)) == (None, [], [], False)
    a, b = _job(loop, [30, 40], "a", admitted=5.0), _job(loop, [50], "b", admitted=3.0)
    q.admit(a)
    q.admit(b)
    assert q.oldest() == 3.0 and q.callers_waiting() == ["a", "b"]
    assert {id(j) for j in q.jobs()} == {id(a), id(b)} and len(q.jobs()) == 2
    assert (q.tokens_waiting("a"), q.tokens_waiting("b"), q.tokens_waiting("c")) == (70, 50, 0)
    assert (q.queued_tokens, q.waiting, a.queued, b.queued) == (120, 3, 2, 1)
    assert q.full() and q.full(120) and not q.full(121)  # at the budget and one past it
    while q.take(now=6.0) is not None:
        pass
    assert (q.queued_tokens, q.waiting, a.queued, b.queued) == (0, 0, 0, 0)
    assert (q.tokens_waiting("a"), q.tokens_waiting("b")) == (0, 0)
    assert (q.oldest(), q.callers_waiting(), q.jobs(), q.full(1)) == (None, [], [], False)
    assert q.share("a") == 100 // 2  # nobody holds anything: the share of a newcomer


def test_a_cancelled_callers_last_inputs_leave_no_trace(loop) -> None:
    q = BatchQueue(max_batch_tokens=100, max_queue=100)
    job = _job(loop, [5, 6], "a")
    q.admit(job)
    assert q.cancel(job) == 2
    assert (q.waiting, q.queued_tokens, q.tokens_waiting("a"), q.callers_waiting()) == \
        (0, 0, 0, [])
    assert q.take(now=1.0) is None and q.share("a") == 50


def test_released_room_is_given_back_per_caller(loop) -> None:
    q = BatchQueue(8192, max_queue=12)
    q.reserve("a", 2)
    q.reserve("a", 3)
    q.reserve("b", 1)
    assert q.share("c") == 12 // 4  # a and b hold room, c would be the third
    q.release("a", 3)
    assert q.tokenizing == 3 and q.share("a") == 12 // 3
    q.release("a", 2)
    q.release("b", 1)
    assert q.tokenizing == 0 and q.share("c") == 12 // 2  # nobody holds room any more
    q.reserve("a", 6)  # the whole share of a lone caller again
    assert q.tokenizing == 6


def test_the_queue_bound_at_its_limit_and_one_past_it(loop) -> None:
    q = BatchQueue(8192, max_queue=6)
    q.admit(_job(loop, [1] * 3, "a"))
    q.check("b", 3)  # 3 + 3 = 6: at the bound
    with pytest.raises(EngineError, match="max_queue 6"):
        q.check("b", 4)
    q.admit(_job(loop, [1] * 3, "b"))
    assert q.waiting == 6


def test_a_batch_without_its_finished_requests(loop) -> None:
    q = BatchQueue(max_batch_tokens=1000, max_queue=100)
    a, b = _job(loop, [3, 4], "a"), _job(loop, [5], "b")
    q.admit(a)
    q.admit(b)
    batch = q.take(now=1.0)
    assert batch.attempts == 0  # fresh from the queue: sent to no worker yet
    batch.attempts = 2
    assert batch.requests() == 2 and batch.tokens == 12
    assert batch.live() is batch  # nothing finished: the batch itself
    a.future.set_result(None)
    kept = batch.live()
    assert [it.job for it in kept.items] == [b] and kept.tokens == 5
    assert (kept.batch_id, kept.attempts, kept.requests()) == (batch.batch_id, 2, 1)
    b.cancelled = True
    assert batch.live() is None


def test_batch_ids_are_new_for_every_batch(loop) -> None:
    q = BatchQueue(max_batch_tokens=5, max_queue=100)
    q.admit(_job(loop, [5, 5, 5], "a"))
    ids = [q.take(now=1.0).batch_id for _ in range(3)]
    assert len(set(ids)) == 3  # the key of its result in a worker's in-flight map


def test_a_job_takes_each_vector_once_and_nothing_after_it_is_done(loop) -> None:
    job = _job(loop, [3, 4], admitted=10.0, dims=2)
    assert (job.queue_ms, job.compute_ms, job.queued, job.remaining, job.vectors) == \
        (0.0, 0.0, 0, 2, [None, None])  # a new job: nothing waited, computed or queued
    job.dispatched(now=10.25)
    job.dispatched(now=10.1)  # a resend's earlier clock does not shorten the wait
    assert job.queue_ms == pytest.approx(250.0)
    job.deliver(0, np.ones(2, np.float32), 3.0)
    job.deliver(0, np.zeros(2, np.float32), 9.0)  # a duplicate (a batch resent): ignored
    assert job.remaining == 1 and job.vectors[0][0] == 1.0 and job.compute_ms == 3.0
    assert not job.future.done()
    job.deliver(1, np.ones(2, np.float32), 2.0)
    assert job.future.done() and job.remaining == 0 and job.compute_ms == 3.0
    quick = _job(loop, [3])
    quick.deliver(0, np.ones(2, np.float32), 0.25)  # under a millisecond, kept as it is
    assert quick.compute_ms == 0.25
    job.fail(EngineError(Code.INTERNAL, "late"))  # done: a late failure changes nothing
    assert job.future.exception() is None
    failed = _job(loop, [3])
    failed.fail(EngineError(Code.INTERNAL, "lost"))
    assert failed.future.exception().message == "lost"
    failed.deliver(0, np.ones(2, np.float32), 1.0)  # after it failed: ignored
    assert failed.remaining == 1
    cancelled = _job(loop, [3])
    cancelled.cancelled = True
    assert cancelled.done
    cancelled.deliver(0, np.ones(2, np.float32), 1.0)
    assert cancelled.remaining == 1 and not cancelled.future.done()


def test_each_input_keeps_its_own_options_in_the_message(loop) -> None:
    """Two requests that differ in dimensions and normalize share one batch: each input
    carries its own request's options to the worker."""
    q = BatchQueue(max_batch_tokens=1000, max_queue=100)
    a = Job([np.arange(2, dtype=np.int32)], 64, True, "a", loop.create_future(), 0.0)
    b = Job([np.arange(3, dtype=np.int32)] * 2, 256, False, "b", loop.create_future(), 0.0)
    q.admit(a)
    q.admit(b)
    msg = q.take(now=1.0).message()
    assert msg.dims.tolist() == [64, 256, 256] and msg.normalize.tolist() == [True, False, False]
    assert msg.offsets.tolist() == [0, 2, 5, 8] and len(msg) == 3


def test_a_request_cancelled_before_it_was_queued_drops_nothing(loop) -> None:
    q = BatchQueue(8192, max_queue=100)
    q.admit(_job(loop, [4], "a"))
    never = _job(loop, [5, 6], "a")
    assert q.cancel(never) == 0
    assert (q.waiting, q.queued_tokens, q.dropped, q.tokens_waiting("a")) == (1, 4, 0, 4)


def test_a_deadline_expires_at_its_instant(loop) -> None:
    q = BatchQueue(8192, max_queue=100)
    job = _job(loop, [4], "a", deadline=1.0)
    q.admit(job)
    assert q.expired(now=0.999) == []
    assert q.expired(now=1.0) == [job]


def test_a_request_whose_inputs_all_left_the_queue_has_no_deadline_here(loop) -> None:
    """Taken by a worker, it is the scheduler's to time out, not the queue's; one still waiting
    keeps its place whatever the others' state."""
    q = BatchQueue(max_batch_tokens=100, max_queue=100)
    sent = _job(loop, [4, 4], "b", admitted=0.0, deadline=5.0)
    q.admit(sent)
    q.take(now=0.5)
    assert sent.queued == 0 and not sent.done
    assert q.next_deadline() is None and q.expired(now=9.0) == []
    sent2 = _job(loop, [4], "c", admitted=1.0, deadline=5.0)
    q.admit(sent2)
    q.take(now=1.5)
    waiting = _job(loop, [4, 4], "a", admitted=2.0, deadline=1.0)
    q.admit(waiting)
    assert q.next_deadline() == 1.0  # the heap's last entry was sent: this one still waits
    assert q.expired(now=2.0) == [waiting]


def test_a_refusal_names_how_many_other_callers_wait(loop) -> None:
    q = BatchQueue(8192, max_queue=100)
    for caller in ("a", "b", "c", "d"):
        q.admit(_job(loop, [1], caller))
    with pytest.raises(EngineError, match=r"\(3 other callers waiting\)"):
        q.admit(_job(loop, [1] * 20, "a"))  # its share: 100 // 5 = 20, it holds 1


def test_inputs_waiting_and_being_tokenized_add_up(loop) -> None:
    """A caller holds what it has waiting plus what it is tokenizing (3 + 3, not 3)."""
    q = BatchQueue(8192, max_queue=12)
    q.admit(_job(loop, [1] * 3, "a"))
    q.reserve("a", 3)
    with pytest.raises(EngineError, match=r"has 6 inputs waiting or being tokenized \+ 1"):
        q.check("a", 1)  # its share alone: 12 // 2 = 6


def test_a_caller_still_tokenizing_one_input_still_holds_it(loop) -> None:
    q = BatchQueue(8192, max_queue=12)
    q.reserve("a", 3)
    q.release("a", 2)  # one input still being tokenized
    assert q.share("b") == 12 // 3  # a is still a holder: b would be the second
    with pytest.raises(EngineError, match=r"has 1 inputs waiting or being tokenized \+ 6"):
        q.check("a", 6)  # its share alone: 12 // 2 = 6


def test_callers_waiting_and_callers_only_tokenizing_are_all_holders(loop) -> None:
    q = BatchQueue(8192, max_queue=12)
    q.admit(_job(loop, [1], "waits"))
    q.reserve("tokenizes", 1)
    assert q.share("new") == 12 // 4  # two holders and the newcomer, plus one more's room


def test_a_request_cancelled_while_its_batch_is_out_leaves_that_batch(loop) -> None:
    q = BatchQueue(max_batch_tokens=1000, max_queue=100)
    a, b = _job(loop, [3], "a"), _job(loop, [4], "b")
    q.admit(a)
    q.admit(b)
    batch = q.take(now=1.0)
    assert q.cancel(a) == 0  # nothing of it was waiting any more
    assert a.done and a.cancelled
    assert [it.job for it in batch.live().items] == [b]


def test_the_oldest_input_is_a_callers_first(loop) -> None:
    q = BatchQueue(max_batch_tokens=10, max_queue=100)
    q.admit(_job(loop, [10], "x", admitted=0.0))
    q.admit(_job(loop, [10], "y", admitted=1.0))
    q.admit(_job(loop, [10], "y", admitted=2.0))
    q.admit(_job(loop, [10], "x", admitted=5.0))
    assert q.oldest() == 0.0
    # equally many inputs each: the caller whose first input is older goes first
    assert _callers(q.take(now=6.0, lightest_first=True)) == ["x"]
    assert q.oldest() == 1.0


def test_a_failed_request_waiting_in_the_queue_has_no_deadline_there(loop) -> None:
    q = BatchQueue(8192, max_queue=100)
    failed, waiting = _job(loop, [4], "a", deadline=1.0), _job(loop, [4], "b", deadline=5.0)
    q.admit(failed)
    q.admit(waiting)
    failed.fail(EngineError(Code.INTERNAL, "gone"))
    assert q.next_deadline() == 5.0 and q.expired(now=2.0) == []


def test_a_batch_of_hundreds_of_live_inputs_is_itself(loop) -> None:
    q = BatchQueue(max_batch_tokens=10_000, max_queue=1000)
    q.admit(_job(loop, [1] * 300, "a"))
    batch = q.take(now=1.0)
    assert len(batch.items) == 300 and batch.live() is batch


def test_requests_waiting_count_a_request_until_its_last_input_leaves(loop) -> None:
    """The scheduler's rejoin rules count requests, not inputs: a request split across
    batches still waits until its last input is taken; a cancelled one waits no more."""
    q = BatchQueue(max_batch_tokens=50, max_queue=100)
    a, b, c = _job(loop, [30, 30], "a"), _job(loop, [10], "b"), _job(loop, [5], "c")
    for j in (a, b, c):
        q.admit(j)
    assert (q.admitted, q.requests_waiting) == (3, 3)
    first = q.take(now=1.0)  # a's first input, then b's and c's (50 tokens): a still waits
    assert [it.job for it in first.items] == [a, b, c]
    assert (q.admitted, q.requests_waiting) == (3, 1)
    q.take(now=1.0)
    assert q.requests_waiting == 0
    d, e = _job(loop, [5, 5], "d"), _job(loop, [5], "e")
    q.admit(d)
    q.admit(e)
    assert (q.admitted, q.requests_waiting) == (5, 2)
    q.cancel(d)
    q.cancel(d)  # twice: counted once
    assert (q.admitted, q.requests_waiting) == (5, 1)
    q.cancel(a)  # nothing of it waits any more: no change
    assert q.requests_waiting == 1


def test_a_batch_with_part_of_a_big_request_is_no_cohort(loop) -> None:
    """policy.cohort sees each request's tokens in all: the last 100-token part of a request of
    700 tokens is still a big request's."""
    q = BatchQueue(max_batch_tokens=600, max_queue=100)
    big, small = _job(loop, [300, 300, 100], "big"), _job(loop, [20], "small")
    q.admit(big)
    q.admit(small)
    assert big.tokens == 700 and small.tokens == 20
    first = q.take(now=1.0)  # big's 300, small's 20, big's next 300 would pass 600: stops
    assert first.cohort() == 0
    rest = q.take(now=1.0)  # big's 300 and 100: only the big request
    assert rest.tokens == 400 and rest.cohort() == 0
    a, b = _job(loop, [20], "a"), _job(loop, [30], "b")
    q.admit(a)
    q.admit(b)
    assert q.take(now=2.0).cohort() == 2
