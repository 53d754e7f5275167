"""A worker process: loads one Runtime, then embeds the batches the frontend sends it.

Started with the multiprocessing "spawn" context (torch and ONNX Runtime are not fork-safe).
The loop reads BATCH messages from `requests`, runs one forward pass per batch and writes a
RESULT (vectors + tokens per expert) to `results`. A batch mixes requests with different
`dimensions` and `normalize`: the forward pass is shared and only pooling is done per group,
with the runtime's own pooling function, so every vector equals the in-process result.
The worker exits on STOP or when the frontend's end of the pipe closes.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from multiprocessing.connection import Connection

import numpy as np
import structlog

from . import protocol
from .errors import InvalidInput
from .logs import configure_json_logging


def embed_batch(runtime, batch: protocol.BatchMessage) -> bytes:  # runtime: Runtime
    """Forward the whole batch once, pool per (dimensions, normalize) group."""
    from .runtime import pool

    start = time.perf_counter()
    result = runtime.forward(batch.id_lists())
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, key in enumerate(zip(batch.dims.tolist(), batch.normalize.tolist(), strict=True)):
        groups.setdefault(key, []).append(i)
    vectors: list[np.ndarray] = [None] * len(batch)  # type: ignore[list-item]
    for (dims, normalize), rows in groups.items():
        runtime.check_dimensions(dims)
        if len(groups) == 1:
            hidden, mask = result.hidden, result.mask
        else:
            hidden, mask = result.hidden[rows], result.mask[rows]
        pooled = pool(hidden, mask, dims, normalize)
        for row, vec in zip(rows, pooled, strict=True):
            vectors[row] = vec
    compute_ms = (time.perf_counter() - start) * 1e3
    return protocol.encode_result(batch.batch_id, compute_ms, vectors,
                                  list(runtime.moe_layers), result.expert_tokens)


def worker_main(requests: Connection, results: Connection, bundle_path: str, threads: int,
                index: int, log_level: str = "info") -> None:
    """Process entry point (must stay importable at module level for "spawn")."""
    # Ctrl-C and SIGTERM are for the frontend, which drains and then sends STOP; a worker
    # whose frontend dies anyway sees EOF on its pipe and exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_json_logging(log_level, worker=index, pid=os.getpid())
    log = structlog.get_logger("moe_embed.worker")
    start = time.perf_counter()
    try:
        from .runtime import Runtime

        runtime = Runtime(bundle_path, threads=threads)
        # one tiny forward so the first real request does not pay ORT's first-run setup
        runtime.forward([[0, 2]])
    except Exception as exc:  # reported to the frontend, which exits with it
        log.error("worker_load_failed", error=str(exc))
        results.send_bytes(protocol.encode_json(protocol.LOAD_FAILED, {"message": str(exc)}))
        return
    load_s = time.perf_counter() - start
    log.info("worker_ready", load_s=round(load_s, 3), threads=threads)
    results.send_bytes(protocol.encode_json(protocol.READY, {"pid": os.getpid(),
                                                             "load_s": load_s}))
    while True:
        try:
            msg = requests.recv_bytes()
        except (EOFError, OSError):
            log.info("worker_frontend_gone")
            return
        if msg[0] == protocol.STOP:
            log.info("worker_stopped")
            return
        batch = protocol.decode_batch(msg)
        try:
            reply = embed_batch(runtime, batch)
        except InvalidInput as exc:
            reply = protocol.encode_failed(batch.batch_id, "invalid_input", str(exc))
        except Exception as exc:  # the batch fails, the worker lives on
            log.error("batch_failed", batch_id=batch.batch_id,
                      error=traceback.format_exception_only(exc)[-1].strip())
            reply = protocol.encode_failed(batch.batch_id, "internal", repr(exc))
        try:
            results.send_bytes(reply)
        except (BrokenPipeError, OSError):
            return
