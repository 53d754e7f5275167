"""`moe-embed batch` in process, as a real process on real files with real worker processes:
output rows and their errors, truncation at 512/513 tokens, the three input formats agreeing,
chunking, and resume after SIGKILL and Ctrl-C giving the same bytes as an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from corpus_support import (
    committed,
    corpus_rows,
    read_output,
    run_batch,
    shard_bytes,
    signal_all,
    start_batch,
    wait_committed,
    write_csv,
    write_jsonl,
    write_parquet,
)

from moe_embed.batch.shards import OutputError, ShardWriter
from moe_embed.service.local import LocalEmbedder
from moe_embed.testing.procfs import descendants
from moe_embed.testing.service import IN_PROCESS_THREADS

TASK = "search_document"
FLAGS = ("--task", TASK, "--workers", "1", "--threads", "1")
MISSING_TEXT = {".csv": "field 'text' is empty", ".parquet": "field 'text' is null"}


@pytest.fixture(scope="module")
def local(tiny_bundle: Path) -> LocalEmbedder:
    return LocalEmbedder(tiny_bundle, IN_PROCESS_THREADS)  # the process-wide ORT pool


@pytest.fixture(scope="module")
def rows(multilingual_texts: list[str], local: LocalEmbedder) -> list[dict]:
    return corpus_rows(multilingual_texts, local.tokenizer, TASK)


@pytest.fixture(scope="module")
def jsonl_job(rows, tiny_bundle, tmp_path_factory) -> tuple[Path, Path]:
    """One uninterrupted run on the JSONL corpus (a bad line before row 3), 4 rows a shard."""
    d = tmp_path_factory.mktemp("jsonl")
    src = write_jsonl(d / "in.jsonl", rows, bad_line_at=3)
    run_batch(str(src), "--out", str(d / "out"), "--bundle", str(tiny_bundle),
              "--shard-rows", "4", "--quiet", *FLAGS)
    return src, d / "out"


def test_every_row_in_input_order_with_its_vector_or_error(jsonl_job, rows, local) -> None:
    _, out = jsonl_job
    got = read_output(out).to_pylist()
    inputs = rows[:3] + [{"id": "3"}] + rows[3:]  # the bad line is row 3: its id is "3"
    assert [r["id"] for r in got] == [r.get("id", str(i)) for i, r in enumerate(inputs)]
    by_error = {r["id"]: r["error"] for r in got if r["error"]}
    assert by_error == {
        "3": "row 3 (line 4): not valid JSON (Expecting value at character 26)",
        "empty": "field 'text' is empty", "blank": "field 'text' is blank (only whitespace)",
        "no-text": "no field 'text'"}
    for r, src in zip(got, inputs, strict=True):
        if r["error"]:
            assert (r["vector"], r["tokens"], r["truncated"]) == (None, None, None)
            continue
        alone = local.embed([src["text"]], TASK)
        assert np.array_equal(np.asarray(r["vector"], np.float32), alone.vectors[0]), r["id"]
        assert r["tokens"] == alone.tokens[0]
    flags = {r["id"]: r["truncated"] for r in got}
    assert (flags["exactly-512"], flags["exactly-513"], flags["long"]) == (False, True, True)
    assert not any(v for k, v in flags.items() if k.startswith("m"))
    assert [r["tokens"] for r in got if r["id"].startswith("exactly")] == [512, 512]


def _shard_sizes(rows: list[dict]) -> list[int]:
    n = len(rows) + 1  # and the bad line
    return [4] * (n // 4) + ([n % 4] if n % 4 else [])


def test_the_output_records_what_produced_it(jsonl_job, rows, tiny_bundle) -> None:
    src, out = jsonl_job
    manifest = json.loads((out / "_manifest.json").read_text())
    job = manifest["job"]
    assert manifest["complete"] is True
    assert (job["task"], job["dimensions"], job["normalize"], job["precision"]) == \
        (TASK, 64, True, "fp32")
    assert job["bundle_hash"] == __import__("hashlib").sha256(
        (tiny_bundle / "manifest.json").read_bytes()).hexdigest()
    assert job["input"]["size"] == src.stat().st_size
    assert [s["rows"] for s in manifest["shards"]] == _shard_sizes(rows)
    table = read_output(out)
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 64)
    assert sum(s["output_rows"] for s in manifest["shards"]) == table.num_rows


def test_csv_and_parquet_give_the_jsonl_output(jsonl_job, rows, tiny_bundle, tmp_path) -> None:
    _, out = jsonl_job
    expected = read_output(out)
    for src in (write_csv(tmp_path / "in.csv", rows), write_parquet(tmp_path / "in.parquet", rows)):
        dest = tmp_path / f"out-{src.suffix[1:]}"
        run_batch(str(src), "--out", str(dest), "--bundle", str(tiny_bundle), "--quiet", *FLAGS)
        got = read_output(dest)
        keep = [i for i in range(expected.num_rows) if expected["id"][i].as_py() != "3"]
        want = expected.take(keep)  # the JSONL file's bad line is not in the others,
        ids = want.column("id").to_pylist()  # so the last row's number (its id) is one less
        assert ids[-1] == str(len(rows))
        want = want.set_column(0, want.schema.field("id"),
                               pa.array(ids[:-1] + [str(len(rows) - 1)], pa.string()))
        # a row of a CSV or Parquet file has every column: a missing text is empty or null
        errors = want.column("error").to_pylist()
        errors[errors.index("no field 'text'")] = MISSING_TEXT[src.suffix]
        want = want.set_column(want.schema.get_field_index("error"), "error",
                               pa.array(errors, pa.string()))
        assert got.equals(want), src.suffix


def _killed(args: tuple[str, ...], out: Path, log: Path, rows: list[dict]) -> None:
    """Run the job and kill it (-9) once 2 shards are committed, the next ones in flight: its
    workers are stopped (SIGSTOP) first, so the job cannot have finished when the kill lands."""
    proc = start_batch(*args, log=log)
    workers: list[int] = []
    try:
        wait_committed(out, 2, proc, log)
        workers = descendants(proc.pid)
        signal_all(workers, signal.SIGSTOP)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        signal_all(workers, signal.SIGCONT)  # orphans: they exit when their pipes close
    assert 2 <= committed(out) < len(_shard_sizes(rows))


def test_sigkill_then_resume_gives_the_same_bytes(jsonl_job, rows, tiny_bundle,
                                                  tmp_path) -> None:
    src, out = jsonl_job
    resumed, log = tmp_path / "out", tmp_path / "log"
    args = (str(src), "--out", str(resumed), "--bundle", str(tiny_bundle), "--shard-rows", "4",
            "--quiet", *FLAGS)
    _killed(args, resumed, log, rows)
    run_batch(*args, "--resume")
    assert shard_bytes(resumed) == shard_bytes(out)
    assert not [p for p in resumed.iterdir() if p.name.startswith(".")]
    again = run_batch(*args, "--resume")  # complete: nothing to do, nothing rewritten
    assert shard_bytes(resumed) == shard_bytes(out) and again.returncode == 0


def test_an_int8_job_killed_and_resumed_gives_the_uninterrupted_bytes(jsonl_job, rows,
                                                                      tiny_bundles,
                                                                      tmp_path) -> None:
    """int8 vectors do not depend on their batch-mates (row-wise quantized activations), so a
    resumed int8 job, whose rows share worker batches differently, is bit-identical too."""
    src, _ = jsonl_job
    common = (str(src), "--bundle", str(tiny_bundles["int8"]), "--shard-rows", "4", "--quiet",
              *FLAGS)
    run_batch(*common, "--out", str(tmp_path / "whole"))
    args = (*common, "--out", str(tmp_path / "resumed"))
    _killed(args, tmp_path / "resumed", tmp_path / "log", rows)
    run_batch(*args, "--resume")
    assert shard_bytes(tmp_path / "resumed") == shard_bytes(tmp_path / "whole")


def test_ctrl_c_stops_cleanly_and_resumes(jsonl_job, rows, tiny_bundle, tmp_path) -> None:
    src, out = jsonl_job
    resumed, log = tmp_path / "out", tmp_path / "log"
    args = (str(src), "--out", str(resumed), "--bundle", str(tiny_bundle), "--shard-rows", "4",
            "--quiet", *FLAGS)
    proc = start_batch(*args, log=log)
    wait_committed(resumed, 1, proc, log)
    workers = descendants(proc.pid)
    signal_all(workers, signal.SIGSTOP)  # the job cannot finish before Ctrl-C lands
    try:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("the job did not stop within 60 s of Ctrl-C; its log:\n"
                                 + log.read_text()[-6000:]) from None
        assert code == 130, log.read_text()[-3000:]
    finally:
        signal_all(workers, signal.SIGCONT)
    assert 1 <= committed(resumed) < len(_shard_sizes(rows))
    assert "run again with --resume" in log.read_text()
    assert not json.loads((resumed / "_manifest.json").read_text())["complete"]
    run_batch(*args, "--resume")
    assert shard_bytes(resumed) == shard_bytes(out)


def test_resume_refuses_another_job_and_an_existing_output(jsonl_job, tiny_bundle) -> None:
    src, out = jsonl_job
    base = (str(src), "--out", str(out), "--bundle", str(tiny_bundle), "--shard-rows", "4",
            "--quiet", "--workers", "1", "--threads", "1")
    before = shard_bytes(out)
    refused = run_batch(*base, "--task", TASK, check=False)
    assert refused.returncode == 2 and "add --resume to continue it" in refused.stderr
    for flags, named in [(("--task", "search_query"), "task: output has 'search_document', "
                                                      "this run 'search_query'"),
                         (("--task", TASK, "--dimensions", "32"), "dimensions: output has 64"),
                         (("--task", TASK, "--no-normalize"), "normalize: output has True"),
                         (("--task", TASK, "--chunk-tokens", "64"), "chunk_tokens: output "
                                                                    "has 0")]:
        proc = run_batch(*base, *flags, "--resume", check=False)
        assert proc.returncode == 2, proc.stderr
        assert "--resume refuses to mix them" in proc.stderr and named in proc.stderr
    assert shard_bytes(out) == before


def test_a_changed_input_is_refused(jsonl_job, rows, tiny_bundle, tmp_path) -> None:
    _, out = jsonl_job
    changed = write_jsonl(tmp_path / "in.jsonl", rows[:-1])
    proc = run_batch(str(changed), "--out", str(out), "--bundle", str(tiny_bundle),
                     "--shard-rows", "4", "--resume", "--quiet", *FLAGS, check=False)
    assert proc.returncode == 2 and "input: output has {'size'" in proc.stderr


def test_chunks_are_embedded_as_their_spans(rows, local, tiny_bundle, tmp_path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    run_batch(str(src), "--out", str(tmp_path / "out"), "--bundle", str(tiny_bundle),
              "--chunk-tokens", "48", "--chunk-overlap", "8", "--quiet", *FLAGS)
    got = read_output(tmp_path / "out").to_pylist()
    long = [r for r in got if r["id"] == "long"]
    assert [r["chunk"] for r in long] == list(range(len(long))) and len(long) > 5
    row = -1
    for r in got:
        row += r["chunk"] in (None, 0)  # a row's first chunk (or its error) starts it
        text = rows[row].get("text")
        if r["error"]:
            assert r["chunk"] is None and r["vector"] is None
            continue
        assert r["truncated"] is False and r["id"] == rows[row].get("id", str(row))
        alone = local.embed([text[r["char_start"]:r["char_end"]]], TASK)
        assert np.array_equal(np.asarray(r["vector"], np.float32), alone.vectors[0])
        assert r["tokens"] == alone.tokens[0]
    assert row == len(rows) - 1


def test_progress_lines_off_a_terminal(rows, tiny_bundle, tmp_path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", rows[:5])
    proc = run_batch(str(src), "--out", str(tmp_path / "out"), "--bundle", str(tiny_bundle),
                     *FLAGS)
    lines = [json.loads(x) for x in proc.stderr.splitlines() if x.startswith("{")]
    done = [x for x in lines if x["event"] == "batch.done"]
    assert len(done) == 1 and done[0]["rows"] == 5 and done[0]["tokens"] > 0
    assert done[0]["percent"] == 100.0


# -- the commit protocol, with the crash states made rather than raced for ---------------------


def _table(n: int) -> pa.Table:
    return pa.table({"id": [str(i) for i in range(n)]})


def test_resume_deletes_what_the_manifest_does_not_list(tmp_path: Path) -> None:
    job = {"task": "x"}
    w = ShardWriter(tmp_path, job, resume=False)
    w.commit(_table(3), 0, 3)
    # a crash after step 2 (shard renamed, not listed) and one during step 1 (a temp file)
    (tmp_path / "part-000001.parquet").write_bytes(b"renamed but never listed")
    (tmp_path / ".part-000002.parquet.tmp").write_bytes(b"half written")
    (tmp_path / ".manifest.json.tmp").write_bytes(b"half written")
    w = ShardWriter(tmp_path, job, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_manifest.json", "part-000000.parquet"]
    assert w.committed.input_rows == 3 and w.committed.shards == 1
    w.commit(_table(2), 3, 2)
    assert sorted(p.name for p in tmp_path.iterdir())[-1] == "part-000001.parquet"


def test_a_damaged_committed_shard_is_refused(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, {}, resume=False)
    w.commit(_table(3), 0, 3)
    with open(tmp_path / "part-000000.parquet", "ab") as f:
        f.write(b"x")
    with pytest.raises(OutputError, match="committed shard is missing or changed size"):
        ShardWriter(tmp_path, {}, resume=True)


def test_a_directory_that_is_not_an_output_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="exists and is not a moe-embed batch output"):
        ShardWriter(tmp_path, {}, resume=True)
