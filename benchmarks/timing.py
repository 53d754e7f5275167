"""Repetition with warm-ups excluded, a time budget, and the statistics we quote."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def percentile(xs: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if len(xs) else None


def median(xs: Sequence[float]) -> float | None:
    return percentile(xs, 50)


def summary_ms(seconds: Sequence[float]) -> dict[str, Any]:
    ms = [s * 1e3 for s in seconds]
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90),
            "p99_ms": percentile(ms, 99), "mean_ms": float(np.mean(ms)) if ms else None}


def repeat(fn: Callable[[], Any], warmups: int, reps: int, budget_s: float) -> list[float]:
    """Seconds of each timed call of `fn`, after `warmups` untimed calls. Stops early once the
    timed calls have used `budget_s` (at least one timed call always runs)."""
    for _ in range(warmups):
        fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < reps and (not times or spent < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        spent += times[-1]
        if times and spent + times[-1] > budget_s * 1.25:
            break  # the next repetition would overrun the budget by far
    return times


def timed_passes(calls: Sequence[Callable[[], Any]], warm_passes: int, reps: int,
                 budget_s: float) -> list[list[float]]:
    """Per-call seconds of each timed pass over `calls` (same budget rule as `repeat`)."""
    for _ in range(warm_passes):
        for c in calls:
            c()
    passes: list[list[float]] = []

    def one_pass() -> None:
        times = []
        for c in calls:
            t = time.perf_counter()
            c()
            times.append(time.perf_counter() - t)
        passes.append(times)

    repeat(one_pass, 0, reps, budget_s)
    return passes
