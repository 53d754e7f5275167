"""The service end to end: a real server on a loopback port, real worker processes, real
gRPC clients; every vector checked against the in-process embedder."""

from __future__ import annotations

import os
import queue
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from moe_embed.service.tasks import task_named
from moe_embed.service.wire import bad_request
from moe_embed.testing.service import (
    TASKS,
    Expected,
    ServerThread,
    free_port,
    scrape,
    vectors,
    wait_for,
)
from moe_embed.v1 import embedder_pb2 as pb

ATOL = 1e-5


@pytest.fixture(scope="module")
def expected(tiny_bundle) -> Expected:
    return Expected(tiny_bundle)


@pytest.fixture(scope="module")
def server(tiny_bundle):
    srv = ServerThread(tiny_bundle, workers=2, metrics_port=free_port(), max_inputs=64).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server):
    return server.stub()


def _request(texts, task="search_query", dims=0, **kw) -> pb.EmbedRequest:
    return pb.EmbedRequest(inputs=texts, task=TASKS[task], dimensions=dims, **kw)


def test_info_describes_the_bundle(stub, tiny_bundle) -> None:
    from moe_embed.workers.bundle.format import Bundle

    b = Bundle.load(tiny_bundle, verify=False)
    m = b.manifest
    info = stub.Info(pb.InfoRequest())
    assert (info.model_id, info.bundle_hash, info.moe_mode) == (m.model_id, b.digest, "routed")
    assert (info.dimensions, info.min_dimensions, info.max_dimensions) == \
        (m.dimensions.max, m.dimensions.min, m.dimensions.max)
    assert (info.max_tokens, info.precision, info.workers) == (m.max_tokens, m.precision, 2)


def test_unary_equals_in_process(stub, expected, multilingual_texts) -> None:
    texts = multilingual_texts[:8]
    for task, dims in (("search_query", 0), ("search_document", 32), ("none", 16)):
        resp, call = stub.Embed.with_call(_request(texts, task, dims, id="u1"))
        got = vectors(resp)
        assert got.shape == (len(texts), dims or 64)
        np.testing.assert_allclose(got, expected(texts, task, dims), atol=ATOL, rtol=0)
        assert list(resp.token_counts) == expected.tokens(texts, task)
        assert resp.total_tokens == sum(resp.token_counts)
        assert resp.id == "u1" and resp.dimensions == (dims or 64)
        assert resp.model == "synthetic-tiny"
        t = resp.timing
        assert 0 <= t.queue_ms <= t.total_ms and 0 < t.compute_ms <= t.total_ms
        assert dict(call.trailing_metadata())["x-request-id"]


def test_normalize_false_and_request_id_echo(stub, expected) -> None:
    resp, call = stub.Embed.with_call(_request(["abc def"], dims=16, normalize=False),
                                      metadata=(("x-request-id", "req-42"),))
    assert dict(call.trailing_metadata())["x-request-id"] == "req-42"
    full = expected.embedder.embed(["abc def"], "search_query", 16, normalize=False).vectors
    np.testing.assert_allclose(vectors(resp), full, atol=ATOL, rtol=0)
    assert abs(np.linalg.norm(vectors(resp)[0]) - 1) > 1e-3  # really not re-normalized


def test_truncate_cuts_long_inputs_by_default(stub) -> None:
    resp = stub.Embed(_request(["word " * 2000]))
    assert list(resp.token_counts) == [512]


def test_tokenize_returns_ids_and_pieces(stub, expected) -> None:
    resp = stub.Tokenize(pb.TokenizeRequest(inputs=["hello world", "tschüss"],
                                            task=pb.TASK_SEARCH_QUERY))
    want = expected.embedder.tokenizer.tokenize(["hello world", "tschüss"],
                                                task_named("search_query"))
    assert [(list(t.ids), list(t.pieces)) for t in resp.tokens] == want
    assert resp.tokens[0].pieces[0] == "<s>" and resp.tokens[0].pieces[-1] == "</s>"


