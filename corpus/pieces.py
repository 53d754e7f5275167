"""From input rows to what is embedded (pieces) and back to output rows.

A row becomes one piece (its whole text, truncated by the model if long), or with chunking one
piece per token window; a row with an error becomes one piece with nothing to embed. Each
piece gets a Result, and the pieces with their results become the output table's rows, in
input order. Shared by the CLI's job and RayEmbedder, so both write the same columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .chunking import Chunker
from .records import Record


@dataclass(frozen=True)
class Piece:
    record: Record
    chunk: int | None = None  # window index; None without chunking or for an error row
    char_start: int | None = None
    char_end: int | None = None

    @property
    def text(self) -> str | None:
        """What is embedded: the row's text, or its window's span; None for an error row."""
        text = self.record.text
        if text is None or self.char_start is None:
            return text
        return text[self.char_start:self.char_end]


@dataclass(frozen=True)
class Result:
    vector: np.ndarray | None = None  # float32 [d]; None when the piece failed
    tokens: int | None = None
    truncated: bool | None = None
    error: str | None = None


def split(records: Sequence[Record], chunker: Chunker | None) -> list[Piece]:
    """The pieces of `records`, in order."""
    out: list[Piece] = []
    for r in records:
        if r.text is None or chunker is None:
            out.append(Piece(r))
            continue
        out.extend(Piece(r, i, a, b) for i, (a, b) in enumerate(chunker.spans(r.text)))
    return out


def schema(dimensions: int, chunked: bool) -> pa.Schema:
    """The output columns (the README documents them)."""
    fields = [pa.field("id", pa.string(), nullable=False)]
    if chunked:
        fields += [pa.field("chunk", pa.int32()), pa.field("char_start", pa.int64()),
                   pa.field("char_end", pa.int64())]
    fields += [pa.field("vector", pa.list_(pa.float32(), dimensions)),
               pa.field("tokens", pa.int32()), pa.field("truncated", pa.bool_()),
               pa.field("error", pa.string())]
    return pa.schema(fields)


def table(pieces: Sequence[Piece], results: Sequence[Result], dimensions: int,
          chunked: bool) -> pa.Table:
    """The output rows of `pieces`, in order."""
    n = len(pieces)
    flat = np.zeros((n, dimensions), dtype=np.float32)
    valid = np.zeros(n, dtype=bool)
    for i, r in enumerate(results):
        if r.vector is not None:
            flat[i] = r.vector
            valid[i] = True
    values = pa.array(flat.reshape(-1), type=pa.float32())
    vectors = pa.FixedSizeListArray.from_arrays(values, dimensions,
                                                mask=pa.array(~valid, type=pa.bool_()))
    cols: dict[str, pa.Array] = {"id": pa.array([p.record.id for p in pieces], pa.string())}
    if chunked:
        cols["chunk"] = pa.array([p.chunk for p in pieces], pa.int32())
        cols["char_start"] = pa.array([p.char_start for p in pieces], pa.int64())
        cols["char_end"] = pa.array([p.char_end for p in pieces], pa.int64())
    cols["vector"] = vectors
    cols["tokens"] = pa.array([r.tokens for r in results], pa.int32())
    cols["truncated"] = pa.array([r.truncated for r in results], pa.bool_())
    cols["error"] = pa.array([r.error for r in results], pa.string())
    return pa.table(cols, schema=schema(dimensions, chunked))
