"""The engine: the one API behind every protocol adapter (validate -> tokenize -> queue ->
vectors).

It knows nothing of protobuf. A request is checked by the same validator as the in-process
API before any work is queued, so a bad request never costs a worker or another request's
result; tokenization of anything but small requests runs off the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import structlog

from ..export.bundle import Bundle
from ..workers.runtime.requests import Input, Limits, validate_embed
from ..workers.runtime.tasks import task_named
from ..workers.runtime.tokenizer import Tokenizer
from . import errors
from .batching import BatchQueue, Job
from .config import ServeConfig
from .metrics import Metrics
from .scheduler import Scheduler
from .worker_pool import WorkerPool

INLINE_TOKENIZE_CHARS = 4096  # larger requests are tokenized in the tokenizing thread

log = structlog.get_logger("moe_embed.engine")


@dataclass
class EmbedOutcome:
    vectors: list[np.ndarray]  # float32, one per input, in input order
    token_counts: list[int]
    dimensions: int
    queue_ms: float
    compute_ms: float
    total_ms: float


def response_bytes(n: int, dimensions: int, model_id: str) -> int:
    """An upper bound on the EmbedResponse for n inputs: each vector is a packed float field
    (4 bytes a value + tags and lengths) plus its token count; then id, model and timing."""
    return n * (4 * dimensions + 16) + len(model_id) + 512


def _chars(inputs: Sequence[Input]) -> int:
    return sum(len(x) for x in inputs if isinstance(x, str))


class Engine:
    """Owns the tokenizer, the queue, the scheduler and the worker pool of one server."""

    def __init__(self, config: ServeConfig, bundle_path: str | Path, metrics: Metrics) -> None:
        self.config = config
        self.bundle = Bundle.load(bundle_path, verify=False)  # workers verify every hash
        self.limits = Limits.of(self.bundle, config.max_inputs)
        self.tokenizer: Tokenizer | None = None  # loaded in start(), while the workers load
        # one thread for large requests: the segmentation holds the GIL, and every thread that
        # wants it delays the event loop's next turn (a pool of threads made light calls wait
        # ~600 ms at p99 under a flood of large requests, one thread ~90 ms)
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="moe-embed-tokenize")
        self.metrics = metrics
        self.draining = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.pool = WorkerPool(self.bundle.path, config.workers, config.threads_per_worker,
                               config.log_level, metrics, share_weights=config.share_weights)
        self.scheduler = Scheduler(BatchQueue(config.max_batch_tokens, config.max_queue),
                                   self.pool, metrics, config.max_wait_ms / 1e3,
                                   config.batch_timeout_s)

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the workers, then load the tokenizer while they load (both take seconds)."""
        starting = asyncio.ensure_future(self.pool.start())
        await asyncio.sleep(0)  # pool.start spawns every worker before it first waits
        try:
            self.tokenizer = await self._off_loop(Tokenizer.from_bundle, self.bundle)
        except BaseException:
            starting.cancel()
            raise
        await starting
        self.scheduler.start()

    @property
    def ready(self) -> bool:
        """Every worker has loaded once (and the tokenizer). While one restarts, work queues
        for the others (or for it), so requests keep being admitted."""
        return self.pool.started and self.tokenizer is not None

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
        await self.scheduler.close()
        await self.pool.close()
        self._tokenizing.shutdown(wait=False, cancel_futures=True)

    async def _off_loop(self, fn: Callable, *args):
        """`fn(*args)` in the tokenizing thread."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, fn, *args)

    # -- the API --------------------------------------------------------------------------
    def _admitting(self) -> None:
        if self.draining:
            raise errors.unavailable("server is draining (shutting down); retry elsewhere")
        if not self.ready:
            raise errors.unavailable("workers are still loading; retry shortly")
        if not self.pool.can_serve():
            raise self.scheduler.no_worker()

    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise errors.unavailable("the tokenizer is still loading; retry shortly")
        return self.tokenizer

    async def _encode(self, inputs: Sequence[Input], task: str,
                      truncate: bool) -> list[np.ndarray]:
        tokenizer = self._tokenizer()
        t = task_named(task)
        if _chars(inputs) > INLINE_TOKENIZE_CHARS:
            return await self._off_loop(tokenizer.encode, inputs, t, truncate)
        return tokenizer.encode(inputs, t, truncate)

    async def embed(self, inputs: Sequence[Input], task: str, dimensions: int = 0,
                    truncate: bool = True, normalize: bool = True,
                    timeout_s: float | None = None,
                    caller: Hashable = "") -> EmbedOutcome:
        """Embed `inputs` for `caller` (the fairness unit: a connection or a stream); raises
        ServiceError with the status the client should see."""
        start = time.monotonic()
        self._admitting()
        try:
            spec = validate_embed(inputs, task, dimensions, self.limits, truncate, normalize)
            self._check_response_size(len(inputs), spec.dimensions)
            self.scheduler.check_room(caller, len(inputs))  # a full queue costs no tokenizing
            ids = await self._encode(inputs, task, truncate)
        except Exception as exc:
            raise errors.service_error(exc) from exc
        self._admitting()  # the drain may have begun while tokenizing
        deadline = start + timeout_s if timeout_s is not None else None
        job = Job(ids, spec.dimensions, spec.normalize, caller,
                  asyncio.get_running_loop().create_future(), time.monotonic(), deadline)
        self.scheduler.submit(job)
        self._active += 1
        self._idle.clear()
        try:
            await job.future
        except BaseException:  # cancelled, deadline, or a batch of it failed
            self.scheduler.cancel(job)  # its inputs still queued never reach a worker
            raise
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()
        self.metrics.queue_time.observe(job.queue_ms / 1e3)
        return EmbedOutcome(job.vectors, [len(x) for x in ids], spec.dimensions, job.queue_ms,
                            job.compute_ms, (time.monotonic() - start) * 1e3)

    def _check_response_size(self, n: int, dimensions: int) -> None:
        """Refuse before any work a request whose response could not be sent."""
        size = response_bytes(n, dimensions, self.bundle.manifest.model_id)
        if size > self.config.max_message_bytes:
            raise errors.ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"inputs: the response to {n} inputs of {dimensions} dimensions would be about "
                f"{size} bytes, over max_message_bytes {self.config.max_message_bytes}; send "
                "fewer inputs per request or ask for fewer dimensions", "inputs")

    async def tokenize(self, inputs: Sequence[str], task: str,
                       truncate: bool = True) -> list[tuple[list[int], list[str]]]:
        """The ids and pieces the model would see."""
        tokenizer = self._tokenizer()
        try:
            validate_embed(inputs, task, 0, self.limits, truncate)
            t = task_named(task)
            if _chars(inputs) > INLINE_TOKENIZE_CHARS:
                return await self._off_loop(tokenizer.tokenize, inputs, t, truncate)
            return tokenizer.tokenize(inputs, t, truncate)
        except Exception as exc:
            raise errors.service_error(exc) from exc

    def info(self) -> dict:
        m = self.bundle.manifest
        return {
            "model_id": m.model_id, "dimensions": m.dimensions.max,
            "min_dimensions": m.dimensions.min, "max_dimensions": m.dimensions.max,
            "max_tokens": m.max_tokens, "precision": m.precision,
            "workers": self.config.workers, "bundle_hash": self.bundle.digest,
            "moe_mode": m.moe_mode, "max_inputs": self.config.max_inputs,
            "max_batch_tokens": self.config.max_batch_tokens,
        }