def test_stream_of_1000_interleaved_with_unary(server, stub, expected,
                                               multilingual_texts) -> None:
    rng = random.Random(7)
    plan = {}
    for i in range(1000):
        texts = rng.sample(multilingual_texts, rng.randint(1, 3))
        plan[f"s{i}"] = (texts, rng.choice(["search_query", "search_document"]),
                         rng.choice([0, 32]))
    for texts, task, dims in plan.values():
        expected(texts, task, dims)  # compute references before timing-sensitive traffic

    def requests():
        for rid, (texts, task, dims) in plan.items():
            yield _request(texts, task, dims, id=rid)

    unary_errors: list[BaseException] = []
    stop = threading.Event()

    def unary_loop() -> None:
        ustub = server.stub()
        while not stop.is_set():
            texts = rng.sample(multilingual_texts, 2)
            try:
                got = vectors(ustub.Embed(_request(texts, "clustering")))
                np.testing.assert_allclose(got, expected(texts, "clustering"), atol=ATOL,
                                           rtol=0)
            except BaseException as exc:  # reported below
                unary_errors.append(exc)

    expected(multilingual_texts, "clustering")
    threads = [threading.Thread(target=unary_loop) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        seen = {}
        for resp in stub.EmbedStream(requests(), timeout=120):
            assert not resp.HasField("error"), resp.error
            assert resp.id not in seen
            seen[resp.id] = resp
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not unary_errors, unary_errors[:3]
    assert seen.keys() == plan.keys()
    for rid, resp in seen.items():
        texts, task, dims = plan[rid]
        np.testing.assert_allclose(vectors(resp), expected(texts, task, dims), atol=ATOL,
                                   rtol=0)


def test_stream_reports_a_bad_request_in_its_response_and_goes_on(stub) -> None:
    reqs = [_request(["fine"], id="a"), _request(["ok", ""], id="b"),
            pb.EmbedRequest(inputs=["no task"], id="c"), _request(["fine too"], id="d")]
    got = {r.id: r for r in stub.EmbedStream(iter(reqs), timeout=30)}
    assert set(got) == {"a", "b", "c", "d"}
    assert got["b"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "inputs[1]" in got["b"].error.message
    assert (got["b"].error.field, got["b"].error.index) == ("inputs", 1)
    assert got["c"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "task" in got["c"].error.message
    assert len(got["a"].embeddings) == 1 and len(got["d"].embeddings) == 1
    assert not got["a"].HasField("error")


def test_32_concurrent_clients(server, expected, multilingual_texts) -> None:
    rng = random.Random(3)
    work = [[rng.sample(multilingual_texts, rng.randint(1, 4)) for _ in range(8)]
            for _ in range(32)]
    for client in work:
        for texts in client:
            expected(texts, "search_document")
    barrier = threading.Barrier(32)

    def client(batches):
        with server.channel() as ch:
            from moe_embed.v1 import embedder_pb2_grpc as pb_grpc

            s = pb_grpc.EmbedderStub(ch)
            barrier.wait()
            return [vectors(s.Embed(_request(t, "search_document"), timeout=60))
                    for t in batches]

    with ThreadPoolExecutor(32) as ex:
        results = list(ex.map(client, work))
    for batches, got in zip(work, results, strict=True):
        for texts, vecs in zip(batches, got, strict=True):
            np.testing.assert_allclose(vecs, expected(texts, "search_document"), atol=ATOL,
                                       rtol=0)


BAD_CASES = [  # (id, request fields, message, the BadRequest detail's field and index)
    ("empty list", dict(inputs=[], task=pb.TASK_NONE), "inputs: at least one", ("inputs", None)),
    ("empty string", dict(inputs=["a", "b", ""], task=pb.TASK_NONE), "inputs[2]: empty",
     ("inputs", 2)),
    ("blank string", dict(inputs=["a", " \t\n"], task=pb.TASK_NONE), "inputs[1]: blank",
     ("inputs", 1)),
    ("task unset", dict(inputs=["a"]), "task: is required", ("task", None)),
    ("unknown task", dict(inputs=["a"], task=42), "task: unknown value 42", ("task", None)),
    ("dims too small", dict(inputs=["a"], task=pb.TASK_NONE, dimensions=8),
     "dimensions: 8 is outside the supported range 16..64", ("dimensions", None)),
    ("dims too big", dict(inputs=["a"], task=pb.TASK_NONE, dimensions=65),
     "dimensions: 65 is outside", ("dimensions", None)),
    ("too many inputs", dict(inputs=["a"] * 65, task=pb.TASK_NONE),
     "inputs: 65 inputs exceed the limit of 64", ("inputs", None)),
    ("too long, no truncation", dict(inputs=["short", "ok", "word " * 700],
                                     task=pb.TASK_NONE, truncate=False),
     "inputs[2]: is {long_tokens} tokens long, more than the model's 512", ("inputs", 2)),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_is_invalid_argument_naming_field_and_index(server, stub, case,
                                                              tiny_bundle) -> None:
    from tokenizers import Tokenizer

    from moe_embed.workers.bundle.format import Bundle

    _, fields, message, (field, index) = case
    sent_before = scrape(server.server.metrics_port)["moe_embed_batch_size_inputs_count"]
    bundle = Bundle.load(tiny_bundle, verify=False)
    raw = Tokenizer.from_file(str(bundle.file(bundle.manifest.tokenizer)))
    raw.no_truncation()
    long_tokens = len(raw.encode("word " * 700).ids)  # the untruncated count, from the source
    with pytest.raises(grpc.RpcError) as exc:
        stub.Embed(pb.EmbedRequest(**fields))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message.format(long_tokens=long_tokens) in exc.value.details()
    assert bad_request(exc.value)[:2] == (field, index)  # the structured detail
    # refused by the frontend's validator: no worker ever saw it
    assert scrape(server.server.metrics_port)["moe_embed_batch_size_inputs_count"] == sent_before


def test_bad_inputs_cost_no_worker_and_no_other_result(server, stub, expected,
                                                       multilingual_texts) -> None:
    pids = server.pool.pids()
    sent_before = scrape(server.server.metrics_port)["moe_embed_batch_size_inputs_count"]
    texts = multilingual_texts[:3]
    with ThreadPoolExecutor(8) as ex:
        good = [ex.submit(stub.Embed, _request(texts)) for _ in range(8)]
        bad = [ex.submit(stub.Embed, pb.EmbedRequest(**c[1])) for c in BAD_CASES * 3]
        for f in bad:
            with pytest.raises(grpc.RpcError):
                f.result()
        for f in good:
            np.testing.assert_allclose(vectors(f.result()), expected(texts, "search_query"),
                                       atol=ATOL, rtol=0)
    assert server.pool.pids() == pids and server.pool.restarts == 0
    sent_after = scrape(server.server.metrics_port)["moe_embed_batch_size_inputs_count"]
    assert sent_after - sent_before <= 8  # only the good requests were batched


def test_message_size_limit(server) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        server.stub().Embed(_request(["x" * 5_000_000]))
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in exc.value.details()


def test_deadline_and_cancel_drop_queued_inputs(server, stub) -> None:
    """With both workers stopped, queued requests whose deadline passes are dropped before
    any worker sees them."""
    port = server.server.metrics_port
    pids = server.pool.pids()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        def in_flight() -> int:
            return server.on_loop(lambda: sum(len(w.in_flight) for w in server.pool.workers))

        fill = []
        for i in range(4):  # one batch each: 2 slots on each of the 2 workers
            fill.append(stub.Embed.future(_request([f"fill {i}"]), timeout=60))
            wait_for(lambda n=i + 1: in_flight() == n, 10, f"{i + 1} batches in flight")
        before = scrape(port)
        with pytest.raises(grpc.RpcError) as exc:
            stub.Embed(_request(["late"] * 5), timeout=0.3)
        assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        cancelled = stub.Embed.future(_request(["cancel me"] * 3), timeout=60)
        wait_for(lambda: scrape(port)["moe_embed_queue_depth"] == 3, 5, "queued inputs")
        cancelled.cancel()
        wait_for(lambda: scrape(port)["moe_embed_queue_depth"] == 0, 5, "queue to empty")
        after = scrape(port)
        assert after["moe_embed_inputs_dropped_total"] - \
            before.get("moe_embed_inputs_dropped_total", 0) == 8
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    for f in fill:
        assert len(f.result().embeddings) == 1


def test_reflection_lists_the_services(server) -> None:
    with server.channel() as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        resp = next(stub.ServerReflectionInfo(iter([req])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"moe_embed.v1.Embedder", "grpc.health.v1.Health"} <= names
    # what grpcurl asks next: the file that defines the service, to build requests from
    with server.channel() as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="moe_embed.v1.Embedder")
        resp = next(stub.ServerReflectionInfo(iter([req])))
    from google.protobuf import descriptor_pb2

    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in resp.file_descriptor_response.file_descriptor_proto]
    assert any(f.name == "moe_embed/v1/embedder.proto" and f.package == "moe_embed.v1"
               for f in files)


def test_metrics_cover_requests_batches_queue_and_experts(server, stub) -> None:
    stub.Embed(_request(["metrics please", "and more"]))
    with pytest.raises(grpc.RpcError):  # one bad request of its own: runs alone too
        stub.Embed(_request(["ok", ""]))
    m = scrape(server.server.metrics_port)
    assert m['moe_embed_requests_total{code="OK",method="Embed"}'] >= 1
    assert m['moe_embed_errors_total{code="INVALID_ARGUMENT",method="Embed"}'] >= 1
    assert m['moe_embed_request_latency_seconds_count{method="Embed"}'] >= 1
    assert m["moe_embed_queue_time_seconds_count"] >= 1
    assert m["moe_embed_batch_size_requests_count"] >= 1
    assert m["moe_embed_batch_size_tokens_sum"] > 0
    assert "moe_embed_queue_depth" in m and m["moe_embed_workers_ready"] == 2
    expert = {k: v for k, v in m.items() if k.startswith("moe_embed_expert_tokens_total")}
    layers = {k.split('layer="')[1].split('"')[0] for k in expert}
    assert layers == {"1", "3"} and sum(expert.values()) > 0


def test_stream_many_in_flight_responses_in_completion_order(server, multilingual_texts) -> None:
    """Requests are not answered one at a time: a long request does not hold back the
    short ones sent after it."""
    long_texts = [t * 20 for t in multilingual_texts[:32]]
    q: queue.Queue = queue.Queue()
    q.put(_request(long_texts, id="long"))
    for i in range(20):
        q.put(_request([f"short {i}"], id=f"short{i}"))
    q.put(None)
    order = [r.id for r in server.stub().EmbedStream(iter(q.get, None), timeout=60)]
    assert sorted(order) == sorted(["long"] + [f"short{i}" for i in range(20)])
    assert order.index("long") > 0


def test_request_latency_is_low_on_an_idle_server(stub) -> None:
    stub.Embed(_request(["warm up"]))
    times = []
    for _ in range(20):
        t = time.perf_counter()
        stub.Embed(_request(["a short text"]))
        times.append(time.perf_counter() - t)
    assert sorted(times)[10] < 0.5  # generous: a smoke check, the benchmark measures it


def test_embed_remote_matches_the_in_process_json(server, expected, multilingual_texts) -> None:
    from moe_embed.service.client import embed_remote

    texts = multilingual_texts[:5]
    remote = embed_remote(server.target, texts, "search_document", 32)
    local = expected.embedder.embed(texts, "search_document", 32).to_json()
    assert remote.keys() == local.keys()
    assert remote["tokens"] == local["tokens"] and remote["dimensions"] == 32
    np.testing.assert_allclose(np.array(remote["embeddings"]), np.array(local["embeddings"]),
                               atol=ATOL, rtol=0)


def test_client_splits_past_max_inputs_and_maps_errors(server, expected) -> None:
    from moe_embed.service.client import EmbedClient
    from moe_embed.service.errors import InvalidInput

    texts = [f"text number {i}" for i in range(150)]  # the server takes 64 per request
    with EmbedClient(server.target) as client:
        got = client.embed(texts, "clustering")
        assert got.shape == (150, 64)
        np.testing.assert_allclose(got[[0, 70, 149]],
                                   expected([texts[0], texts[70], texts[149]], "clustering"),
                                   atol=ATOL, rtol=0)
        with pytest.raises(InvalidInput) as exc:
            client.embed(texts[:100] + [""], "clustering")
        assert (exc.value.field, exc.value.index) == ("inputs", 100)


def test_cli_embed_with_server(server, expected) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    cli = Path(sys.executable).with_name("moe-embed")
    out = subprocess.run([str(cli), "embed", "--server", server.target, "--task", "search_query",
                          "--dimensions", "16", "hello", "world"],
                         capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(out.stdout)
    assert result["dimensions"] == 16 and len(result["embeddings"]) == 2
    assert result["tokens"] == expected.tokens(["hello", "world"], "search_query")
    np.testing.assert_allclose(np.array(result["embeddings"]),
                               expected(["hello", "world"], "search_query", 16), atol=ATOL, rtol=0)
