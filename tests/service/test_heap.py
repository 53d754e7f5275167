"""The frontend's heap settings (service/heap.py), each in a fresh interpreter of its own so
that glibc's state is the one a starting server has: a large block goes back to the kernel
when freed, and the trimmer gives back free pages left inside the heap."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from moe_embed.service import heap

pytestmark = pytest.mark.skipif(heap._glibc() is None, reason="glibc's malloc only")

MB = 1 << 20


def _run(body: str) -> dict:
    script = textwrap.dedent("""
        import asyncio, json
        from moe_embed.service import heap
        MB = 1 << 20
        def rss():
            return heap.rss_bytes() / MB
    """) + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_large_blocks_are_unmapped_when_freed() -> None:
    """A flood's large messages: after one large block has been freed, glibc would serve the
    next ones from its heap and keep their pages; with the threshold fixed, 40 blocks of 3 MB
    (each with a small block kept after it, as live objects are) all go back when freed."""
    r = _run("""
        assert heap.fix_mmap_threshold()
        first = bytearray(4 * MB)  # freed: glibc's own threshold would now grow past 4 MB
        del first
        base = rss()
        blocks, kept = [], []
        for _ in range(40):
            blocks.append(bytearray(3 * MB))
            kept.append(bytearray(2048))
        peak = rss()
        del blocks
        print(json.dumps({"base": base, "peak": peak, "after": rss()}))
    """)
    assert r["peak"] - r["base"] > 100, r  # the blocks were resident
    assert r["after"] - r["base"] < 10, r


def test_the_trimmer_gives_back_free_pages_inside_the_heap() -> None:
    """Blocks under the threshold, freed between blocks still held, stay resident until
    malloc_trim; the trimmer trims once RSS has grown by its margin since its mark, and not
    before."""
    r = _run("""
        trimmer = heap.Trimmer(interval_s=0.01, growth=32 * MB)
        before = rss()
        small = [bytearray(16 * MB // 1024) for _ in range(64)]  # RSS grows, under the margin
        early = asyncio.run(trimmer.check())
        blocks, kept = [], []
        for _ in range(3000):
            blocks.append(bytearray(48 * 1024))
            kept.append(bytearray(2048))
        del blocks, small
        held = rss()
        trimmed = asyncio.run(trimmer.check())
        print(json.dumps({"before": before, "held": held, "after": rss(), "early": early,
                          "trimmed": trimmed, "trims": trimmer.trims}))
    """)
    assert not r["early"], r
    assert r["held"] - r["before"] > 100, r  # the freed blocks' pages stayed resident
    assert r["trimmed"] and r["trims"] == 1, r
    assert r["after"] - r["before"] < 30, r


def test_rss_is_read_from_proc() -> None:
    assert 10 * MB < heap.rss_bytes() < 64 * 1024 * MB
