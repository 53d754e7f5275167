"""`moe-embed batch --server`: a real server with mTLS and an API key, compared byte for byte
with the in-process job; a refused key; and retries while the server is not up yet."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from corpus_support import (
    corpus_rows,
    read_output,
    run_batch,
    shard_bytes,
    start_batch,
    write_jsonl,
)

from moe_embed.service.tokenizer import Tokenizer
from moe_embed.testing.service import ServerThread, free_port, wait_for
from moe_embed.testing.tls import HOST, Pki, locked_server
from moe_embed.v1 import embedder_pb2 as pb

TASK = "search_query"
KEY = "sk-corpus-0123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki.make(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def client_files(pki: Pki, tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("client")
    pki.client.private_key_pem.write_to_path(str(d / "client.key"))
    (d / "client.crt").write_bytes(b"".join(b.bytes() for b in pki.client.cert_chain_pems))
    (d / "key").write_text(f"# the corpus job's key\n\n{KEY}\n")
    (d / "wrong").write_text("sk-wrong\n")
    return {"ca": str(pki.ca_file), "cert": str(d / "client.crt"),
            "key": str(d / "client.key"), "api_key": str(d / "key"),
            "wrong_key": str(d / "wrong")}


@pytest.fixture(scope="module")
def locked(tiny_bundle, pki, tmp_path_factory):
    """A server with mTLS, an API key and a plaintext health port."""
    with locked_server(tiny_bundle, pki, tmp_path_factory.mktemp("secrets"), KEY) as srv:
        yield srv.wait_serving()


@pytest.fixture(scope="module")
def corpus(multilingual_texts, tiny_bundle, tmp_path_factory) -> Path:
    counter = Tokenizer(tiny_bundle / "tokenizer.json")
    rows = corpus_rows(multilingual_texts, counter, TASK)
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "in.jsonl", rows)


@pytest.fixture(scope="module")
def big_corpus(multilingual_texts, tiny_bundle, tmp_path_factory) -> Path:
    """Every kind of row, then 240 documents of 1..60 texts (up to ~1,500 tokens): calls big
    enough, and enough of them, for every stream to hold its window of requests at once."""
    counter = Tokenizer(tiny_bundle / "tokenizer.json")
    rows = corpus_rows(multilingual_texts, counter, TASK)
    k = len(multilingual_texts)
    rows += [{"id": f"doc-{i}", "text": " ".join(multilingual_texts[(i + j) % k]
                                                for j in range(1 + (i * 7) % 60))}
             for i in range(240)]
    return write_jsonl(tmp_path_factory.mktemp("big") / "in.jsonl", rows)


def _tls(files: dict[str, str], key: str = "api_key") -> tuple[str, ...]:
    return ("--tls-ca-file", files["ca"], "--tls-cert-file", files["cert"],
            "--tls-key-file", files["key"], "--api-key-file", files[key])


def test_through_a_server_with_mtls_and_a_key_equals_in_process(locked, client_files,
                                                                big_corpus, tiny_bundle,
                                                                tmp_path) -> None:
    """Two targets (one server by two names: two streams) over mTLS with the key; the shards
    are the in-process job's bytes."""
    common = (str(big_corpus), "--bundle", str(tiny_bundle), "--task", TASK, "--shard-rows",
              "60", "--quiet")
    run_batch(*common, "--out", str(tmp_path / "local"), "--workers", "1", "--threads", "1")
    targets = f"{HOST}:{locked.port},localhost:{locked.port}"
    run_batch(*common, "--out", str(tmp_path / "remote"), "--server", targets,
              *_tls(client_files))
    assert shard_bytes(tmp_path / "remote") == shard_bytes(tmp_path / "local")
    assert read_output(tmp_path / "remote").num_rows == len(big_corpus.read_text().splitlines())


def test_a_wrong_key_fails_the_job_naming_the_status(locked, client_files, corpus,
                                                     tiny_bundle, tmp_path) -> None:
    proc = run_batch(str(corpus), "--bundle", str(tiny_bundle), "--task", TASK, "--quiet",
                     "--out", str(tmp_path / "out"), "--server", f"{HOST}:{locked.port}",
                     *_tls(client_files, "wrong_key"), check=False)
    assert proc.returncode == 1, proc.stderr
    assert "UNAUTHENTICATED" in proc.stderr


