"""The job loop: read a shard of rows, split it into pieces, embed them through a backend,
write and commit the shard; the next shard is embedding while one is written.

Reading, chunking, building and writing tables run in one helper thread, so the event loop
(and, in process, the engine's scheduler on it) keeps the workers fed meanwhile. At most
SHARDS_IN_FLIGHT shards are held at once, whatever the input's size: memory does not grow with
the corpus.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from moe_embed.service.tasks import task_named
from moe_embed.service.tokenizer import Tokenizer
from moe_embed.workers.bundle.format import Bundle, sha256_file

from . import pieces as out_rows
from .chunking import chunker_for
from .embedding import Embedded, embed_async, results, texts_of
from .progress import JobProgress
from .readers import open_reader
from .records import Record
from .shards import ShardWriter

SHARDS_IN_FLIGHT = 2
HEAD_BYTES = 1 << 20  # the input's identity: its size and the hash of its first MiB


class Backend(Protocol):
    name: str
    max_inputs: int
    max_chars: int  # characters of text per call (about 4 a token)
    concurrency: int

    async def start(self) -> dict: ...
    async def embed(self, texts: list[str]) -> Embedded: ...
    async def close(self) -> None: ...


@dataclass(frozen=True)
class JobOptions:
    input: Path
    out: Path
    task: str
    dimensions: int = 0
    normalize: bool = True
    text_field: str = "text"
    id_field: str = "id"
    chunk_tokens: int = 0  # 0 = no chunking: long texts are truncated
    chunk_overlap: int = 0
    shard_rows: int = 5000
    resume: bool = False
    progress: str = "auto"  # auto | bar | json | quiet


def input_identity(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
    return {"size": path.stat().st_size, "head_sha256": hashlib.sha256(head).hexdigest()}


def job_identity(opts: JobOptions, model: dict, tokenizer_sha256: str) -> dict[str, Any]:
    """Everything the output depends on; `--resume` refuses a run that differs in any."""
    return {**model, "tokenizer_sha256": tokenizer_sha256, "task": opts.task,
            "normalize": opts.normalize, "text_field": opts.text_field,
            "id_field": opts.id_field, "chunk_tokens": opts.chunk_tokens,
            "chunk_overlap": opts.chunk_overlap if opts.chunk_tokens else 0,
            "shard_rows": opts.shard_rows, "input": input_identity(opts.input)}


def _shards(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    while batch := list(itertools.islice(records, size)):
        yield batch


class Job:
    def __init__(self, opts: JobOptions, backend: Backend, tokenizer_bundle: str | Path) -> None:
        if opts.shard_rows < 1:
            raise ValueError(f"--shard-rows is {opts.shard_rows}; it must be at least 1")
        self.opts = opts
        self.backend = backend
        self.task = task_named(opts.task)
        bundle = Bundle.load(tokenizer_bundle, verify=False)
        self.tokenizer_file = bundle.file(bundle.manifest.tokenizer)
        self.counter = Tokenizer.from_bundle(bundle)
        self.chunker = chunker_for(bundle, self.counter, self.task, opts.chunk_tokens,
                                   opts.chunk_overlap)
        self.reader = open_reader(opts.input, opts.text_field, opts.id_field)
        self._cpu = ThreadPoolExecutor(1, thread_name_prefix="moe-embed-batch")

    async def _in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn, *args)

    async def run(self) -> ShardWriter:
        """Embed every row not yet committed; returns the finished output's writer."""
        model = await self.backend.start()
        try:
            return await self._run(model)
        finally:
            await self.backend.close()
            self._cpu.shutdown(wait=True)

    async def _run(self, model: dict) -> ShardWriter:
        dims = model["dimensions"]
        job = job_identity(self.opts, model, sha256_file(self.tokenizer_file))
        writer = await self._in_thread(ShardWriter, self.opts.out, job, self.opts.resume)
        if writer.complete:
            return writer
        start = writer.committed.input_rows
        shards = _shards(self.reader.records(start), self.opts.shard_rows)
        progress = JobProgress(self.opts.progress, start, self.reader.fraction())
        in_flight: deque = deque()
        first_row = start
        try:
            while True:
                prepared = await self._in_thread(self._next, shards)
                if prepared is None:
                    break
                records, pieces = prepared
                todo, texts = texts_of(pieces)
                embedding = asyncio.ensure_future(
                    embed_async(self.backend.embed, texts, self.backend.max_inputs,
                                self.backend.concurrency, self.backend.max_chars))
                in_flight.append((first_row, records, pieces, todo, embedding))
                first_row += len(records)
                if len(in_flight) >= SHARDS_IN_FLIGHT:
                    await self._commit(writer, dims, progress, *in_flight.popleft())
            while in_flight:
                await self._commit(writer, dims, progress, *in_flight.popleft())
            if writer.committed.shards == 0:  # an empty input: one empty shard, with the schema
                empty = out_rows.table([], [], dims, self.chunker is not None)
                await self._in_thread(writer.commit, empty, 0, 0)
            await self._in_thread(writer.finish)
        except BaseException:
            for *_, embedding in in_flight:
                embedding.cancel()
            progress.close("stopped")
            raise
        progress.close("done")
        return writer

    def _next(self, shards: Iterator[list[Record]]) -> tuple[list[Record], list] | None:
        records = next(shards, None)
        if records is None:
            return None
        return records, out_rows.split(records, self.chunker)

    async def _commit(self, writer: ShardWriter, dims: int, progress: JobProgress,
                      first_row: int, records: list[Record], pieces: list, todo: list[int],
                      embedding: asyncio.Future) -> None:
        outcomes = await embedding

        def finish() -> tuple[int, int]:
            res = results(pieces, todo, outcomes)
            table = out_rows.table(pieces, res, dims, self.chunker is not None)
            writer.commit(table, first_row, len(records))
            return table.num_rows, sum(r.tokens or 0 for r in res)

        output_rows, tokens = await self._in_thread(finish)
        progress.update(len(records), output_rows, tokens, self.reader.fraction())
