"""ONNX Runtime session options: one thread pool for every session of a worker process.

55 sessions with a per-session pool each means 55 sets of spinning threads fighting over the
cores (~20x slower on 2 cores, see MODEL.md). All sessions of a worker share ORT's global pool.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

_GLOBAL_POOL: int | None = None


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def init_thread_pool(threads: int | None = None) -> int:
    """Size ORT's process-wide intra-op pool once; later calls reuse it or must agree on it."""
    global _GLOBAL_POOL
    if threads is None:
        threads = _GLOBAL_POOL or default_threads()
    if _GLOBAL_POOL is None:
        # spinning threads burn the cores between the many small runs of a routed MoE forward
        ort.set_global_thread_pool_sizes(threads, 1)
        _GLOBAL_POOL = threads
    elif _GLOBAL_POOL != threads:
        raise RuntimeError(
            f"this process's ONNX Runtime pool already has {_GLOBAL_POOL} threads, not {threads}"
        )
    return threads


def session_options() -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.use_per_session_threads = False
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return so


def create_session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    init_thread_pool(threads)
    return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
