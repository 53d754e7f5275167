"""The corpus readers on real files: JSONL, CSV and Parquet with unicode, empty and blank texts,
a bad row, a missing field, duplicate ids, no id column; and resuming from a row."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_embed.batch.readers import InputError, open_reader

UNICODE = "Ünïcödé 漢字 😀 عربى"


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _rows(path: Path, start: int = 0, **kw) -> list:
    return list(open_reader(path, **kw).records(start))


def test_jsonl_rows_in_order_with_every_kind_of_bad_row(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "in.jsonl", [
        json.dumps({"id": "a", "text": UNICODE}, ensure_ascii=False),
        json.dumps({"id": 7, "text": "int id"}),
        json.dumps({"text": "no id"}),
        "",  # a blank line is not a row
        json.dumps({"id": "e", "text": ""}),
        json.dumps({"id": "w", "text": " \t\n"}),
        json.dumps({"id": "m", "body": "no text field"}),
        json.dumps({"id": "n", "text": None}),
        json.dumps({"id": "x", "text": 12}),
        "{not json",
        json.dumps(["a list"]),
        json.dumps({"id": "a", "text": "duplicate id"}),
        json.dumps({"id": [1], "text": "list id"}),
        json.dumps({"id": "s", "text": "lone \ud800 surrogate"}),
    ])
    rows = _rows(path)
    assert [r.row for r in rows] == list(range(13))
    assert [(r.id, r.text) for r in rows[:3]] == [("a", UNICODE), ("7", "int id"),
                                                  ("2", "no id")]
    errors = [r.error for r in rows]
    assert errors[:3] == [None, None, None]
    assert errors[3] == "field 'text' is empty"
    assert errors[4] == "field 'text' is blank (only whitespace)"
    assert errors[5] == "no field 'text'"
    assert errors[6] == "field 'text' is null"
    assert errors[7] == "field 'text' must be a string, not int"
    assert errors[8].startswith("row 8 (line 10): not valid JSON")
    assert errors[9] == "row 9 (line 11): not a JSON object but a list"
    assert (rows[10].id, rows[10].text, rows[10].error) == ("a", "duplicate id", None)
    assert (rows[11].id, rows[11].error) == ("11", "field 'id' must be a string or an integer, "
                                                   "not list")
    assert rows[12].error == "field 'text' is not valid Unicode (a lone surrogate at character 5)"
    assert [r.id for r in rows[3:10]] == ["e", "w", "m", "n", "x", "8", "9"]


def test_jsonl_invalid_utf8_is_a_bad_row_not_a_failed_job(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n{"text": "after"}\n')
    rows = _rows(path)
    assert rows[1].error.startswith("row 1 (line 2): not valid UTF-8")
    assert [r.text for r in rows] == ["ok", None, "after"]


def test_resume_skips_exactly_the_committed_rows(tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"t{i}"}) for i in range(7)]
    path = _jsonl(tmp_path / "in.jsonl", lines[:3] + [""] + lines[3:])
    for start in (0, 1, 3, 6, 7):
        rows = _rows(path, start)
        assert [r.row for r in rows] == list(range(start, 7))
        assert [r.text for r in rows] == [f"t{i}" for i in range(start, 7)]


def test_csv_quoted_multiline_unicode_and_field_counts(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    long = "x" * 200_000  # past the csv module's default field size limit
    path.write_text(
        "\ufeffid,text,extra\n"
        f'1,"{UNICODE}, with a comma",a\n'
        '2,"two\nlines",b\n'
        ",no id,c\n"
        "4,,d\n"
        "5,too,many,fields\n"
        "\n"
        f"6,{long},e\n"
        "1,duplicate,f\n", encoding="utf-8")
    rows = _rows(path)
    assert [(r.id, r.text) for r in rows[:3]] == [("1", f"{UNICODE}, with a comma"),
                                                  ("2", "two\nlines"), ("2", "no id")]
    assert rows[3].error == "field 'text' is empty"
    assert rows[4].error == "row 4 (line 7): 4 fields where the header has 3"
    assert (rows[5].id, len(rows[5].text)) == ("6", 200_000)
    assert (rows[6].id, rows[6].text) == ("1", "duplicate")
    assert [r.row for r in _rows(path, 5)] == [5, 6]


def test_csv_and_parquet_without_the_text_column_are_refused_up_front(tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text("id,body\n1,x\n")
    with pytest.raises(InputError, match=r"no column 'text' \(--text-field\); the header has: "
                                         r"id, body"):
        _rows(tmp_path / "in.csv")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "in.parquet")
    with pytest.raises(InputError, match="no column 'text'.*the file has: body"):
        open_reader(tmp_path / "in.parquet")


def test_parquet_batches_nulls_types_and_resume(tmp_path: Path, monkeypatch) -> None:
    import moe_embed.batch.readers as readers

    monkeypatch.setattr(readers, "PARQUET_BATCH_ROWS", 3)  # several batches from a small file
    texts = [f"doc {i} {UNICODE}" for i in range(8)] + [None, "", "last"]
    ids = list(range(100, 111))
    ids[2] = None
    pq.write_table(pa.table({"doc": texts, "key": pa.array(ids, pa.int64())}),
                   tmp_path / "in.parquet", row_group_size=4)
    reader = open_reader(tmp_path / "in.parquet", text_field="doc", id_field="key")
    assert reader.total_rows == 11
    rows = list(reader.records())
    assert reader.fraction() == 1.0
    assert [r.id for r in rows] == ["100", "101", "2"] + [str(i) for i in range(103, 111)]
    assert rows[8].error == "field 'doc' is null"
    assert rows[9].error == "field 'doc' is empty"
    for start in (0, 2, 3, 4, 10, 11):
        assert [r.row for r in reader.records(start)] == list(range(start, 11))


def test_an_unknown_extension_or_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"unknown input format '\.txt'; expected one of "
                                         r"\.jsonl, \.csv, \.parquet"):
        open_reader(tmp_path / "in.txt")
    with pytest.raises(InputError, match="no such file"):
        open_reader(tmp_path / "missing.jsonl")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        open_reader(tmp_path / "bad.parquet")
