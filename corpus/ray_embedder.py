"""`RayEmbedder`: the batch job's embedding step as a Ray Data `map_batches` class.

    import ray
    from moe_embed.batch import RayEmbedder

    ds = ray.data.read_parquet("docs.parquet")
    ds = ds.map_batches(RayEmbedder, fn_constructor_kwargs={"bundle": "/models/bundle",
                        "task": "search_document"}, batch_size=256,
                        compute=ray.data.ActorPoolStrategy(size=4), num_cpus=2)
    ds.write_parquet("vectors/")

Ray constructs one per actor: the bundle is loaded once there and runs in the actor's process
(the same ONNX Runtime graphs the workers run, `threads` ORT threads). Each call takes a batch in
any of Ray's formats (pyarrow, pandas, numpy) and returns a pyarrow Table with the CLI's columns
and rows, in the batch's order. Ray Data batches carry no row numbers, so unlike the CLI the
input needs its id column.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pyarrow as pa

from .chunking import chunker_for
from .embedding import Embedded, embed_sync, results, texts_of
from .pieces import split, table
from .records import record_from

MAX_INPUTS = 256


def _column(batch: Any, name: str) -> list | None:
    """The values of column `name` of a Ray batch as Python objects; None if absent."""
    if isinstance(batch, pa.Table):
        return batch.column(name).to_pylist() if name in batch.column_names else None
    if isinstance(batch, dict):  # numpy format: {name: ndarray}
        return batch[name].tolist() if name in batch else None
    if hasattr(batch, "columns"):  # pandas
        if name not in batch.columns:
            return None
        return [None if isinstance(v, float) and math.isnan(v) else v
                for v in batch[name].tolist()]
    raise TypeError(f"RayEmbedder: unsupported batch type {type(batch).__name__}; use "
                    "batch_format 'pyarrow', 'pandas' or 'numpy'")


class RayEmbedder:
    """Embeds Ray Data batches like `moe-embed batch` embeds a file (same options, same
    columns)."""

    def __init__(self, *, task: str, bundle: str | Path | None = None, dimensions: int = 0,
                 normalize: bool = True, chunk_tokens: int = 0, chunk_overlap: int = 0,
                 text_field: str = "text", id_field: str = "id",
                 threads: int | None = None) -> None:
        from moe_embed.service.local import LocalEmbedder
        from moe_embed.service.tasks import task_named
        from moe_embed.service.validation import resolve_dimensions

        if bundle is None:
            from moe_embed.service.demo import ensure_demo_bundle

            bundle = ensure_demo_bundle()
        self.embedder = LocalEmbedder(bundle, threads)
        self.task = task_named(task)
        self.dimensions = resolve_dimensions(dimensions, self.embedder.limits)
        self.normalize = normalize
        self.text_field, self.id_field = text_field, id_field
        self.counter = self.embedder.tokenizer
        self.chunker = chunker_for(self.embedder.bundle, self.counter, self.task, chunk_tokens,
                                   chunk_overlap)

    def _call(self, texts: list[str]) -> Embedded:
        got = self.embedder.embed(texts, self.task.name, self.dimensions,
                                  normalize=self.normalize)
        return Embedded(list(got.vectors), got.tokens, got.truncated)

    def __call__(self, batch: Any) -> pa.Table:
        texts = _column(batch, self.text_field)
        if texts is None:
            raise ValueError(f"RayEmbedder: the batch has no column '{self.text_field}' "
                             "(text_field)")
        ids = _column(batch, self.id_field)
        if ids is None:
            raise ValueError(f"RayEmbedder: the batch has no column '{self.id_field}' "
                             "(id_field); Ray Data batches carry no row numbers to stand in "
                             "for ids")
        records = [record_from({self.text_field: t, self.id_field: i}, row, self.text_field,
                               self.id_field)
                   for row, (t, i) in enumerate(zip(texts, ids, strict=True))]
        pieces = split(records, self.chunker)
        todo, todo_texts = texts_of(pieces)
        outcomes = embed_sync(self._call, todo_texts, MAX_INPUTS)
        res = results(pieces, todo, outcomes)
        return table(pieces, res, self.dimensions, self.chunker is not None)
