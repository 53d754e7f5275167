"""The output: a directory of Parquet shards and `_manifest.json`, committed crash-safely.

Layout: OUT/part-000000.parquet, part-000001.parquet, ... each holding the output rows of
`shard_rows` consecutive input rows (all chunks of a row in the same shard), in input order;
OUT/_manifest.json records what produced the output (`job`) and the shards committed so far.
Parquet readers (pyarrow.dataset, pandas, Ray, DuckDB, Spark) read the directory as one table
and skip names starting with `_` or `.`.

Commit protocol for shard k (each step survives SIGKILL at any instant):
1. write `.part-k.parquet.tmp`, fsync it; 2. rename it to `part-k.parquet`, fsync the
directory; 3. write `.manifest.json.tmp` listing shard k (its rows and bytes), fsync it, rename
it over `_manifest.json`, fsync the directory. A shard is committed once step 3's rename is
done. On `--resume`, files the manifest does not list (a temp file, or a shard renamed but not
yet listed) are deleted and their rows embedded again; input is read from the first row of the
first uncommitted shard. Shard boundaries depend only on the input row numbers, and fp32 vectors
not at all on batching, so a resumed output is the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "_manifest.json"
FORMAT = 1
SHARD = re.compile(r"^part-(\d{6})\.parquet$")


class OutputError(ValueError):
    """The output directory cannot be used as asked (exists, or a different job's)."""


def shard_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    """`data` in `path` under a temporary name, flushed to disk, then renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass
class Progress:
    """What the committed shards hold."""

    shards: int = 0
    input_rows: int = 0
    output_rows: int = 0


class ShardWriter:
    """Opens (or resumes) OUT for the job described by `job`; commits one shard at a time."""

    def __init__(self, out: str | Path, job: dict[str, Any], resume: bool) -> None:
        self.out = Path(out)
        self.job = job
        self.manifest_path = self.out / MANIFEST
        if self.manifest_path.exists():
            if not resume:
                raise OutputError(f"{self.out} already holds a job's output; add --resume to "
                                  "continue it, or choose another --out")
            self.manifest = self._load()
        else:
            if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
                raise OutputError(f"{self.out} exists and is not a moe-embed batch output "
                                  f"(no {MANIFEST}); choose another --out")
            self.out.mkdir(parents=True, exist_ok=True)
            self.manifest = {"format": FORMAT, "job": job, "complete": False, "shards": []}
            self._save()
        self._clean()

    # -- resume ----------------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        try:
            manifest = json.loads(self.manifest_path.read_text())
            old = manifest["job"]
            manifest["shards"]  # noqa: B018 (present)
        except (ValueError, KeyError, TypeError) as exc:
            raise OutputError(f"{self.manifest_path}: unreadable manifest: {exc}") from exc
        if manifest.get("format") != FORMAT:
            raise OutputError(f"{self.manifest_path}: format {manifest.get('format')!r}, this "
                              f"version writes {FORMAT}")
        differ = sorted(k for k in set(old) | set(self.job) if old.get(k) != self.job.get(k))
        if differ:
            shown = "; ".join(f"{k}: output has {old.get(k)!r}, this run {self.job.get(k)!r}"
                              for k in differ)
            raise OutputError(f"{self.out} was produced by a different job; --resume refuses "
                              f"to mix them ({shown})")
        for entry in manifest["shards"]:
            path = self.out / entry["file"]
            if not path.is_file() or path.stat().st_size != entry["bytes"]:
                raise OutputError(f"{path}: committed shard is missing or changed size; the "
                                  "output is damaged, start again with another --out")
        return manifest

    def _clean(self) -> None:
        """Delete whatever the manifest does not list: temp files, uncommitted shards."""
        keep = {e["file"] for e in self.manifest["shards"]} | {MANIFEST}
        for path in self.out.iterdir():
            if path.name in keep:
                continue
            if SHARD.match(path.name) or (path.name.startswith(".") and
                                          path.name.endswith(".tmp")):
                path.unlink()

    # -- state -----------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def committed(self) -> Progress:
        shards = self.manifest["shards"]
        return Progress(len(shards), sum(e["rows"] for e in shards),
                        sum(e["output_rows"] for e in shards))

    # -- writing ---------------------------------------------------------------------------
    def commit(self, table: pa.Table, first_row: int, rows: int) -> None:
        """Write the shard holding input rows [first_row, first_row + rows), then list it."""
        done = self.committed
        if first_row != done.input_rows:
            raise AssertionError(f"shard starts at row {first_row}, expected {done.input_rows}")
        name = shard_name(done.shards)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        _write_durably(self.out / name, data)
        self.manifest["shards"].append({"file": name, "first_row": first_row, "rows": rows,
                                        "output_rows": table.num_rows, "bytes": len(data)})
        self._save()

    def finish(self) -> None:
        self.manifest["complete"] = True
        self._save()

    def _save(self) -> None:
        _write_durably(self.manifest_path,
                       (json.dumps(self.manifest, indent=1, ensure_ascii=False) + "\n").encode())
