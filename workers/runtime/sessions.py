"""ONNX Runtime session options: one thread pool and one memory arena per worker process.

55 sessions with a per-session pool each means 55 sets of spinning threads fighting over the
cores (~20x slower on 2 cores: 48 expert calls took ~1000 ms instead of ~47), so all sessions
of a worker share ORT's global pool.
Likewise 55 per-session arenas each keep their own peak (a worker grew from 3 to 10 GB on mixed
lengths up to 512 tokens); the sessions run one after another, so they share one arena (4.4 GB).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnxruntime as ort

from .int8_gemm import graph_source

_GLOBAL_POOL: int | None = None
_SHARED_ARENA = False


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def init_thread_pool(threads: int | None = None) -> int:
    """Size ORT's process-wide intra-op pool once; later calls reuse it or must agree on it."""
    global _GLOBAL_POOL
    if threads is None:
        threads = _GLOBAL_POOL or default_threads()
    if _GLOBAL_POOL is None:
        # one pool for all 55 sessions: per-session pools spin and fight over the cores
        ort.set_global_thread_pool_sizes(threads, 1)
        _GLOBAL_POOL = threads
    elif _GLOBAL_POOL != threads:
        raise RuntimeError(
            f"this process's ONNX Runtime pool already has {_GLOBAL_POOL} threads, not {threads}"
        )
    return threads


def _register_shared_arena() -> None:
    global _SHARED_ARENA
    if not _SHARED_ARENA:
        cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(cpu, ort.OrtArenaCfg(0, -1, -1, -1))  # ORT defaults
        _SHARED_ARENA = True


def session_options() -> ort.SessionOptions:
    _register_shared_arena()
    so = ort.SessionOptions()
    so.add_session_config_entry("session.use_env_allocators", "1")
    so.use_per_session_threads = False
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return so


def create_session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    """The graph at `path`, its int8 GEMMs made exact where this CPU's kernel would saturate
    (int8_gemm)."""
    init_thread_pool(threads)
    return ort.InferenceSession(graph_source(Path(path)), session_options(),
                                providers=["CPUExecutionProvider"])


def create_sessions(paths: Sequence[Path],
                    threads: int | None = None) -> list[ort.InferenceSession]:
    """One session per path, in order, created on every usable core at once: ORT releases
    the GIL while it parses, optimizes and prepacks a graph, and most of that time is page
    faults on fresh memory, so two cores load the full fp32 bundle in about half the time of
    one. Largest graphs first, so the long one does not start last."""
    init_thread_pool(threads)
    with ThreadPoolExecutor(default_threads()) as pool:
        made = {str(p): pool.submit(create_session, p, threads)
                for p in sorted(paths, key=lambda p: -Path(p).stat().st_size)}
        return [made[str(p)].result() for p in paths]
