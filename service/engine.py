"""The engine: the one API behind every protocol adapter (validate -> tokenize -> queue ->
vectors), and the server's state those adapters report (readiness, drain, the last call).

It knows no protocol: it takes plain values, returns an `EmbedOutcome`, and fails with an
`EngineError` (service/errors.py) that each adapter maps to its own status. A request is checked
once, by the validator the in-process API uses too, before any work is queued, so a bad request
never costs a worker or another request's result; tokenization of anything but small requests
runs off the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from ..workers.bundle.format import Bundle
from . import errors
from .batching import BatchQueue, Job
from .config import ServeConfig
from .metrics import Metrics
from .model_info import ModelInfo
from .scheduler import Scheduler
from .tokenizer import T, Tokenizer, pair
from .tracing import Tracing, now_ns
from .validation import Input, Limits, ValidRequest, validate_embed
from .worker_pool import WorkerPool

INLINE_TOKENIZE_CHARS = 4096  # larger requests are tokenized in the tokenizing thread
# ...in parts of about this many characters each, one job per part: a request of 256 long texts
# (a big Tokenize: ~0.2-0.8 s) held the one thread whole, and every large request behind it
# waited, its message alive meanwhile (a 3.9 MB input's copies: p90 362 ms against 87 beside
# big Tokenize calls). Each part is queued when the last ends, so the thread takes turns.
TOKENIZE_JOB_CHARS = 16384
INLINE_IDS = 4096  # requests with more token ids are validated in the tokenizing thread

log = structlog.get_logger("moe_embed.engine")

ResponseSize = Callable[[int, int], int]  # (inputs, dimensions) -> bytes of a response


@dataclass
class EmbedOutcome:
    vectors: list[np.ndarray]  # float32, one per input, in input order
    token_counts: list[int]
    truncated: list[bool]  # per input: cut to the model's max tokens
    dimensions: int
    queue_ms: float
    compute_ms: float
    total_ms: float


def _chars(inputs: Sequence[Input]) -> int:
    return sum(len(x) for x in inputs if isinstance(x, str))


def _ids(inputs: Sequence[Input]) -> int:
    """Token ids in a request (lists of ids are inputs of the HTTP API)."""
    return sum(len(x) for x in inputs if isinstance(x, list))


class Engine:
    """Owns the tokenizer, the queue, the scheduler and the worker pool of one server."""

    def __init__(self, config: ServeConfig, bundle_path: str | Path, metrics: Metrics,
                 tracing: Tracing | None = None) -> None:
        self.config = config
        self.tracing = tracing or Tracing("", env={})
        self.bundle = Bundle.load(bundle_path, verify=False)  # workers verify every hash
        self.model = ModelInfo.of(self.bundle, config.served_model_name)
        self.limits = Limits.of(self.bundle, config.max_inputs)
        self.tokenizer: Tokenizer | None = None  # loaded in start(), while the workers load
        # one thread for large requests: the segmentation holds the GIL, and every thread that
        # wants it delays the event loop's next turn (a pool of threads made light calls wait
        # ~600 ms at p99 under a flood of large requests, one thread ~90 ms)
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="moe-embed-tokenize")
        self.metrics = metrics
        self.draining = False
        self.last_call = time.monotonic()  # when the latest call began (the drain's lame duck)
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.pool = WorkerPool(self.bundle.path, config.workers, config.threads_per_worker,
                               config.log_level, metrics, share_weights=config.share_weights,
                               nice=config.worker_nice)
        self.scheduler = Scheduler(BatchQueue(config.max_batch_tokens, config.max_queue),
                                   self.pool, metrics, config.max_wait_ms / 1e3,
                                   config.batch_timeout_s, self.tracing,
                                   self.bundle.manifest.precision)

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

    def readiness(self) -> str:
        """`ok`, or why this server should not be sent work: `draining`, `loading`,
        `no_worker`."""
        if self.draining:
            return "draining"
        if not self.ready:
            return "loading"
        if not self.pool.ready_count:
            return "no_worker"
        return "ok"

    def note_call(self) -> None:
        """A call has just come in (any protocol): the drain waits for calls to stop."""
        self.last_call = time.monotonic()

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

    async def _encode(self, req: ValidRequest) -> tuple[list[np.ndarray], list[bool]]:
        tokenizer = self._tokenizer()
        if _chars(req.inputs) <= INLINE_TOKENIZE_CHARS:
            return tokenizer.encode_marked(req.inputs, req.task, req.truncate)
        ids: list[np.ndarray] = []
        cut: list[bool] = []
        for start, end in tokenizer.job_parts(req.inputs, TOKENIZE_JOB_CHARS):
            part = await self._off_loop(tokenizer.encode_marked, req.inputs[start:end],
                                        req.task, req.truncate, start)
            ids += part[0]
            cut += part[1]
        return ids, cut

    def check_model(self, name: str | None) -> None:
        """NOT_FOUND unless `name` (None: not given) names the served model."""
        if name is not None and not self.model.serves(name):
            raise errors.not_found("model", f"model {name!r} is not served here; this server "
                                   f"serves {self.model.name!r} (GET /v1/models)")

    async def embed(self, inputs: Sequence[Input], task: str | int | None, dimensions: int = 0,
                    truncate: bool = True, normalize: bool = True,
                    timeout_s: float | None = None, caller: Hashable = "",
                    response_size: ResponseSize | None = None) -> EmbedOutcome:
        """Embed `inputs` for `caller` (the fairness unit: a connection or a stream). Raises
        EngineError. `response_size` is the adapter's bound on its response's bytes: a request
        whose response could not be sent is refused before any work."""
        start = time.monotonic()
        self._admitting()
        try:
            req = await self._validate(inputs, task, dimensions, truncate, normalize)
            if response_size is not None:
                self._check_response_size(len(inputs), req.dimensions, response_size)
            # room is held while tokenizing: a full queue costs no tokenizing, and no backlog
            # of requests forms before the tokenizer (a flood's memory)
            self.scheduler.reserve(caller, len(inputs))
            try:
                with self.tracing.span("tokenize", inputs=len(inputs)):
                    ids, truncated = await self._encode(req)
            finally:
                self.scheduler.release(caller, len(inputs))
        except Exception as exc:
            raise errors.engine_error(exc) from exc
        self._admitting()  # the drain may have begun while tokenizing
        deadline = start + timeout_s if timeout_s is not None else None
        job = Job(ids, req.dimensions, req.normalize, caller,
                  asyncio.get_running_loop().create_future(), time.monotonic(), deadline)
        if self.tracing.enabled:
            job.span, job.admitted_ns = self.tracing.current(), now_ns()
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
        if job.span is not None:
            self.tracing.past_span("queue", job.span, job.admitted_ns,
                                   job.admitted_ns + int(job.queue_ms * 1e6), inputs=len(ids))
        if any(truncated):
            self.metrics.truncated.inc(sum(truncated))
        return EmbedOutcome(job.vectors, [len(x) for x in ids], truncated, req.dimensions,
                            job.queue_ms, job.compute_ms, (time.monotonic() - start) * 1e3)

    async def _validate(self, inputs: Sequence[Input], task: str | int | None, dimensions: int,
                        truncate: bool, normalize: bool = True) -> ValidRequest:
        """validate_embed, in the tokenizing thread for a request of many token ids: checking
        each id is work proportional to the body, which never runs on the event loop."""
        args = (inputs, task, dimensions, self.limits, truncate, normalize)
        if _ids(inputs) > INLINE_IDS:
            return await self._off_loop(validate_embed, *args)
        return validate_embed(*args)

    def _check_response_size(self, n: int, dimensions: int, size_of: ResponseSize) -> None:
        size = size_of(n, dimensions)
        if size > self.config.max_message_bytes:
            raise errors.too_large(
                "inputs", f"the response to {n} inputs of {dimensions} dimensions would be "
                f"about {size} bytes, over max_message_bytes {self.config.max_message_bytes}; "
                "send fewer inputs per request or ask for fewer dimensions")

    async def tokenize(self, inputs: Sequence[str], task: str | int | None,
                       truncate: bool = True, each: Callable[[list[int], list[str]], T]
                       = pair) -> list[T]:
        """The ids and pieces the model would see, input by input through `each` (in the
        tokenizing thread for a large request: an adapter builds its response there)."""
        tokenizer = self._tokenizer()
        try:
            req = await self._validate(inputs, task, 0, truncate)
            if _chars(inputs) <= INLINE_TOKENIZE_CHARS:
                return tokenizer.tokenize(req.inputs, req.task, truncate, each)
            out: list[T] = []
            for start, end in tokenizer.job_parts(req.inputs, TOKENIZE_JOB_CHARS):
                out += await self._off_loop(tokenizer.tokenize, req.inputs[start:end],
                                            req.task, truncate, each, start)
            return out
        except Exception as exc:
            raise errors.engine_error(exc) from exc

    def info(self) -> dict:
        m = self.bundle.manifest
        return {
            "model_id": self.model.name, "dimensions": m.dimensions.max,
            "min_dimensions": m.dimensions.min, "max_dimensions": m.dimensions.max,
            "max_tokens": m.max_tokens, "precision": m.precision,
            "workers": self.config.workers, "bundle_hash": self.bundle.digest,
            "moe_mode": m.moe_mode, "max_inputs": self.config.max_inputs,
            "max_batch_tokens": self.config.max_batch_tokens, "version": self.model.version,
        }
