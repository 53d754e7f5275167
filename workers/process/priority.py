"""Workers yield the cores to the frontend: their threads run a few nice steps below it.

Why: on a machine the workers keep busy, each step of a light call in the frontend (gRPC's
poller, the event loop, the pipe reader) is a thread that wakes up and waits for a core a
worker holds. At equal niceness the frontend's few threads get a core only at the workers'
pace; a few steps below, the workers still get every core the frontend does not use (nice
changes shares under contention, never caps), and the frontend's turns come sooner. The
10-minute soak's light calls measured this (benchmarks/README.md).

Nice is per thread on Linux and inherited by threads and processes started afterwards, so a
worker lowers every thread it has at start (imports may have started some), before ONNX
Runtime's pool starts; the loader does it once and the workers it forks inherit it.
"""

from __future__ import annotations

import os

MAX_NICE = 19


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: this thread only
        return [0]


def lower_priority(steps: int) -> int | None:
    """Add `steps` (>= 0) to the niceness of every thread of this process, up to MAX_NICE; the
    main thread's niceness after it, or None where it cannot be changed."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, not {steps}")
    if not hasattr(os, "setpriority"):
        return None
    try:
        for tid in _threads():
            try:
                now = os.getpriority(os.PRIO_PROCESS, tid)
                os.setpriority(os.PRIO_PROCESS, tid, min(MAX_NICE, now + steps))
            except ProcessLookupError:
                continue  # the thread has ended
        return os.getpriority(os.PRIO_PROCESS, 0)
    except OSError:
        return None
