"""A worker process: loads one Runtime, then embeds the batches the frontend sends it.

Started with the multiprocessing "spawn" context (`worker_main`), or forked from a loader that
holds a runtime already (`loader.py`, one ORT thread per worker).
The loop reads Batches from `requests`, runs the runtime on them (packed ids in, one vector
per input out, each with its own dimensions and normalize) and writes a Result (vectors +
tokens per expert) or, if a batch raised (a bug: requests are validated before they are
queued), a Failed with the error.

A worker holds a few batches (one running, others sent ahead). It runs them step by step (one
session call at a time) and, between steps, reads any batch that has arrived and advances the
one `policy.next_to_step` names: a small batch sent while a large one runs is done first, after
one step of the large one, instead of after all of it. The worker exits on Stop or when the
frontend's end of the pipe closes.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from multiprocessing.connection import Connection

import structlog

from ..logs import configure_json_logging
from . import protocol
from .policy import next_to_step
from .priority import lower_priority


class Running:
    """A batch in progress: its step generator and when it started."""

    def __init__(self, runtime, batch: protocol.Batch) -> None:  # runtime: runtime.Runtime
        self.batch = batch
        self.tokens = batch.ids.size
        self.steps = runtime.embed_steps(batch.ids, batch.offsets, batch.dims, batch.normalize)
        self.seconds = 0.0  # time spent in its own steps
        self.yielded = 0  # tokens of later batches let through ahead of this one
        self.overtook = False  # already counted in the batch it overtook

    def step(self) -> protocol.Result | protocol.Failed | None:
        """Advance by one step; the reply once it is done."""
        start = time.perf_counter()
        try:
            next(self.steps)
            return None
        except StopIteration as done:
            r = done.value
            self.seconds += time.perf_counter() - start
            return protocol.Result.of(self.batch.batch_id, self.seconds * 1e3, r.vectors,
                                      r.moe_layers, r.expert_tokens)
        except Exception as exc:  # a bug (requests were validated): the batch fails, not us
            structlog.get_logger("moe_embed.worker").error(
                "batch_failed", batch_id=self.batch.batch_id,
                error=traceback.format_exception_only(exc)[-1].strip())
            return protocol.Failed(self.batch.batch_id, repr(exc))
        finally:
            self.seconds += time.perf_counter() - start


def serve(runtime, requests: Connection, results: Connection) -> None:
    """The worker's loop: read batches, step one (`policy.next_to_step`), write replies.
    Returns on Stop or when the frontend is gone."""
    log = structlog.get_logger("moe_embed.worker")
    running: list[Running] = []
    while True:
        try:
            while not running or requests.poll(0):
                msg = protocol.decode(requests.recv_bytes())
                if isinstance(msg, protocol.Stop):
                    log.info("worker_stopped")
                    return
                assert isinstance(msg, protocol.Batch), msg
                running.append(Running(runtime, msg))
        except (EOFError, OSError):
            log.info("worker_frontend_gone")
            return
        task = next_to_step(running)
        reply = task.step()
        if reply is not None:
            running.remove(task)
            try:
                results.send_bytes(reply.encode())
            except (BrokenPipeError, OSError):
                return


def load_runtime(bundle_path: str, threads: int):  # -> runtime.Runtime
    """The runtime, warmed up: one tiny forward so the first real request does not pay ORT's
    first-run setup. (Tried and dropped, both slower on 2 cores: hashing the bundle while
    torch and ONNX Runtime import, and asking the kernel to read the bundle ahead meanwhile.)"""
    from ..runtime.runtime import Runtime, pack

    runtime = Runtime(bundle_path, threads=threads)
    runtime.forward(*pack([[0, 2]]))
    return runtime


def ignore_interrupts() -> None:
    """Ctrl-C and SIGTERM are for the frontend, which drains and then sends Stop; a worker
    whose frontend dies anyway sees EOF on its pipe and exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def worker_main(requests: Connection, results: Connection, bundle_path: str, threads: int,
                index: int, log_level: str = "info", nice: int = 0) -> None:
    """Process entry point of a worker that loads its own runtime (must stay importable at
    module level for "spawn"); it runs `nice` steps below the frontend (priority.py)."""
    ignore_interrupts()
    niceness = lower_priority(nice)  # before the runtime's threads start
    configure_json_logging(log_level, worker=index, pid=os.getpid())
    log = structlog.get_logger("moe_embed.worker")
    start = time.perf_counter()
    try:
        runtime = load_runtime(bundle_path, threads)
    except Exception as exc:  # reported to the frontend, which exits with it
        log.error("worker_load_failed", error=str(exc))
        results.send_bytes(protocol.LoadFailed(str(exc)).encode())
        return
    load_s = time.perf_counter() - start
    log.info("worker_ready", load_s=round(load_s, 3), threads=threads, nice=niceness)
    results.send_bytes(protocol.Ready(os.getpid(), load_s).encode())
    serve(runtime, requests, results)
