"""The frontend's heap, given back to the kernel once a flood's large messages are freed.

A 4 MB input or a 256-input Tokenize answer lives for a fraction of a second, but glibc's
malloc keeps what it freed: after the first large block is freed its mmap threshold grows (up
to 32 MB), so later large blocks come from the heaps, and free pages inside a heap stay
resident. Over the soak's flood the frontend's RSS doubled while what it held grew by a
quarter. Three settings undo that, where the C library is glibc (elsewhere nothing changes):
- the mmap threshold is fixed at LARGE_BYTES: every block that large is mapped on its own and
  unmapped when freed;
- the number of heaps ("arenas") is limited to ARENAS: glibc gives each new thread a heap of its
  own, up to 8 per core, and each keeps its own free pages and fragments; the frontend's threads
  (event loops, gRPC core's, the tokenizing thread) contend little, so they share two. An
  operator's own MALLOC_ARENA_MAX is left as it is;
- `Trimmer` calls `malloc_trim(0)` (free pages inside the heaps go back) when RSS has grown by
  TRIM_GROWTH_BYTES since the last trim, checked every TRIM_INTERVAL_S, in a thread: ~2 ms
  with ~100 MB of heap, during which other threads' allocations wait. And at least every
  TRIM_EVERY_S: a trim that ran while a flood's objects were alive leaves a mark that high,
  and once they are freed RSS does not grow, so without it their pages stayed resident (10-16
  MB after big Tokenize calls, measured; malloc_trim gave them back).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import time
from collections.abc import Callable
from typing import Any

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers (malloc.h)
M_ARENA_MAX = -8
ARENAS = 2  # the value gunicorn's and Heroku's docs give for threaded Python servers
LARGE_BYTES = 1 << 20  # blocks this large are mapped on their own, unmapped when freed
TRIM_INTERVAL_S = 1.0
TRIM_GROWTH_BYTES = 8 << 20
TRIM_EVERY_S = 10.0


def _glibc() -> Any | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not all(hasattr(libc, f) for f in ("mallopt", "malloc_trim", "gnu_get_libc_version")):
        return None
    return libc


def fix_mmap_threshold(libc: Any | None = None) -> bool:
    """Map blocks of LARGE_BYTES and more on their own, from now on (True where it took)."""
    libc = libc or _glibc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, LARGE_BYTES) == 1)


def limit_arenas(arenas: int = ARENAS, libc: Any | None = None) -> bool:
    """Let threads started from now on share `arenas` heaps (True where it took). Call it
    before the threads start: a thread keeps the heap it first allocated from. Does nothing
    (False) where MALLOC_ARENA_MAX is set: the operator chose."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    libc = libc or _glibc()
    return bool(libc and libc.mallopt(M_ARENA_MAX, arenas) == 1)


def rss_bytes() -> int:
    """This process's resident set, from /proc/self/statm (0 where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Trimmer:
    """Hands free heap pages back when RSS has grown by `growth` bytes since the last trim,
    and at least every `every_s` seconds."""

    def __init__(self, interval_s: float = TRIM_INTERVAL_S, growth: int = TRIM_GROWTH_BYTES,
                 on_trim: Callable[[], Any] | None = None,
                 every_s: float = TRIM_EVERY_S) -> None:
        self.libc = _glibc()
        self.interval_s = interval_s
        self.growth = growth
        self.every_s = every_s
        self.last = time.monotonic()  # when the last trim ran (or the trimmer started)
        self.on_trim = on_trim  # called after each trim (the server counts them in a metric)
        self.mark = rss_bytes()  # RSS after the last trim
        self.trims = 0

    async def check(self) -> bool:
        """Trim now if RSS has grown past the mark or the last trim is `every_s` old (True if
        it did)."""
        rss = rss_bytes()
        self.mark = min(self.mark, rss)
        due = time.monotonic() - self.last >= self.every_s
        if self.libc is None or (rss < self.mark + self.growth and not due):
            return False
        await asyncio.to_thread(self.libc.malloc_trim, 0)  # ctypes lets the GIL go
        self.last = time.monotonic()
        self.trims += 1
        self.mark = rss_bytes()
        if self.on_trim is not None:
            self.on_trim()
        return True

    async def run(self) -> None:
        """Check every `interval_s`, until cancelled."""
        if self.libc is None:
            return
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check()
