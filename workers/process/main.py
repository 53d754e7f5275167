"""A worker process: loads one Runtime, then embeds the batches the frontend sends it.

Started with the multiprocessing "spawn" context (torch and ONNX Runtime are not fork-safe).
The loop reads a Batch from `requests`, runs the runtime on it (packed ids in, one vector per
input out, each with its own dimensions and normalize) and writes a Result (vectors + tokens
per expert) or, if the batch raised, a Failed naming the reason and the row. The worker exits
on Stop or when the frontend's end of the pipe closes.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from multiprocessing.connection import Connection

import structlog

from ..logs import configure_json_logging
from ..runtime.errors import InvalidInput
from . import protocol


def run_batch(runtime, batch: protocol.Batch) -> protocol.Result | protocol.Failed:
    """One batch through the runtime (runtime: runtime.Runtime)."""
    start = time.perf_counter()
    try:
        r = runtime.embed(batch.ids, batch.offsets, batch.dims, batch.normalize)
    except InvalidInput as exc:
        return protocol.Failed(batch.batch_id, protocol.Reason.INVALID_INPUT, exc.detail,
                               exc.field, exc.index)
    except Exception as exc:  # the batch fails, the worker lives on
        structlog.get_logger("moe_embed.worker").error(
            "batch_failed", batch_id=batch.batch_id,
            error=traceback.format_exception_only(exc)[-1].strip())
        return protocol.Failed(batch.batch_id, protocol.Reason.INTERNAL, repr(exc))
    compute_ms = (time.perf_counter() - start) * 1e3
    return protocol.Result.of(batch.batch_id, compute_ms, r.vectors, r.moe_layers,
                              r.expert_tokens)


def worker_main(requests: Connection, results: Connection, bundle_path: str, threads: int,
                index: int, log_level: str = "info") -> None:
    """Process entry point (must stay importable at module level for "spawn")."""
    # Ctrl-C and SIGTERM are for the frontend, which drains and then sends Stop; a worker
    # whose frontend dies anyway sees EOF on its pipe and exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_json_logging(log_level, worker=index, pid=os.getpid())
    log = structlog.get_logger("moe_embed.worker")
    start = time.perf_counter()
    try:
        from ..runtime.runtime import Runtime, pack

        runtime = Runtime(bundle_path, threads=threads)
        # one tiny forward so the first real request does not pay ORT's first-run setup
        runtime.forward(*pack([[0, 2]]))
    except Exception as exc:  # reported to the frontend, which exits with it
        log.error("worker_load_failed", error=str(exc))
        results.send_bytes(protocol.LoadFailed(str(exc)).encode())
        return
    load_s = time.perf_counter() - start
    log.info("worker_ready", load_s=round(load_s, 3), threads=threads)
    results.send_bytes(protocol.Ready(os.getpid(), load_s).encode())
    while True:
        try:
            msg = protocol.decode(requests.recv_bytes())
        except (EOFError, OSError):
            log.info("worker_frontend_gone")
            return
        if isinstance(msg, protocol.Stop):
            log.info("worker_stopped")
            return
        assert isinstance(msg, protocol.Batch), msg
        try:
            results.send_bytes(run_batch(runtime, msg).encode())
        except (BrokenPipeError, OSError):
            return
