"""ONNX Runtime sessions of a worker (workers/runtime/sessions.py): one process-wide thread
pool sized once, every session on it and on one shared arena, sessions handed back in the order
asked. The pool is per process, so each rule is checked in a fresh Python process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest


def _in_fresh_process(code: str, cpus: set[int] | None = None) -> dict:
    """Run `code` (which sets `out`) in a new interpreter, pinned to `cpus` if given."""
    script = "import json, os\n"
    if cpus is not None:
        script += f"os.sched_setaffinity(0, {sorted(cpus)!r})\n"
    script += "from moe_embed.workers.runtime import sessions\n" + textwrap.dedent(code)
    script += "\nprint(json.dumps(out))\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_pool_is_sized_once_and_a_different_size_is_refused() -> None:
    out = _in_fresh_process("""
        out = {"first": sessions.init_thread_pool(3), "again": sessions.init_thread_pool(3),
               "default_after": sessions.init_thread_pool(None)}
        try:
            sessions.init_thread_pool(2)
        except RuntimeError as exc:
            out["refused"] = str(exc)
    """)
    assert out["first"] == out["again"] == out["default_after"] == 3
    assert "already has 3 threads, not 2" in out["refused"]
    more = _in_fresh_process("""
        sessions.init_thread_pool(3)
        try:
            sessions.init_thread_pool(4)
            out = "taken"
        except RuntimeError as exc:
            out = str(exc)
    """)
    assert "already has 3 threads, not 4" in more  # more threads than it has: refused too


def test_a_pool_of_more_than_256_threads_is_agreed_with() -> None:
    """A machine of 300 usable cores (past CPython's shared small ints): the same size again
    is taken. The pool is set as if made already: 300 threads take ORT half a minute to start."""
    out = _in_fresh_process("""
        sessions._GLOBAL_POOL = int("300")
        out = sessions.init_thread_pool(int("300"))
    """)
    assert out == 300


def test_the_default_pool_takes_every_usable_core() -> None:
    cpus = os.sched_getaffinity(0)
    out = _in_fresh_process("""
        out = {"default": sessions.default_threads(), "pool": sessions.init_thread_pool(None),
               "cores": len(os.sched_getaffinity(0))}
    """)
    assert out["default"] == out["pool"] == out["cores"] == len(cpus)
    one = _in_fresh_process("out = {'pool': sessions.init_thread_pool()}", cpus={min(cpus)})
    assert one["pool"] == 1


def test_every_session_shares_the_pool_and_one_arena() -> None:
    """The options that make a worker's 55 sessions use the process's one thread pool and one
    memory arena, run their nodes one after another, and log errors only; asked for twice
    (every session asks), the shared arena is registered once."""
    out = _in_fresh_process("""
        import onnxruntime as ort
        registered = []  # ORT takes a second registration silently: count them here
        register = ort.create_and_register_allocator
        ort.create_and_register_allocator = lambda *a: (registered.append(a), register(*a))
        so = [sessions.session_options(), sessions.session_options()]
        out = [{"env_allocators": s.get_session_config_entry("session.use_env_allocators"),
                "per_session_threads": s.use_per_session_threads,
                "optimization": str(s.graph_optimization_level),
                "mode": str(s.execution_mode), "log": s.log_severity_level} for s in so]
        out.append([[m.name, m.device_id, str(m.allocator_type), c.max_mem,
                     c.arena_extend_strategy, c.initial_chunk_size_bytes,
                     c.max_dead_bytes_per_chunk] for m, c in registered])
    """)
    want = {"env_allocators": "1", "per_session_threads": False,
            "optimization": "GraphOptimizationLevel.ORT_ENABLE_ALL",
            "mode": "ExecutionMode.ORT_SEQUENTIAL", "log": 3}
    # once, for the CPU, an arena with ORT's own defaults (-1: unset; max_mem 0: no limit)
    arena = ["Cpu", 0, "OrtAllocatorType.ORT_ARENA_ALLOCATOR", 0, -1, -1, -1]
    assert out == [want, want, [arena]]


def _graph(path: Path, add: float, size: int) -> None:
    """y = x + add, with an unused `size`-float initializer to set the file's size."""
    import onnx
    from onnx import helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None])],
        [numpy_helper.from_array(np.array([add], np.float32), "c"),
         numpy_helper.from_array(np.zeros(size, np.float32), "pad")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.mark.parametrize("threads", [None, 1])
def test_sessions_come_back_in_the_order_asked(tmp_path: Path, threads: int | None) -> None:
    """Created largest first, handed back in the caller's order: the runtime pairs them with
    its segments and experts by position."""
    paths = []
    for i, size in enumerate([10, 5000, 100, 20000]):
        paths.append(tmp_path / f"g{i}.onnx")
        _graph(paths[-1], float(i + 1), size)
    out = _in_fresh_process(f"""
        import numpy as np
        from pathlib import Path
        made = sessions.create_sessions([Path(p) for p in {[str(p) for p in paths]!r}],
                                        {threads!r})
        out = [float(s.run(None, {{"x": np.zeros(1, np.float32)}})[0][0]) for s in made]
        out.append(sessions.init_thread_pool())
    """)
    assert out[:4] == [1.0, 2.0, 3.0, 4.0]
    assert out[4] == (threads or len(os.sched_getaffinity(0)))
