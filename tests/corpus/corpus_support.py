"""Helpers of the corpus tests: a corpus with every kind of row, `moe-embed batch` as a real
process, and the output read back."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from moe_embed.service.tasks import task_named
from moe_embed.service.tokenizer import Tokenizer

MOE_EMBED = str(Path(sys.executable).with_name("moe-embed"))


def a_tokens(counter: Tokenizer, task: str, n: int) -> str:
    """A text the model sees as exactly `n` ids under `task` ("a a a ...": one id a word)."""
    t = task_named(task)
    base = len(counter.full_ids(t.apply("a")))
    text = " ".join(["a"] * (n - base + 1))
    assert len(counter.full_ids(t.apply(text))) == n
    return text


def corpus_rows(texts: list[str], counter: Tokenizer, task: str) -> list[dict]:
    """Unicode texts, 512 and 513 tokens, a long text, empty and blank texts, a missing field,
    a duplicate id, and rows with no id (their row number stands in)."""
    rows: list[dict] = [{"id": f"m{i}", "text": t} for i, t in enumerate(texts)]
    rows += [{"id": "exactly-512", "text": a_tokens(counter, task, 512)},
             {"id": "exactly-513", "text": a_tokens(counter, task, 513)},
             {"id": "long", "text": " ".join(texts) * 3},
             {"id": "empty", "text": ""},
             {"id": "blank", "text": "  \t "},
             {"id": "no-text", "body": "the text is missing"},
             {"id": "m0", "text": "a duplicate id: " + texts[1]},
             {"text": "no id: " + texts[2]}]
    return rows


def write_jsonl(path: Path, rows: list[dict], bad_line_at: int | None = None) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            if i == bad_line_at:
                f.write('{"id": "broken", "text": \n')
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        for r in rows:  # a CSV row always has both cells: a missing text is an empty cell
            w.writerow([r.get("id", ""), r.get("text", "")])
    return path


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 7) -> Path:
    pq.write_table(pa.table({"id": [r.get("id") for r in rows],
                             "text": [r.get("text") for r in rows]}), path,
                   row_group_size=row_group_size)
    return path


def run_batch(*args: str, timeout: float = 300, check: bool = True,
              **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([MOE_EMBED, "batch", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def start_batch(*args: str, log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen([MOE_EMBED, "batch", *args], stdout=f, stderr=subprocess.STDOUT)


def committed(out: Path) -> int:
    """Shards listed in the output's manifest (0 before it exists)."""
    try:
        return len(json.loads((out / "_manifest.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def wait_committed(out: Path, shards: int, proc: subprocess.Popen, log: Path,
                   timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while committed(out) < shards:
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < end, f"no {shards} shards committed within {timeout}s"
        time.sleep(0.01)


def read_output(out: Path) -> pa.Table:
    return ds.dataset(out, format="parquet").to_table()


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.name.startswith("part-")}


def signal_all(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
