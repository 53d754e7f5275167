"""The engine: the one API behind the gRPC adapter (validate -> tokenize -> batch -> dispatch).

It knows nothing of protobuf. Everything a request can get wrong is checked here, before any
work is queued, so a bad request never costs a worker or another request's result.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from ..export.bundle import Bundle
from ..workers import protocol
from ..workers.dimensions import resolve_dimensions
from ..workers.errors import InvalidInput
from ..workers.tokenizer import TASKS, Tokenizer
from . import errors
from .batcher import Batch, Batcher, Job
from .config import ServeConfig
from .errors import ServiceError
from .metrics import Metrics
from .pool import WorkerPool

THREAD_TOKENIZE_CHARS = 16384  # larger requests are tokenized off the event loop

log = structlog.get_logger("moe_embed.engine")


@dataclass
class EmbedOutcome:
    vectors: list[np.ndarray]  # float32, one per input, in input order
    token_counts: list[int]
    dimensions: int
    queue_ms: float
    compute_ms: float
    total_ms: float


class Engine:
    """Owns the tokenizer, the batcher and the worker pool of one server."""

    def __init__(self, config: ServeConfig, bundle_path: str | Path, metrics: Metrics) -> None:
        self.config = config
        self.bundle = Bundle.load(bundle_path, verify=False)  # workers verify every hash
        self.tokenizer = Tokenizer.from_bundle(self.bundle)
        self.metrics = metrics
        self.draining = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.batcher = Batcher(config.max_batch_tokens, config.max_wait_ms / 1e3,
                               config.max_queue, on_depth=metrics.queue_depth.set,
                               on_dropped=metrics.inputs_dropped.inc)
        self.pool = WorkerPool(
            self.bundle.path, config.workers, config.threads_per_worker, config.log_level,
            on_result=self._on_result, on_error=self._on_error,
            on_capacity=self._on_capacity, on_requeue=self._on_requeue,
            on_sent=self._on_sent, on_restart=self._on_restart)
        self.batcher.attach(self.pool)

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        await self.pool.start()
        self.metrics.workers_ready.set(self.pool.ready_count)

    @property
    def ready(self) -> bool:
        """Every worker has loaded once. While one restarts, work queues for the others (or
        for it), so requests keep being admitted."""
        return self.pool.started

    def begin_drain(self) -> None:
        """Refuse new work from now on; work already admitted still runs."""
        self.draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no admitted request is left (True) or the timeout passes (False)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        await self.pool.close()

    # -- validation -----------------------------------------------------------------------
    def check_inputs(self, inputs: Sequence[str]) -> None:
        if not inputs:
            raise errors.invalid_argument("inputs", "at least one input is required")
        if len(inputs) > self.config.max_inputs:
            raise errors.invalid_argument(
                "inputs", f"{len(inputs)} inputs exceed the limit of {self.config.max_inputs} "
                "per request (max_inputs); split the request")
        for i, text in enumerate(inputs):
            if not text:
                raise errors.invalid_argument("inputs", "empty string", index=i)

    def check_task(self, task: str) -> None:
        if task not in TASKS:
            raise errors.invalid_argument("task", f"unknown task {task!r}; expected one of "
                                          + ", ".join(TASKS))

    def check_dimensions(self, dimensions: int) -> int:
        """The output size for `dimensions` (0 = full), by the runtime's own rule."""
        try:
            return resolve_dimensions(self.bundle, dimensions)
        except InvalidInput as exc:
            raise errors.to_service_error(exc) from exc

    async def _encode(self, inputs: Sequence[str], task: str,
                      truncate: bool) -> list[list[int]]:
        try:
            if sum(len(t) for t in inputs) > THREAD_TOKENIZE_CHARS:
                return await asyncio.to_thread(self.tokenizer.encode, inputs, task, truncate)
            return self.tokenizer.encode(inputs, task, truncate)
        except Exception as exc:
            raise errors.to_service_error(exc) from exc

    # -- the API --------------------------------------------------------------------------
    async def embed(self, inputs: Sequence[str], task: str, dimensions: int = 0,
                    truncate: bool = True, normalize: bool = True,
                    timeout_s: float | None = None) -> EmbedOutcome:
        """Embed `inputs`; raises ServiceError with the status the client should see."""
        start = time.monotonic()
        if self.draining:
            raise errors.unavailable("server is draining (shutting down); retry elsewhere")
        if not self.ready:
            raise errors.unavailable("workers are still loading; retry shortly")
        self.check_inputs(inputs)
        self.check_task(task)
        dims = self.check_dimensions(dimensions)
        ids = await self._encode(inputs, task, truncate)
        deadline = start + timeout_s if timeout_s is not None else None
        job = Job([np.asarray(x, dtype=np.int32) for x in ids], dims, normalize,
                  asyncio.get_running_loop().create_future(), deadline)
        self.batcher.admit(job)
        self._active += 1
        self._idle.clear()
        try:
            await job.future
        except BaseException:  # cancelled, deadline, or a batch of it failed
            self.batcher.cancel(job)  # its inputs still queued never reach a worker
            raise
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()
        self.metrics.queue_time.observe(job.queue_ms / 1e3)
        return EmbedOutcome(job.vectors, [len(x) for x in ids], dims, job.queue_ms,
                            job.compute_ms, (time.monotonic() - start) * 1e3)

    def tokenize(self, inputs: Sequence[str], task: str) -> list[tuple[list[int], list[str]]]:
        self.check_inputs(inputs)
        self.check_task(task)
        try:
            return self.tokenizer.tokenize(inputs, task)
        except Exception as exc:
            raise errors.to_service_error(exc) from exc

    def info(self) -> dict:
        b = self.bundle
        return {
            "model_id": b.model_id, "dimensions": b.dims_max, "min_dimensions": b.dims_min,
            "max_dimensions": b.dims_max, "max_tokens": b.max_tokens,
            "precision": b.precision, "workers": self.config.workers,
            "bundle_hash": b.digest, "moe_mode": b.moe_mode,
            "max_inputs": self.config.max_inputs,
            "max_batch_tokens": self.config.max_batch_tokens,
        }

    # -- pool callbacks (event loop) ------------------------------------------------------
    def _on_capacity(self) -> None:
        self.metrics.workers_ready.set(self.pool.ready_count)
        self.batcher.schedule()

    def _on_sent(self, batch: Batch) -> None:
        m = self.metrics
        m.batch_requests.observe(batch.requests())
        m.batch_inputs.observe(len(batch.items))
        m.batch_tokens.observe(batch.tokens)
        m.batch_padded_tokens.observe(batch.padded)

    def _on_result(self, batch: Batch, result: protocol.ResultMessage) -> None:
        for item, vector in zip(batch.items, result.vectors(), strict=True):
            item.job.deliver(item.index, vector, result.compute_ms)
        self.metrics.compute_time.observe(result.compute_ms / 1e3)
        self.metrics.observe_experts(result.moe_layers, result.expert_tokens)

    def _on_error(self, batch: Batch, error: ServiceError) -> None:
        log.error("batch_failed", batch_id=batch.batch_id, code=error.code.name,
                  error=error.message)
        for item in batch.items:
            item.job.fail(error)

    def _on_requeue(self, batch: Batch) -> None:
        self.metrics.batches_resent.inc()
        log.warning("batch_resent", batch_id=batch.batch_id, inputs=len(batch.items))
        self.batcher.requeue(batch)

    def _on_restart(self, index: int) -> None:
        self.metrics.worker_restarts.labels(str(index)).inc()
        self.metrics.workers_ready.set(self.pool.ready_count)
