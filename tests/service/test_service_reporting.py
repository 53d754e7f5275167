"""What the service reports about a request and about itself: the served model's names,
per-input truncation (gRPC, HTTP, metric), the queue gauges an autoscaler reads, and the
response-size guard of each format, each at its boundary."""

from __future__ import annotations

import base64
import contextlib
import os
import signal

import grpc
import numpy as np
import pytest
import requests

from moe_embed.service.grpc_api import response_bytes as grpc_bytes
from moe_embed.service.http.app import response_bytes as http_bytes
from moe_embed.service.tasks import task_named
from moe_embed.service.tokenizer import Tokenizer
from moe_embed.testing.service import TASKS, ServerThread, free_port, scrape, wait_for
from moe_embed.v1 import embedder_pb2 as pb
from moe_embed.workers.bundle.format import Bundle

NAMES = ("nomic-ai/nomic-embed-text-v2-moe", "local-alias")
MAX_MESSAGE = 64 * 1024


@pytest.fixture(scope="module")
def server(tiny_bundle):
    srv = ServerThread(tiny_bundle, served_model_name=NAMES, max_inputs=512,
                       max_message_bytes=MAX_MESSAGE, http_port=free_port(),
                       metrics_port=free_port()).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tokenizer(tiny_bundle) -> Tokenizer:
    return Tokenizer.from_bundle(Bundle.load(tiny_bundle, verify=False))


def _text_of(tokenizer: Tokenizer, tokens: int) -> str:
    """A text that is exactly `tokens` tokens long with the search_query prefix."""
    task = task_named("search_query")
    for words in range(1, 2000):
        text = "word " * words + "end"
        if len(tokenizer.full_ids(task.apply(text))) == tokens:
            return text
    raise AssertionError(f"no text of {tokens} tokens")


def _embed(server: ServerThread, inputs: list[str], **kw) -> pb.EmbedResponse:
    return server.stub().Embed(pb.EmbedRequest(inputs=inputs, task=TASKS["search_query"], **kw),
                               timeout=60)


