"""RayEmbedder on a real local Ray cluster (ray.init(num_cpus=2)): Parquet in, Parquet out,
the same rows as `moe-embed batch` writes for the same file; and each of Ray's batch formats."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
from corpus_support import corpus_rows, read_output, run_batch, write_parquet

from moe_embed.batch import RayEmbedder
from moe_embed.service.tokenizer import Tokenizer
from moe_embed.testing.service import IN_PROCESS_THREADS

TASK = "clustering"


@pytest.fixture(scope="module")
def corpus(multilingual_texts, tiny_bundle, tmp_path_factory) -> Path:
    """Every kind of row; every row with an id (Ray Data batches carry no row numbers)."""
    rows = corpus_rows(multilingual_texts, Tokenizer(tiny_bundle / "tokenizer.json"), TASK)
    rows = [{"id": r.get("id", "given"), "text": r.get("text")} for r in rows]
    ids = [r["id"] for r in rows]
    rows = [{**r, "id": f"{r['id']}#{ids[:i].count(r['id'])}"} for i, r in enumerate(rows)]
    return write_parquet(tmp_path_factory.mktemp("corpus") / "in.parquet", rows)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 << 20,
             log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _by_id(table: pa.Table) -> pa.Table:
    return table.take(pc.sort_indices(table, [("id", "ascending")])).combine_chunks()


def test_ray_data_parquet_to_parquet_equals_the_cli(cluster, corpus, tiny_bundle,
                                                    tmp_path) -> None:
    run_batch(str(corpus), "--out", str(tmp_path / "cli"), "--bundle", str(tiny_bundle),
              "--task", TASK, "--quiet", "--workers", "1", "--threads", "1")
    ds = ray.data.read_parquet(str(corpus))
    ds = ds.map_batches(RayEmbedder, batch_size=8, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1,
                        fn_constructor_kwargs={"bundle": str(tiny_bundle), "task": TASK,
                                               "threads": 1})
    ds.write_parquet(str(tmp_path / "ray"))
    got = pa.concat_tables(pq.read_table(p) for p in sorted((tmp_path / "ray").glob("*.parquet")))
    cli = read_output(tmp_path / "cli")
    assert got.schema == cli.schema
    assert _by_id(got).equals(_by_id(cli))
    assert got.num_rows == pq.read_metadata(corpus).num_rows


@pytest.fixture(scope="module")
def chunked_cli(corpus, tiny_bundle, tmp_path_factory) -> pa.Table:
    out = tmp_path_factory.mktemp("chunked") / "cli"
    run_batch(str(corpus), "--out", str(out), "--bundle", str(tiny_bundle), "--task", TASK,
              "--chunk-tokens", "40", "--chunk-overlap", "10", "--quiet", "--workers", "1",
              "--threads", "1")
    return read_output(out).combine_chunks()


@pytest.mark.parametrize("fmt", ["pyarrow", "pandas", "numpy"])
def test_every_batch_format_gives_the_cli_rows_with_chunks(corpus, chunked_cli, tiny_bundle,
                                                           fmt) -> None:
    embed = RayEmbedder(bundle=tiny_bundle, task=TASK, chunk_tokens=40, chunk_overlap=10,
                        threads=IN_PROCESS_THREADS)
    table = pq.read_table(corpus)
    batch = {"pyarrow": lambda: table, "pandas": table.to_pandas,
             "numpy": lambda: {c: table.column(c).to_numpy(zero_copy_only=False)
                               for c in table.column_names}}[fmt]()
    assert embed(batch).equals(chunked_cli)


def test_a_batch_without_the_id_column_is_refused_naming_it(tiny_bundle) -> None:
    embed = RayEmbedder(bundle=tiny_bundle, task=TASK, id_field="key",
                        threads=IN_PROCESS_THREADS)
    with pytest.raises(ValueError, match=r"no column 'key' \(id_field\)"):
        embed(pa.table({"text": ["x"]}))
