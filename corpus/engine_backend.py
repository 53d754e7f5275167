"""In-process backend: the service's own engine and worker pool, on this machine's cores.

The only module of the batch package that touches `moe_embed.service.engine`: when the
engine's constructor or outcome changes, this adapter is what changes.
"""

from __future__ import annotations

from pathlib import Path

from moe_embed.service.config import (
    ServeConfig,
    available_cores,
    default_threads,
    default_workers,
)
from moe_embed.service.engine import Engine
from moe_embed.service.errors import Code, EngineError, InvalidInput
from moe_embed.service.grpc_api import GRPC_STATUS
from moe_embed.service.metrics import Metrics
from moe_embed.service.validation import Limits, resolve_dimensions
from moe_embed.workers.bundle.format import Bundle

from .embedding import CALL_CHARS, Embedded
from .retry import RETRYABLE, BackendError, Retryable, with_retries

MAX_INPUTS = 256  # texts per engine call (the engine batches them with other calls)
CONCURRENCY = 8  # calls in flight: keeps every worker's queue full while results are written
MAX_RESPONSE_BYTES = 64 << 20  # no wire here: only bounds one call's vectors


class EngineBackend:
    """`await start()`, `await embed(texts)`, `await close()`."""

    name = "in-process"
    max_inputs = MAX_INPUTS
    max_chars = CALL_CHARS
    concurrency = CONCURRENCY

    def __init__(self, bundle: str | Path, task: str, dimensions: int, normalize: bool,
                 workers: int | None = None, threads: int | None = None,
                 log_level: str = "warning") -> None:
        self.bundle = Bundle.load(bundle, verify=False)  # the workers verify every hash
        self.task = task
        self.dimensions = dimensions
        self.normalize = normalize
        cores = available_cores()
        n = workers or default_workers(cores)
        self.config = ServeConfig(bundle=str(self.bundle.path), workers=n,
                                  threads_per_worker=threads or default_threads(cores, n),
                                  max_inputs=MAX_INPUTS, max_message_bytes=MAX_RESPONSE_BYTES,
                                  log_level=log_level)
        self.engine: Engine | None = None

    async def start(self) -> dict:
        """Start the workers; what produces the vectors (for the output's manifest)."""
        resolve_dimensions(self.dimensions, Limits.of(self.bundle))  # a bad value: no workers
        self.engine = Engine(self.config, self.bundle.path, Metrics())
        await self.engine.start()
        info = self.engine.info()
        return {"model_id": info["model_id"], "bundle_hash": info["bundle_hash"],
                "precision": info["precision"],
                "dimensions": resolve_dimensions(self.dimensions, Limits.of(self.bundle))}

    async def embed(self, texts: list[str]) -> Embedded:
        return await with_retries(lambda: self._once(texts))

    async def _once(self, texts: list[str]) -> Embedded:
        assert self.engine is not None, "start() first"
        try:
            outcome = await self.engine.embed(texts, self.task, self.dimensions, truncate=True,
                                              normalize=self.normalize, caller="batch")
        except EngineError as exc:
            if exc.code == Code.INVALID_ARGUMENT and exc.index is not None:
                raise InvalidInput(exc.field or "inputs", exc.detail, exc.index) from exc
            status = GRPC_STATUS[exc.code]  # the statuses the remote backend sees, alike
            if status in RETRYABLE:
                raise Retryable(self.name, status, exc.message) from exc
            raise BackendError(self.name, status, exc.message) from exc
        return Embedded(outcome.vectors, outcome.token_counts, outcome.truncated)

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.close()
            self.engine = None