def test_the_served_names_slash_and_all(server) -> None:
    models = requests.get(f"{server.url}/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == [NAMES[0]]
    for name in (*NAMES, "nomic-embed-text-v2-moe"):  # each name, and a name's last part
        r = requests.post(f"{server.url}/v1/embeddings", json={"input": "x", "model": name},
                          timeout=30)
        assert r.status_code == 200, (name, r.text)
        assert r.json()["model"] == NAMES[0]
        assert requests.get(f"{server.url}/v1/models/{name}", timeout=10).status_code == 200
    for name in ("nomic-ai", "nomic-ai/other", "alias"):
        r = requests.post(f"{server.url}/v1/embeddings", json={"input": "x", "model": name},
                          timeout=30)
        assert (r.status_code, r.json()["error"]["code"]) == (404, "model_not_found"), name
    assert server.stub().Info(pb.InfoRequest(), timeout=10).model_id == NAMES[0]
    assert _embed(server, ["x"]).model == NAMES[0]


def test_truncation_is_reported_at_the_limit_and_one_past_it(server, tokenizer) -> None:
    at, past = _text_of(tokenizer, 512), _text_of(tokenizer, 513)
    before = scrape(server.server.metrics_port).get("moe_embed_truncated_inputs_total", 0)
    resp = _embed(server, [past, "short", at, past])
    assert list(resp.truncated) == [True, False, False, True]
    counts = list(resp.token_counts)
    assert counts[0] == counts[2] == counts[3] == 512 and counts[1] < 512
    r = requests.post(f"{server.url}/v1/embeddings", timeout=60, json={
        "input": [at, past], "task": "search_query"}).json()
    assert [d["truncated"] for d in r["data"]] == [False, True]
    ids = requests.post(f"{server.url}/v1/embeddings", timeout=60, json={
        "input": [[5] * 512, [5] * 2]}).json()
    assert [d["truncated"] for d in ids["data"]] == [False, False]
    refused = requests.post(f"{server.url}/v1/embeddings", timeout=60, json={
        "input": [[5] * 512, [5] * 513]})  # token ids are never cut
    assert (refused.status_code, refused.json()["error"]["param"]) == (400, "input[1]")
    after = scrape(server.server.metrics_port)["moe_embed_truncated_inputs_total"]
    assert after - before == 2 + 1


def _queue_gauges(server: ServerThread) -> tuple[float, float, float, float]:
    m = scrape(server.server.metrics_port)
    return (m["moe_embed_queue_depth"], m["moe_embed_queue_tokens"],
            m["moe_embed_queue_oldest_wait_seconds"], m["moe_embed_worker_slots_busy"])


def test_queue_gauges_rise_while_work_waits_and_return_to_zero(tiny_bundle) -> None:
    """The queue is made, not hoped for: the only worker is stopped, its two slots are filled
    one request at a time, and only then do more requests come (they must wait)."""
    srv = ServerThread(tiny_bundle, workers=1, metrics_port=free_port(),
                       batch_timeout_s=300).start()  # never taken for stuck while stopped
    (pid,) = srv.pool.pids()

    def request(i: int) -> pb.EmbedRequest:
        return pb.EmbedRequest(inputs=[f"text {i}", "more"], task=TASKS["none"])

    def batches() -> float:
        return scrape(srv.server.metrics_port)["moe_embed_batch_size_inputs_count"]

    try:
        assert _queue_gauges(srv) == (0, 0, 0, 0)
        assert scrape(srv.server.metrics_port)["moe_embed_worker_slots"] == 2
        os.kill(pid, signal.SIGSTOP)
        stub = srv.stub()
        calls = []
        for i in range(2):  # one batch in each of the stopped worker's slots
            calls.append(stub.Embed.future(request(i), timeout=120))
            wait_for(lambda i=i: batches() == i + 1, 30, f"batch {i + 1} to be sent")
        calls += [stub.Embed.future(request(i), timeout=120) for i in range(2, 6)]
        wait_for(lambda: _queue_gauges(srv)[0] == 8 and _queue_gauges(srv)[2] > 0.05, 30,
                 "4 requests' inputs to wait behind the stopped worker")
        depth, tokens, oldest, busy = _queue_gauges(srv)
        assert tokens >= depth * 3 and busy == 2
        os.kill(pid, signal.SIGCONT)
        for call in calls:
            call.result()
        wait_for(lambda: _queue_gauges(srv) == (0, 0, 0, 0), 5, "the gauges to return to 0")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        srv.stop()


@pytest.mark.parametrize("fmt", ["grpc", "float", "base64"])
def test_the_response_size_guard_knows_each_format(server, fmt) -> None:
    """The most inputs whose response fits is served, and its real size is within the bound;
    one more is refused before any work."""
    dims = 64
    size = grpc_bytes if fmt == "grpc" else http_bytes(fmt)
    most = max(n for n in range(1, 512) if size(n, dims) <= MAX_MESSAGE)
    sent = scrape(server.server.metrics_port)["moe_embed_batch_size_inputs_sum"]
    for n, fits in ((most, True), (most + 1, False)):
        texts = [f"t{i}" for i in range(n)]
        if fmt == "grpc":
            if fits:
                resp = _embed(server, texts, dimensions=dims)
                assert resp.ByteSize() <= size(n, dims)
                sent += n
            else:
                with pytest.raises(grpc.RpcError) as exc:
                    _embed(server, texts, dimensions=dims)
                assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "max_message_bytes" in exc.value.details()
            continue
        r = requests.post(f"{server.url}/v1/embeddings", timeout=60, json={
            "input": texts, "dimensions": dims, "encoding_format": fmt})
        if fits:
            assert r.status_code == 200, r.text
            assert len(r.content) <= size(n, dims)
            first = r.json()["data"][0]["embedding"]
            vector = (np.frombuffer(base64.b64decode(first), "<f4") if fmt == "base64"
                      else np.array(first, dtype=np.float32))
            assert vector.shape == (dims,)
            sent += n
        else:
            assert (r.status_code, r.json()["error"]["code"]) == (413, "request_too_large")
    assert scrape(server.server.metrics_port)["moe_embed_batch_size_inputs_sum"] == sent
