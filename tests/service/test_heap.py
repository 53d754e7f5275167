"""The frontend's heap settings (service/heap.py), each in a fresh interpreter of its own so
that glibc's state is the one a starting server has: a large block goes back to the kernel
when freed, and the trimmer gives back free pages left inside the heap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from moe_embed.service import heap
from moe_embed.testing import procfs
from moe_embed.testing.service import ServeProcess, wait_for
from moe_embed.v1 import embedder_pb2 as pb
from moe_embed.v1 import embedder_pb2_grpc as pb_grpc

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


def test_the_trimmer_also_trims_on_a_period() -> None:
    """A trim that ran while many objects were alive leaves its mark that high; once they are
    freed RSS does not grow, so the growth rule never fires again and their pages stay
    resident: the period gives them back (with no period, the control, they stay)."""
    r = _run("""
        import time
        def flood():
            blocks, kept = [], []
            for _ in range(3000):
                blocks.append(bytearray(48 * 1024))
                kept.append(bytearray(2048))
            return blocks, kept
        out = {}
        for name, every in (("control", 3600.0), ("period", 0.2)):
            trimmer = heap.Trimmer(interval_s=0.01, growth=1 << 40, every_s=every)
            blocks, kept = flood()
            held = rss()
            del blocks  # freed, but RSS has not grown since the trimmer's mark
            early = asyncio.run(trimmer.check())
            time.sleep(0.3)
            late = asyncio.run(trimmer.check())
            out[name] = {"held": held, "after": rss(), "early": early, "late": late}
            del kept
            heap._glibc().malloc_trim(0)
        print(json.dumps(out))
    """)
    control, period = r["control"], r["period"]
    assert not control["early"] and not control["late"], r
    assert control["held"] - control["after"] < 20, r  # the pages stayed resident
    assert not period["early"] and period["late"], r
    assert period["held"] - period["after"] > 100, r  # given back by the periodic trim


_HEAPS = """
    import ctypes, os, threading
    libc = ctypes.CDLL("libc.so.6")
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]

    def heaps():  # glibc's own account: one <heap nr=...> per arena
        path = f"/tmp/malloc-info-{os.getpid()}.xml"
        f = libc.fopen(path.encode(), b"w")
        libc.malloc_info(0, f)
        libc.fclose(f)
        text = open(path).read()
        os.unlink(path)
        return text.count("<heap nr=")

    held, barrier = [], threading.Barrier(8)
    def work():  # blocks under the mmap threshold come from the thread's heap
        held.append([bytearray(64 * 1024) for _ in range(4)])
        barrier.wait()
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
"""


@pytest.mark.parametrize("limit", [True, False])
def test_threads_share_two_heaps(limit: bool) -> None:
    """glibc gives each new thread a heap of its own (up to 8 per core), each keeping its own
    free pages; with the limit, eight threads allocating at once share ARENAS heaps. Without
    it the same threads make more (the control: the count can fail)."""
    r = _run(textwrap.dedent(f"""
        import os
        os.environ.pop("MALLOC_ARENA_MAX", None)
        took = heap.limit_arenas() if {limit} else None
    """) + textwrap.dedent(_HEAPS) + 'print(json.dumps({"took": took, "heaps": heaps()}))')
    if limit:
        assert r["took"] is True and r["heaps"] <= heap.ARENAS, r
    else:
        assert r["heaps"] > heap.ARENAS, r


def test_an_operators_malloc_arena_max_is_left_alone(monkeypatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert heap.limit_arenas() is False


def test_rss_is_read_from_proc() -> None:
    assert 10 * MB < heap.rss_bytes() < 64 * 1024 * MB


def test_the_server_gives_a_flood_of_freed_memory_back(tiny_bundle, tmp_path) -> None:
    """`moe-embed serve` runs the trimmer: after big Tokenize answers (~130k small objects
    each, freed between heap blocks still in use) its RSS comes back near where it was, and
    each trim is counted in moe_embed_heap_trims_total."""
    with ServeProcess(tiny_bundle, tmp_path / "serve.log", "--workers", "1") as srv:
        srv.wait_serving()
        stub = pb_grpc.EmbedderStub(grpc.insecure_channel(srv.target))
        text = "Hello world, the quick brown fox jumps over the lazy dog. " * 40
        request = pb.TokenizeRequest(inputs=[text] * 256, task=pb.TASK_NONE)
        stub.Tokenize(request, timeout=60)  # the first call's lasting allocations
        base = procfs.rss_mb(srv.proc.pid)
        with ThreadPoolExecutor(4) as pool:  # four answers alive at once: ~40 MB
            for _ in range(3):
                list(pool.map(lambda _: stub.Tokenize(request, timeout=60), range(4)))
        grown = procfs.rss_mb(srv.proc.pid) - base
        wait_for(lambda: srv.metrics().get("moe_embed_heap_trims_total", 0) >= 1, 30,
                 f"a trim (RSS grew {grown:.0f} MB)")
        wait_for(lambda: procfs.rss_mb(srv.proc.pid) - base < 12, 30,
                 "RSS back within 12 MB of the first call's")
        heap_lines = [json.loads(line) for line in srv.log_path.read_text().splitlines()
                      if '"heap"' in line]
    operator_chose = "MALLOC_ARENA_MAX" in os.environ
    assert [(h["large_blocks_mapped"], h["arenas_limited"]) for h in heap_lines] == [
        (True, not operator_chose)]


def test_a_big_tokenize_answer_is_built_input_by_input(tiny_bundle, tmp_path) -> None:
    """256 inputs of 512 tokens: ~130k ids and pieces. The answer is filled input by input in
    the tokenizing thread, so their Python lists (~13 MB at once) never all exist: the
    frontend's peak RSS grows by less than that over the call."""
    with ServeProcess(tiny_bundle, tmp_path / "serve.log", "--workers", "1") as srv:
        srv.wait_serving()
        stub = pb_grpc.EmbedderStub(grpc.insecure_channel(srv.target))
        text = "Hello world, the quick brown fox jumps over the lazy dog. " * 40
        request = pb.TokenizeRequest(inputs=[text] * 256, task=pb.TASK_NONE)
        for _ in range(2):  # the first calls' lasting allocations
            stub.Tokenize(request, timeout=60)
        pid = srv.proc.pid
        before = procfs.rss_mb(pid)
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak RSS := RSS now
        reply = stub.Tokenize(request, timeout=60)
        grew = procfs.peak_rss_mb(pid) - before
    assert [len(t.ids) for t in reply.tokens] == [512] * 256
    assert grew < 8, f"peak RSS grew {grew:.1f} MB over one call"
