"""The scheduling policy: every threshold that decides when a request runs, with its reason,
and the rules as pure functions (no I/O, no clock), so each is unit-tested on its own.

Both ends of the worker pipe use it: the frontend's dispatcher (service/scheduler.py) decides
which batch goes to which worker slot; the worker (workers/process/main.py) decides which of the
batches it holds to advance next. It lives here, below both, so no module imports upward.

The rules, in one picture:
- Batches are cut by real tokens (MAX_BATCH_TOKENS); a busy worker's second slot takes a batch
  once one is full, or once the oldest input has waited MAX_WAIT_MS and the worker's running
  batch is expected to end within AHEAD_LEAD_S (`ahead_wait`): what arrives while a batch
  runs joins the next one instead of being cut into small batches (many small clients).
- A caller is *light* while its tokens waiting and in flight together are at most
  EXPRESS_TOKENS (many one-text requests on one connection; not one client's burst). Light
  callers' inputs never ride in a heavy caller's batch: while heavy work is in flight or waits,
  they go in express batches of their own (at most EXPRESS_TOKENS, lightest callers first),
  for which a worker holding at least HEAVY_TOKENS keeps EXPRESS_SLOTS extra slots. When every
  caller is light (many small clients), there is nothing to overtake: batches are formed as
  usual, as large as what waits, so many small clients get the machine's throughput.
- In a worker, a batch at most 1/OVERTAKE_RATIO of the oldest one runs first (between session
  calls of the larger), up to the oldest's own token count in all: a light request does not
  wait for a heavy batch to end, and a heavy batch's delay is bounded by its own size.
- A batch sent ahead to a busy worker takes what waits with one worker, 1/(2N) of it with N
  (`ahead_parts`): a burst is neither cut small nor piled onto one worker while others idle.
- Callers come back (`holds_back`, `rejoin_wait`): closed-loop clients send their next request
  as soon as their answer arrives. While fewer requests wait than the running batch carries,
  nothing is sent ahead; a worker that has just finished a batch of n requests waits up to
  REJOIN_S for n new ones before it starts a smaller batch (`cohort`: small requests in a
  batch of at most COHORT_TOKENS).
  Otherwise a lone request that found the worker idle splits many small clients into two
  groups for good (a batch of 1 and one of 7 at 8 clients), each paying a batch's fixed cost.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence
from typing import Protocol

# Defaults of the serve flags --max-batch-tokens and --max-wait-ms. 8192 real tokens: batches
# of a few thousand tokens are compute-bound (~226 MFLOP a token), so larger ones gain nothing;
# 2 ms: long enough to gather a burst's requests, short against one text's ~40 ms.
MAX_BATCH_TOKENS = 8192
MAX_WAIT_MS = 2.0
# Batches a worker holds: one running, one waiting in its pipe (no idle gap between batches).
MAX_IN_FLIGHT = 2
# A batch sent ahead leaves this long before the running batch is expected to end: its pipe
# transfer and unpacking take ~1 ms, and the estimate (the last batches' time per token) errs.
# Sent too late costs the worker that gap once; its end wakes the dispatcher anyway.
AHEAD_LEAD_S = 0.005
# How long a worker that has just finished a batch waits at most for its callers' next
# requests (and never longer than that batch took per request: `rejoin_wait`). 8 closed-loop
# clients are all back 5-8 ms after their answers, 32 in 10-25 ms (the frontend answers and
# admits them one by one, ~0.6 ms of its CPU each, on 2 busy cores). A batch run without them
# costs its fixed part again, ~20 ms on the full-size model (one short text ~37 ms, each more
# ~16 ms), so waiting longer than that cannot pay.
REJOIN_S = 0.020
# A cohort is a batch of at most this many real tokens whose requests are each at most
# EXPRESS_TOKENS: only such callers are waited for. Past it a split costs ~1% (a batch takes ~2 s
# on the full-size model) while holding work back would leave gaps between heavy batches; and
# no caller waits for heavy callers (a big request's last small batch) to come back.
COHORT_TOKENS = 2048
# An express batch: a light caller's work (a chunk's worth: the runtime's dense segments take
# 512 real tokens a call), and the slots kept for it beside heavy work.
EXPRESS_TOKENS = 512
EXPRESS_SLOTS = 1
# Work a worker must hold before an express slot opens: an express batch overtakes it
# (HEAVY_TOKENS / OVERTAKE_RATIO = EXPRESS_TOKENS), so smaller work simply queues.
HEAVY_TOKENS = 2048
# A later batch runs before the oldest only if at most this fraction of its size: batches of
# similar size keep their order (shortest-first let a stream of small batches starve one).
OVERTAKE_RATIO = 4


class Held(Protocol):
    """A batch a worker holds, as the order rule sees it."""

    tokens: int  # real tokens
    yielded: int  # tokens of later batches let through ahead of it
    overtook: bool  # already counted in the batch it overtook


def next_to_step(held: Sequence[Held]) -> Held:
    """The batch a worker advances next: the oldest, or the smallest of the later ones that are
    at most 1/OVERTAKE_RATIO of it, while the oldest has let through fewer tokens than its own.
    Counts the overtaking (mutates `yielded` and `overtook`)."""
    oldest = held[0]
    small = [r for r in held[1:] if r.tokens * OVERTAKE_RATIO <= oldest.tokens
             and (r.overtook or oldest.yielded + r.tokens <= oldest.tokens)]
    if not small:
        return oldest
    task = min(small, key=lambda r: r.tokens)
    if not task.overtook:
        task.overtook = True
        oldest.yielded += task.tokens
    return task


def light_callers(waiting: Mapping[Hashable, int],
                  in_flight: Mapping[Hashable, int]) -> set[Hashable]:
    """Callers with tokens waiting whose tokens waiting and in flight together are at most
    EXPRESS_TOKENS."""
    return {c for c, tokens in waiting.items()
            if in_flight.get(c, 0) + tokens <= EXPRESS_TOKENS}


def is_express(light: Collection[Hashable], callers_waiting: int, worker_busy: bool,
               heavy_in_flight: bool = True) -> bool:
    """Whether the next batch is an express one (light callers' inputs only): while heavy
    callers wait too (light inputs never ride in a heavy caller's batch), and to a busy worker
    while a heavy caller has work in flight (the express batch overtakes it). Light callers
    beside nothing heavy are batched as usual."""
    return bool(light) and (len(light) < callers_waiting or (worker_busy and heavy_in_flight))


def heavy_in_flight(in_flight: Mapping[Hashable, int]) -> bool:
    """A caller has more than an express batch's tokens in flight."""
    return any(tokens > EXPRESS_TOKENS for tokens in in_flight.values())


def slots(worker_tokens: int, express: bool) -> int:
    """The batches a worker holding `worker_tokens` may hold, for an express batch or not."""
    heavy = express and worker_tokens >= HEAVY_TOKENS
    return MAX_IN_FLIGHT + (EXPRESS_SLOTS if heavy else 0)


def ahead_wait(oldest_age_s: float, max_wait_s: float, running_ends_in_s: float | None) -> float:
    """Seconds a non-express batch for a busy worker still waits (<= 0: send it now): until the
    oldest input has waited max_wait_s and, where the running batch's end can be estimated,
    until AHEAD_LEAD_S before it."""
    wait = max_wait_s - oldest_age_s
    if running_ends_in_s is not None:
        wait = max(wait, running_ends_in_s - AHEAD_LEAD_S)
    return wait


def cohort(request_tokens: Collection[int], batch_tokens: int) -> int:
    """The requests of a batch whose callers are waited for (`holds_back`, `rejoin_wait`): all
    of them if the batch has at most COHORT_TOKENS and each request (its tokens in all, this
    batch or not) at most EXPRESS_TOKENS; else none (0)."""
    if batch_tokens > COHORT_TOKENS or any(t > EXPRESS_TOKENS for t in request_tokens):
        return 0
    return len(request_tokens)


def holds_back(waiting_requests: int, running_cohort: int) -> bool:
    """Whether a (non-express) batch for a busy worker waits for the running batch to end
    instead of going ahead of it: while fewer requests wait than the running batch's cohort,
    whose callers, back soon after it ends, should ride with them."""
    return waiting_requests < running_cohort


def rejoin_wait(arrived: int, finished_cohort: int, since_end_s: float, finished_s: float,
                rejoin_s: float = REJOIN_S) -> float:
    """Seconds an idle worker still waits before it takes a (non-express) batch (<= 0: now):
    until as many requests have arrived since it finished its last batch as that batch's
    cohort, at most its compute time per request of the cohort (`finished_s` / cohort: what
    a request costs there, so what running one apart could cost at most) and at most
    `rejoin_s` after its end. One closed-loop client is never held: its next request is the
    one that arrives; and a fast model's small batches are hardly waited for."""
    if arrived >= finished_cohort:
        return 0.0
    return min(rejoin_s, finished_s / finished_cohort) - since_end_s


def ahead_parts(workers: int) -> int:
    """Into how many parts a batch sent ahead cuts what waits: one worker takes all of it (big
    batches run fastest); with more, each takes 1/(2N), so no worker is left idle while another
    still has a large batch of the same burst to run."""
    return 1 if workers <= 1 else 2 * workers


def budget(worker_busy: bool, express: bool, queued_tokens: int, workers: int,
           max_batch_tokens: int = MAX_BATCH_TOKENS) -> int:
    """The real tokens the next batch may take: a full batch for an idle worker; for a busy
    one an express batch, or its part of what waits, never past max_batch_tokens."""
    if not worker_busy:
        return max_batch_tokens
    if express:
        return min(EXPRESS_TOKENS, max_batch_tokens)
    part = max(EXPRESS_TOKENS, -(-queued_tokens // ahead_parts(workers)))
    return min(part, max_batch_tokens)
