"""Streaming readers of the input file (chosen by extension): JSONL, CSV, Parquet.

Each yields Records in file order, holding only a small part of the file at a time, and says
how far through the file it is (for the progress ETA). `records(start)` skips the first
`start` data rows (a resumed job). A row that cannot be parsed is a Record with an error;
a file that cannot be read at all (no such text column, not Parquet) is an InputError.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .records import MISSING, Record, bad_row, record_from

PARQUET_BATCH_ROWS = 1024
FORMATS = (".jsonl", ".csv", ".parquet")


class InputError(ValueError):
    """The input file as a whole cannot be read as asked."""


class _Reader:
    def __init__(self, path: Path, text_field: str, id_field: str) -> None:
        self.path = path
        self.text_field = text_field
        self.id_field = id_field
        self.size = path.stat().st_size
        self._file: BinaryIO | None = None
        self.total_rows: int | None = None  # known up front only for Parquet
        self.finished = False  # every row has been read

    def fraction(self) -> float:
        """Share of the input read so far (bytes; rows for Parquet)."""
        if self.finished:
            return 1.0
        if self._file is None or self._file.closed or not self.size:
            return 0.0
        return min(1.0, self._file.tell() / self.size)

    def records(self, start: int = 0) -> Iterator[Record]:
        raise NotImplementedError


class JsonlReader(_Reader):
    """One JSON object per line; blank lines are skipped (they are not rows)."""

    def records(self, start: int = 0) -> Iterator[Record]:
        row = 0
        with open(self.path, "rb") as f:
            self._file = f
            for line_no, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                if row < start:
                    row += 1
                    continue
                yield self._record(raw, row, line_no)
                row += 1
        self.finished = True

    def _record(self, raw: bytes, row: int, line: int) -> Record:
        try:
            obj = json.loads(raw)
        except UnicodeDecodeError as exc:
            return bad_row(row, f"not valid UTF-8 ({exc.reason} at byte {exc.start})", line)
        except json.JSONDecodeError as exc:
            return bad_row(row, f"not valid JSON ({exc.msg} at character {exc.pos})", line)
        if not isinstance(obj, dict):
            return bad_row(row, f"not a JSON object but a {type(obj).__name__}", line)
        return record_from(obj, row, self.text_field, self.id_field)


class CsvReader(_Reader):
    """A header row, then one row per line (RFC 4180 quoting: a text may span lines). An
    empty id cell counts as no id."""

    def records(self, start: int = 0) -> Iterator[Record]:
        csv.field_size_limit(sys.maxsize)  # a document may be far longer than 128 KiB
        with open(self.path, "rb") as f:
            self._file = f
            text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
            reader = csv.reader(text)
            try:
                header = next(reader)
            except StopIteration:
                self.finished = True
                return
            except (csv.Error, UnicodeDecodeError) as exc:
                raise InputError(f"{self.path}: cannot read the CSV header: {exc}") from exc
            if self.text_field not in header:
                raise InputError(f"{self.path}: no column '{self.text_field}' (--text-field); "
                                 f"the header has: {', '.join(header)}")
            row = 0
            while True:
                try:
                    cells = next(reader)
                except StopIteration:
                    self.finished = True
                    return
                except (csv.Error, UnicodeDecodeError) as exc:
                    raise InputError(f"{self.path}: line {reader.line_num}: {exc}") from exc
                if not cells:
                    continue  # a blank line is not a row
                if row >= start:
                    yield self._record(header, cells, row, reader.line_num)
                row += 1

    def _record(self, header: list[str], cells: list[str], row: int, line: int) -> Record:
        if len(cells) != len(header):
            return bad_row(row, f"{len(cells)} fields where the header has {len(header)}", line)
        fields: dict = dict(zip(header, cells, strict=True))
        if fields.get(self.id_field) == "":
            fields[self.id_field] = MISSING
        return record_from(fields, row, self.text_field, self.id_field)


class ParquetReader(_Reader):
    """Only the text and id columns are read, a batch of rows at a time."""

    def __init__(self, path: Path, text_field: str, id_field: str) -> None:
        super().__init__(path, text_field, id_field)
        import pyarrow.parquet as pq

        try:
            self._pf = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises ArrowInvalid and OSError subclasses
            raise InputError(f"{path}: not a readable Parquet file: {exc}") from exc
        names = self._pf.schema_arrow.names
        if text_field not in names:
            raise InputError(f"{path}: no column '{text_field}' (--text-field); the file has: "
                             f"{', '.join(names)}")
        self.columns = [text_field] + ([id_field] if id_field in names else [])
        self.total_rows = self._pf.metadata.num_rows
        self._done = 0

    def fraction(self) -> float:
        if self.finished:
            return 1.0
        return min(1.0, self._done / self.total_rows) if self.total_rows else 0.0

    def records(self, start: int = 0) -> Iterator[Record]:
        row = 0
        for batch in self._pf.iter_batches(PARQUET_BATCH_ROWS, columns=self.columns):
            if row + batch.num_rows <= start:
                row += batch.num_rows
                continue
            for fields in batch.to_pylist():
                if row >= start:
                    yield record_from(fields, row, self.text_field, self.id_field)
                row += 1
                self._done = row
        self.finished = True


READERS = {".jsonl": JsonlReader, ".csv": CsvReader, ".parquet": ParquetReader}


def open_reader(path: str | Path, text_field: str = "text", id_field: str = "id") -> _Reader:
    """The reader for `path`'s extension, or InputError."""
    path = Path(path)
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"{path}: unknown input format '{path.suffix}'; expected one of "
                         f"{', '.join(FORMATS)}")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    return kind(path, text_field, id_field)
