"""The scheduling policy's rules as pure functions (workers/process/policy.py), each at its
threshold and one past it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from moe_embed.workers.process import policy
from moe_embed.workers.process.policy import (
    COHORT_TOKENS,
    EXPRESS_SLOTS,
    EXPRESS_TOKENS,
    HEAVY_TOKENS,
    MAX_IN_FLIGHT,
    OVERTAKE_RATIO,
)


def held(tokens: int) -> SimpleNamespace:
    return SimpleNamespace(tokens=tokens, yielded=0, overtook=False)


def test_a_later_batch_overtakes_at_exactly_the_ratio_and_not_one_token_past_it() -> None:
    oldest = held(OVERTAKE_RATIO * 100)
    at = held(100)
    assert policy.next_to_step([oldest, at]) is at
    oldest, past = held(OVERTAKE_RATIO * 100), held(101)
    assert policy.next_to_step([oldest, past]) is oldest


def test_the_smallest_of_the_far_smaller_batches_goes_first_and_is_counted_once() -> None:
    oldest, a, b = held(1000), held(200), held(100)
    assert policy.next_to_step([oldest, a, b]) is b
    assert (oldest.yielded, b.overtook) == (100, True)
    assert policy.next_to_step([oldest, a, b]) is b  # its next step is not counted again
    assert oldest.yielded == 100


def test_the_oldest_lets_through_at_most_its_own_tokens() -> None:
    oldest = held(1000)
    lights = [held(250) for _ in range(5)]
    ahead = [policy.next_to_step([oldest, light]) is light for light in lights]
    assert ahead == [True, True, True, True, False]  # 4 x 250 = its 1000 tokens, then no more
    assert oldest.yielded == 1000


def test_light_callers_at_the_express_size_and_one_past_it() -> None:
    waiting = {"at": EXPRESS_TOKENS - 10, "past": EXPRESS_TOKENS - 10, "alone": EXPRESS_TOKENS}
    in_flight = {"at": 10, "past": 11}
    assert policy.light_callers(waiting, in_flight) == {"at", "alone"}
    assert policy.light_callers({"big": EXPRESS_TOKENS + 1}, {}) == set()


def test_express_only_beside_heavy_work_and_never_mixes_a_light_caller_into_a_heavy_batch(
        ) -> None:
    assert not policy.is_express(set(), 3, worker_busy=True)  # nobody light
    assert policy.is_express({"a"}, 1, worker_busy=True)  # beside a heavy batch in flight
    assert not policy.is_express({"a", "b"}, 2, worker_busy=False)  # idle, all light: normal
    assert policy.is_express({"a"}, 2, worker_busy=False)  # idle, but a heavy caller waits
    assert policy.is_express({"a"}, 2, worker_busy=True, heavy_in_flight=False)  # it waits
    # many small clients and nothing heavy anywhere: batched as usual, nothing to overtake
    assert not policy.is_express({"a", "b"}, 2, worker_busy=True, heavy_in_flight=False)


def test_heavy_in_flight_past_an_express_batchs_tokens() -> None:
    assert not policy.heavy_in_flight({})
    assert not policy.heavy_in_flight({"a": EXPRESS_TOKENS, "b": 3})
    assert policy.heavy_in_flight({"a": EXPRESS_TOKENS + 1, "b": 3})


def test_an_express_slot_opens_at_the_heavy_threshold_and_not_below() -> None:
    assert policy.slots(HEAVY_TOKENS, express=True) == MAX_IN_FLIGHT + EXPRESS_SLOTS
    assert policy.slots(HEAVY_TOKENS - 1, express=True) == MAX_IN_FLIGHT
    assert policy.slots(HEAVY_TOKENS * 10, express=False) == MAX_IN_FLIGHT


def test_budgets_idle_express_and_sent_ahead() -> None:
    assert policy.budget(False, False, 10_000, 2) == 8192  # idle: a full batch
    assert policy.budget(False, True, 10_000, 2, max_batch_tokens=1000) == 1000
    assert policy.budget(True, True, 10_000, 2) == EXPRESS_TOKENS
    assert policy.budget(True, False, 8000, 1) == 8000  # one worker takes all that waits...
    assert policy.budget(True, False, 8192, 1) == 8192
    assert policy.budget(True, False, 8193, 1) == 8192  # ...up to a full batch, never past it
    assert policy.budget(True, True, 10_000, 1, max_batch_tokens=256) == 256
    assert policy.budget(True, False, 10_000, 2) == 2500  # 1/(2N)
    assert policy.budget(True, False, 10_001, 2) == 2501  # rounded up: nothing left behind
    assert policy.budget(True, False, 100, 2) == EXPRESS_TOKENS  # never below an express batch
    assert [policy.ahead_parts(n) for n in (0, 1, 2, 3)] == [1, 1, 4, 6]


def test_the_overtaking_budget_adds_tokens_up_to_the_oldests_own() -> None:
    oldest = held(1000)
    lights = [held(200) for _ in range(6)]
    ahead = [policy.next_to_step([oldest, light]) is light for light in lights]
    assert ahead == [True] * 5 + [False]  # 5 x 200 = 1000 exactly, the 6th would pass it


def test_an_express_slot_opens_one_token_past_the_threshold_too() -> None:
    assert policy.slots(HEAVY_TOKENS + 1, express=True) == MAX_IN_FLIGHT + EXPRESS_SLOTS


def test_the_thresholds_keep_their_stated_relations() -> None:
    """An express batch is one dense-segment chunk's worth, and exactly the size that may
    overtake the smallest heavy work."""
    from moe_embed.workers.runtime.chunks import CHUNK_TOKENS

    assert EXPRESS_TOKENS == CHUNK_TOKENS
    assert HEAVY_TOKENS == EXPRESS_TOKENS * OVERTAKE_RATIO


def test_a_batch_sent_ahead_waits_for_the_max_wait_and_for_the_running_batchs_end() -> None:
    lead = policy.AHEAD_LEAD_S
    # no estimate yet: the max wait alone
    assert policy.ahead_wait(0.0005, 0.002, None) == pytest.approx(0.0015)
    # the running batch ends in 0.5 s: it waits until the lead before that end
    assert policy.ahead_wait(0.0005, 0.002, 0.5) == pytest.approx(0.5 - lead)
    # the running batch is about to end: the max wait still holds
    assert policy.ahead_wait(0.0, 0.002, lead) == pytest.approx(0.002)
    # past both: send it now
    assert policy.ahead_wait(0.003, 0.002, lead) <= 0
    assert policy.ahead_wait(0.003, 0.002, lead + 0.001) == pytest.approx(0.001)


def test_the_documented_defaults() -> None:
    """README's serve flags table: --max-batch-tokens 8192, --max-wait-ms 2; a worker holds one
    batch running and one waiting in its pipe, plus one express slot beside heavy work; a batch
    sent ahead leaves 5 ms before the running one is expected to end; an idle worker waits at
    most 20 ms for the callers of the batch it has just finished."""
    assert (policy.MAX_BATCH_TOKENS, policy.MAX_WAIT_MS) == (8192, 2.0)
    assert policy.REJOIN_S == pytest.approx(0.020)
    assert COHORT_TOKENS == 2048
    assert policy.slots(0, express=False) == 2
    assert policy.slots(HEAVY_TOKENS, express=False) == 2
    assert policy.slots(HEAVY_TOKENS, express=True) == 3
    assert policy.ahead_wait(0.0, 0.002, 0.5) == pytest.approx(0.495)
    assert policy.ahead_wait(0.0, 0.002, 0.006) == pytest.approx(0.002)
    assert policy.ahead_wait(0.0, 0.0, 0.006) == pytest.approx(0.001)


def test_a_caller_well_under_the_express_size_is_light() -> None:
    assert policy.light_callers({"one": 1, "some": 100}, {"some": 11}) == {"one", "some"}


def test_hundreds_of_small_clients_and_nothing_heavy_are_batched_as_usual() -> None:
    """Every one of 300 callers light (past 256, where Python's small ints are no longer shared
    objects): nothing heavy waits, so no express batch."""
    light = {f"c{i}" for i in range(300)}
    assert not policy.is_express(light, len(light), worker_busy=False)
    assert policy.is_express(light, len(light) + 1, worker_busy=False)  # one heavy waits too


def test_a_cohort_is_small_requests_in_a_batch_up_to_the_cohort_size() -> None:
    assert policy.cohort([18] * 8, 8 * 18) == 8  # eight short queries
    assert policy.cohort([EXPRESS_TOKENS] * 4, COHORT_TOKENS) == 4  # at both limits
    assert policy.cohort([EXPRESS_TOKENS] * 4 + [1], COHORT_TOKENS + 1) == 0  # one token past
    assert policy.cohort([18, EXPRESS_TOKENS + 1], 100) == 0  # a big request's last part
    assert policy.cohort([], 0) == 0


def test_nothing_goes_ahead_while_fewer_requests_wait_than_the_running_cohort() -> None:
    assert policy.holds_back(waiting_requests=7, running_cohort=8)
    assert not policy.holds_back(waiting_requests=8, running_cohort=8)
    assert not policy.holds_back(1, 1)  # one caller's stream
    assert policy.holds_back(0, 1)
    assert not policy.holds_back(0, 0)  # no cohort: heavy work keeps its pipeline


def test_an_idle_worker_waits_for_as_many_requests_as_its_last_cohort() -> None:
    rejoin, took = policy.REJOIN_S, 0.200  # 25 ms a request: REJOIN_S is the bound
    # one of eight back just after the end: it waits out the rest of REJOIN_S
    assert policy.rejoin_wait(7, 8, 0.001, took) == pytest.approx(rejoin - 0.001)
    assert policy.rejoin_wait(8, 8, 0.001, took) <= 0  # all eight back: now
    assert policy.rejoin_wait(9, 8, 0.0, took) <= 0
    assert policy.rejoin_wait(7, 8, rejoin, took) <= 0  # never past REJOIN_S
    assert policy.rejoin_wait(7, 8, rejoin - 0.001, took) == pytest.approx(0.001)
    # one closed-loop client: its own next request is the one it waits for, so never held
    assert policy.rejoin_wait(1, 1, 0.0, took) <= 0
    assert policy.rejoin_wait(0, 0, 0.0, took) <= 0  # no cohort: nobody is waited for
    assert policy.rejoin_wait(0, 3, 0.0, 60.0, rejoin_s=0.5) == pytest.approx(0.5)


def test_a_cohort_is_waited_for_no_longer_than_it_took_per_request() -> None:
    """A fast model's batch of 6 light requests took 3 ms: 0.5 ms each is all it waits."""
    assert policy.rejoin_wait(0, 6, 0.0, 0.003) == pytest.approx(0.0005)
    assert policy.rejoin_wait(0, 6, 0.0005, 0.003) <= 0
    assert policy.rejoin_wait(0, 8, 0.0, 8 * policy.REJOIN_S) == pytest.approx(policy.REJOIN_S)
    assert policy.rejoin_wait(0, 8, 0.0, 8 * policy.REJOIN_S - 0.008) == pytest.approx(
        policy.REJOIN_S - 0.001)
