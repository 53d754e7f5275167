"""One input row as the job sees it: its id, its text, or why it cannot be embedded.

Every reader (JSONL, CSV, Parquet, a Ray batch) turns its rows into Records with `record_from`,
so a missing field, a null, a number where a text belongs, an empty or blank text give the
same error whatever the format. A bad row becomes an output row with that error: it never
fails the job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MISSING = object()  # a field the row does not have (distinct from an explicit null)


@dataclass(frozen=True)
class Record:
    row: int  # 0-based index of the data row in the input
    id: str
    text: str | None  # None when `error` is set
    error: str | None = None


def _where(row: int, line: int | None) -> str:
    return f"row {row}" + (f" (line {line})" if line is not None else "")


def row_id(value: Any, row: int) -> str | None:
    """The id column's value as text: strings as they are, integers in decimal; absent or
    null -> the row number. None if the value cannot be an id."""
    if value is MISSING or value is None:
        return str(row)
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def record_from(fields: Mapping[str, Any], row: int, text_field: str, id_field: str) -> Record:
    """The Record of one parsed row; `fields` maps names to values (MISSING when absent).

    A field's error names the field; the output row's `id` (the row number when there is no
    id) names the row. The message does not depend on where the row came from, so the CLI and
    RayEmbedder write the same error for the same row."""
    rid = row_id(fields.get(id_field, MISSING), row)
    if rid is None:
        value = fields[id_field]
        return Record(row, str(row), None, f"field '{id_field}' must be a string or "
                      f"an integer, not {type(value).__name__}")
    text = fields.get(text_field, MISSING)
    if text is MISSING:
        return Record(row, rid, None, f"no field '{text_field}'")
    if text is None:
        return Record(row, rid, None, f"field '{text_field}' is null")
    if not isinstance(text, str):
        return Record(row, rid, None, f"field '{text_field}' must be a string, not "
                      f"{type(text).__name__}")
    if not text:
        return Record(row, rid, None, f"field '{text_field}' is empty")
    if text.isspace():
        return Record(row, rid, None, f"field '{text_field}' is blank (only "
                      "whitespace)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return Record(row, rid, None, f"field '{text_field}' is not valid Unicode "
                      f"(a lone surrogate at character {exc.start})")
    return Record(row, rid, text)


def bad_row(row: int, message: str, line: int | None = None) -> Record:
    """A row that could not be parsed at all (its id is its row number)."""
    return Record(row, str(row), None, f"{_where(row, line)}: {message}")