def test_without_the_client_certificate_the_handshake_fails(locked, client_files, corpus,
                                                            tiny_bundle, tmp_path) -> None:
    proc = run_batch(str(corpus), "--bundle", str(tiny_bundle), "--task", TASK, "--quiet",
                     "--out", str(tmp_path / "out"), "--server", f"{HOST}:{locked.port}",
                     "--tls-ca-file", client_files["ca"], "--api-key-file",
                     client_files["api_key"], check=False, timeout=600)
    assert proc.returncode == 1 and "UNAVAILABLE" in proc.stderr, proc.stderr


def test_unavailable_is_retried_until_the_server_is_up(corpus, tiny_bundle, tmp_path) -> None:
    """The job starts first and logs a retry (made: nothing listens yet); then the server
    starts on that port and the job finishes with every row."""
    port = free_port()
    log = tmp_path / "batch.log"
    proc = start_batch(str(corpus), "--bundle", str(tiny_bundle), "--task", TASK, "--quiet",
                       "--out", str(tmp_path / "out"), "--server", f"{HOST}:{port}", log=log)
    try:
        end = time.monotonic() + 60
        while '"batch.retry"' not in log.read_text():
            assert proc.poll() is None and time.monotonic() < end, log.read_text()[-3000:]
            time.sleep(0.05)
        srv = ServerThread(tiny_bundle, port=port).start()
        try:
            assert proc.wait(300) == 0, log.read_text()[-3000:]
        finally:
            srv.stop()
    finally:
        if proc.poll() is None:
            proc.kill()
    rows = sum(1 for line in corpus.read_text().splitlines() if line.strip())
    assert read_output(tmp_path / "out").num_rows == rows
    assert '"code": "UNAVAILABLE"' in log.read_text()


def test_resource_exhausted_is_retried_until_the_queue_has_room(corpus, tiny_bundle,
                                                              tmp_path) -> None:
    """A full queue (made: the only worker stopped, 64 inputs waiting in a queue of 64) refuses
    the job's calls with RESOURCE_EXHAUSTED; the job backs off and retries, and once the worker
    goes on it finishes with every row."""
    srv = ServerThread(tiny_bundle, max_queue=64, max_batch_tokens=512).start()
    pid = srv.pool.pids()[0]
    proc = None
    try:
        os.kill(pid, signal.SIGSTOP)
        stub = srv.stub()
        long_text = "hello " * 200  # ~400 tokens: one input a batch
        task = pb.TASK_SEARCH_QUERY
        held = stub.Embed.future(pb.EmbedRequest(inputs=[long_text] * 2, task=task),
                                 timeout=300)
        wait_for(lambda: srv.on_loop(lambda: len(srv.pool.workers[0].in_flight)) == 2, 30,
                 "the first request's two batches to reach the stopped worker")
        filler = stub.Embed.future(pb.EmbedRequest(inputs=[long_text] * 64, task=task),
                                   timeout=300)
        wait_for(lambda: srv.on_loop(lambda: srv.scheduler.queue.waiting) == 64, 30,
                 "the queue to be full")
        log = tmp_path / "batch.log"
        proc = start_batch(str(corpus), "--bundle", str(tiny_bundle), "--task", TASK,
                           "--quiet", "--out", str(tmp_path / "out"), "--server",
                           f"{HOST}:{srv.server.port}", log=log)
        wait_for(lambda: '"code": "RESOURCE_EXHAUSTED"' in log.read_text()
                 or proc.poll() is not None, 60, "the job to be refused")
        assert proc.poll() is None and '"batch.retry"' in log.read_text(), log.read_text()
        os.kill(pid, signal.SIGCONT)
        assert proc.wait(300) == 0, log.read_text()[-3000:]
        assert len(held.result().embeddings) == 2 and len(filler.result().embeddings) == 64
    finally:
        os.kill(pid, signal.SIGCONT)
        if proc is not None and proc.poll() is None:
            proc.kill()
        srv.stop()
    rows = sum(1 for line in corpus.read_text().splitlines() if line.strip())
    assert read_output(tmp_path / "out").num_rows == rows


def test_tls_flags_must_pair(corpus, tiny_bundle, tmp_path) -> None:
    proc = run_batch(str(corpus), "--out", str(tmp_path / "o"), "--task", TASK, "--bundle",
                     str(tiny_bundle), "--server", "127.0.0.1:1", "--tls-cert-file", "x",
                     check=False)
    assert proc.returncode == 2
    assert "--tls-cert-file and --tls-key-file go together" in proc.stderr
    alone = run_batch(str(corpus), "--out", str(tmp_path / "o"), "--task", TASK, "--bundle",
                      str(tiny_bundle), "--api-key-file", "k", check=False)
    assert alone.returncode == 2 and "--api-key-file need(s) --server" in alone.stderr
