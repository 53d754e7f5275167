"""The OpenAI-compatible HTTP API end to end: a real server (HTTP and gRPC on one engine) on
loopback ports with a real worker, called by the model card's own example script, the official
`openai` client and plain `requests`; every vector checked against the gRPC path or the
in-process embedder."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import openai
import pytest
import requests
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from moe_embed.service.http import app as http_app
from moe_embed.service.http.embeddings_body import INLINE_VALUES, embeddings_body, values_in
from moe_embed.service.tasks import task_named
from moe_embed.testing.service import (
    TASKS,
    Expected,
    ServeProcess,
    ServerThread,
    free_port,
    scrape,
    vectors,
    wait_for,
)
from moe_embed.v1 import embedder_pb2 as pb

TOL = 1e-6
REPO = Path(__file__).resolve().parents[2]
CARD = sorted((REPO.parent / "shared" / "seeds").glob("000_*.txt"))

# The model card's example (its "Usage" section), verbatim but for the port. The card's page
# text lost the indentation; it is restored here, and every line is checked against the card
# when the card is at hand.
CARD_EXAMPLE = """\
import requests

def dot(va, vb):
    return sum(a * b for a, b in zip(va, vb))

def embed(texts):
    resp = requests.post('http://localhost:8080/v1/embeddings', json={'input': texts}).json()
    return [d['embedding'] for d in resp['data']]

docs = ['嵌入很酷', '骆驼很酷'] # 'embeddings are cool', 'llamas are cool'
docs_embed = embed(['search_document: ' + d for d in docs])

query = '跟我讲讲嵌入' # 'tell me about embeddings'
query_embed = embed(['search_query: ' + query])[0]
print(f'query: {query!r}')
for d, e in zip(docs, docs_embed):
    print(f'similarity {dot(query_embed, e):.2f}: {d!r}')
"""


@pytest.fixture(scope="module")
def server(tiny_bundle):
    srv = ServerThread(tiny_bundle, http_port=free_port(), metrics_port=free_port(),
                       max_inputs=16, reflection=False).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def expected(tiny_bundle) -> Expected:
    return Expected(tiny_bundle)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="not-checked", max_retries=0)


def _post(server: ServerThread, body: object, **kw) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body)
    return requests.post(server.url + "/v1/embeddings", data=data, **{"timeout": 60, **kw})


def _grpc(server: ServerThread, texts: list[str], task: str = "none",
          dims: int = 0) -> pb.EmbedResponse:
    return server.stub().Embed(pb.EmbedRequest(inputs=texts, task=TASKS[task], dimensions=dims),
                               timeout=60)


# ---- the card's example and the openai client ----------------------------------------------


def test_model_card_example_runs_verbatim_but_for_the_port(server, expected, tmp_path) -> None:
    """The card's script, run as its own process with `requests`, prints the query and two
    similarities, and they are the in-process model's (the demo model's vectors, so not the
    card's 0.48 and 0.19)."""
    if CARD:  # the script is the card's, line for line
        card = CARD[0].read_text()
        for line in CARD_EXAMPLE.splitlines():
            assert line.strip() in card, f"not in the model card: {line!r}"
    script = tmp_path / "card_example.py"
    port = server.server.http_port
    script.write_text(CARD_EXAMPLE.replace("localhost:8080", f"localhost:{port}"))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "query: '跟我讲讲嵌入'"
    docs = ["嵌入很酷", "骆驼很酷"]
    query = expected(["search_query: 跟我讲讲嵌入"], "none")[0]
    want = [float(np.dot(query, d)) for d in expected([f"search_document: {d}" for d in docs],
                                                      "none")]
    assert lines[1:] == [f"similarity {w:.2f}: {d!r}" for w, d in zip(want, docs, strict=True)]


@pytest.mark.parametrize("encoding", ["float", "base64", None])
@pytest.mark.parametrize("dims", [None, 32])
def test_openai_client_equals_the_grpc_path(server, client, multilingual_texts, encoding,
                                            dims) -> None:
    """`embeddings.create` (None: the client's default, which asks for base64 and decodes it)
    returns the gRPC path's vectors to 1e-6, with OpenAI's usage and model."""
    texts = multilingual_texts[:5]
    kwargs = {k: v for k, v in (("encoding_format", encoding), ("dimensions", dims)) if v}
    resp = client.embeddings.create(model="synthetic-tiny", input=texts, **kwargs)
    want = _grpc(server, texts, dims=dims or 0)
    if encoding == "base64":  # asked for explicitly: the client hands back the string
        got = np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4")
                        for d in resp.data])
    else:
        got = np.array([d.embedding for d in resp.data], dtype=np.float32)
    assert got.shape == (len(texts), dims or 64)
    np.testing.assert_allclose(got, vectors(want), atol=TOL, rtol=0)
    assert [d.index for d in resp.data] == list(range(len(texts)))
    assert resp.object == "list" and resp.model == "synthetic-tiny"
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == want.total_tokens


def test_one_string_and_the_task_extension(server, client) -> None:
    """A bare string is one input; `task` (an extension, via extra_body) adds the model's
    prefix exactly as gRPC's task does, and as prefixing the text oneself does."""
    text = "tell me about embeddings"
    plain = client.embeddings.create(model="synthetic-tiny", input=text)
    tasked = client.embeddings.create(model="synthetic-tiny", input=text,
                                      extra_body={"task": "search_query"})
    prefixed = client.embeddings.create(model="synthetic-tiny", input="search_query: " + text)
    want = vectors(_grpc(server, [text], "search_query"))[0]
    np.testing.assert_allclose(tasked.data[0].embedding, want, atol=TOL, rtol=0)
    np.testing.assert_allclose(prefixed.data[0].embedding, want, atol=TOL, rtol=0)
    np.testing.assert_allclose(plain.data[0].embedding, vectors(_grpc(server, [text]))[0],
                               atol=TOL, rtol=0)
    assert not np.allclose(plain.data[0].embedding, want, atol=1e-3)  # the prefix matters


def test_token_id_inputs_are_used_as_given(server, expected) -> None:
    """A list of ids is one input, a list of lists several; each is the model's ids of a text,
    so the vector is that text's."""
    texts = ["hello world", "嵌入很酷"]
    ids = [x.tolist() for x in expected.embedder.tokenizer.encode(texts, task_named("none"))]
    want = expected(texts, "none")
    one = _post(server, {"input": ids[0]}).json()
    many = _post(server, {"input": ids}).json()
    np.testing.assert_allclose(one["data"][0]["embedding"], want[0], atol=TOL, rtol=0)
    np.testing.assert_allclose([d["embedding"] for d in many["data"]], want, atol=TOL, rtol=0)
    assert many["usage"]["prompt_tokens"] == sum(len(x) for x in ids)


def test_extension_fields_truncate_and_normalize(server, expected) -> None:
    long = _post(server, {"input": "word " * 2000}).json()
    assert long["usage"]["prompt_tokens"] == 512  # cut by default, as over gRPC
    raw = _post(server, {"input": "abc def", "normalize": False, "dimensions": 16}).json()
    want = expected.embedder.embed(["abc def"], "none", 16, normalize=False).vectors[0]
    np.testing.assert_allclose(raw["data"][0]["embedding"], want, atol=TOL, rtol=0)


def test_models_lists_the_served_model_and_model_is_checked(server, client) -> None:
    (model,) = client.models.list().data
    assert model.id == "synthetic-tiny" and model.object == "model"
    card = requests.get(f"{server.url}/v1/models/synthetic-tiny", timeout=10).json()
    assert (card["min_dimensions"], card["max_dimensions"], card["max_inputs"]) == (16, 64, 16)
    assert card["precision"] == "fp32"
    with pytest.raises(openai.NotFoundError) as exc:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert exc.value.code == "model_not_found" and exc.value.param == "model"
    assert requests.get(f"{server.url}/v1/models/gpt-4", timeout=10).status_code == 404


# ---- errors ----------------------------------------------------------------------------------

BAD_REQUESTS = {
    # name: (body, status, param, code)
    "malformed-json": (b'{"input": ["a",', 400, None, "invalid_argument"),
    "not-an-object": (b'["a"]', 400, None, "invalid_argument"),
    "empty-body": (b"", 400, None, "invalid_argument"),
    "no-input": ({"model": "synthetic-tiny"}, 400, "input", "invalid_argument"),
    "input-a-number": ({"input": 3}, 400, "input", "invalid_argument"),
    "input-an-object": ({"input": {"text": "a"}}, 400, "input", "invalid_argument"),
    "input-empty-list": ({"input": []}, 400, "input", "invalid_argument"),
    "input-empty-string": ({"input": ""}, 400, "input[0]", "invalid_argument"),
    "blank-at-2": ({"input": ["a", "b", "   ", "d"]}, 400, "input[2]", "invalid_argument"),
    "null-at-1": ({"input": ["a", None]}, 400, "input[1]", "invalid_argument"),
    "mixed-ids": ({"input": [[1, 2], [3, "x"]]}, 400, "input[1]", "invalid_argument"),
    "float-id": ({"input": [[1, 2.5]]}, 400, "input[0]", "invalid_argument"),
    "id-out-of-vocab": ({"input": [[5], [10 ** 12]]}, 400, "input[1]", "invalid_argument"),
    "nested-too-deep": ({"input": [[[1]]]}, 400, "input[0]", "invalid_argument"),
    "too-many-inputs": ({"input": ["x"] * 17}, 400, "input", "invalid_argument"),
    "too-long-no-truncate": ({"input": ["ok", "word " * 600], "truncate": False}, 400,
                             "input[1]", "invalid_argument"),
    "dimensions-a-string": ({"input": "a", "dimensions": "32"}, 400, "dimensions",
                            "invalid_argument"),
    "dimensions-out-of-range": ({"input": "a", "dimensions": 8}, 400, "dimensions",
                                "invalid_argument"),
    "encoding-unknown": ({"input": "a", "encoding_format": "hex"}, 400, "encoding_format",
                         "invalid_argument"),
    "task-unknown": ({"input": "a", "task": "search"}, 400, "task", "invalid_argument"),
    "truncate-a-string": ({"input": "a", "truncate": "yes"}, 400, "truncate",
                          "invalid_argument"),
    "model-a-number": ({"input": "a", "model": 7}, 400, "model", "invalid_argument"),
    "model-unknown": ({"input": "a", "model": "nomic-embed-text-v1"}, 404, "model",
                      "model_not_found"),
    "ten-megabytes": ({"input": "x" * 10_000_000}, 413, "body", "request_too_large"),
    "huge-bad-id": ({"input": [[1, "x" * 1_000_000]]}, 400, "input[0]", "invalid_argument"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_get_openai_errors_naming_the_field(server, name) -> None:
    body, status, param, code = BAD_REQUESTS[name]
    resp = _post(server, body, headers={"x-request-id": f"bad-{name}"})
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == (param, code), error
    assert error["type"] == "invalid_request_error"
    assert param is None or error["message"].startswith(f"{param}:") or status == 404, error
    assert resp.headers["x-request-id"] == f"bad-{name}"
    assert len(error["message"]) < 1100  # values are quoted, never echoed whole


def _raw_status(port: int, head: bytes, body: bytes) -> str:
    """Send a request whose body never ends (no more than `body` is sent), and return the
    status line the server answers with meanwhile."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body)
        reply = b""
        while b"\r\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply.split(b"\r\n", 1)[0].decode()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_over_the_limit_is_refused_before_it_ends(server, framing) -> None:
    """413 as soon as the body is known to be too large: from Content-Length before any of it
    is read, or from the bytes counted so far of a chunked body. The client never finishes
    sending, so an answer proves the server did not wait for (or buffer) the rest."""
    port, limit = server.server.http_port, server.config.max_message_bytes
    request = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    if framing == "content-length":
        head = request + f"Content-Length: {10 * limit}\r\n\r\n".encode()
        body = b'{"input": "xxx'
    else:
        head = request + b"Transfer-Encoding: chunked\r\n\r\n"
        piece = b"x" * (1 << 16)
        body = (b"%x\r\n" % len(piece) + piece + b"\r\n") * (limit // len(piece) + 1)
    assert _raw_status(port, head, body).startswith("HTTP/1.1 413 ")


def test_unknown_routes_and_methods_answer_in_openai_shape(server) -> None:
    resp = requests.get(server.url + "/v1/embedding", timeout=10)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    resp = requests.get(server.url + "/v1/embeddings", timeout=10)
    assert resp.status_code == 405 and resp.json()["error"]["code"] == "method_not_allowed"


def test_errors_cost_no_worker_and_are_counted(server) -> None:
    """After every bad request above, the same worker serves; HTTP is in the same metrics as
    gRPC (method `http:/v1/embeddings`, gRPC status names as codes)."""
    pids = server.pool.pids()
    before = scrape(server.server.metrics_port)
    for body, *_ in BAD_REQUESTS.values():
        _post(server, body)
    assert _post(server, {"input": "still fine"}).status_code == 200
    after = scrape(server.server.metrics_port)
    assert server.pool.pids() == pids and server.pool.restarts == 0

    def delta(code: str) -> float:
        key = f'moe_embed_requests_total{{code="{code}",method="http:/v1/embeddings"}}'
        return after.get(key, 0) - before.get(key, 0)

    assert delta("OK") == 1
    assert delta("INVALID_ARGUMENT") == sum(1 for *_, s, _p, _c in BAD_REQUESTS.values()
                                            if s == 400)
    assert delta("NOT_FOUND") == 1 and delta("RESOURCE_EXHAUSTED") == 1
    assert after['moe_embed_request_latency_seconds_count{method="http:/v1/embeddings"}'] > 0


def test_openapi_document_and_interactive_page(server) -> None:
    doc = requests.get(server.url + "/openapi.json", timeout=10).json()
    assert {"/v1/embeddings", "/v1/models", "/health", "/ready"} <= set(doc["paths"])
    body = doc["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]
    props = body["schema"]["properties"]
    assert {"input", "model", "encoding_format", "dimensions", "user", "task", "truncate",
            "normalize"} <= set(props)
    assert set(props["task"]["enum"]) == {"none", "search_query", "search_document",
                                          "classification", "clustering"}
    responses = doc["paths"]["/v1/embeddings"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "429", "503"} <= set(responses)
    assert "ErrorResponse" in doc["components"]["schemas"]
    page = requests.get(server.url + "/docs", timeout=10)
    assert page.status_code == 200 and "swagger" in page.text.lower()


def test_reflection_can_be_turned_off(server) -> None:
    """--no-reflection (this server): the reflection service is not there at all."""
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel())
    with pytest.raises(grpc.RpcError) as exc:
        list(stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_request_ids_are_echoed_and_made_up(server) -> None:
    given = _post(server, {"input": "a"}, headers={"x-request-id": "req-http-7"})
    assert given.headers["x-request-id"] == "req-http-7"
    made = _post(server, {"input": "a"}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{16}", made)


def test_a_large_body_is_written_off_the_loop(tiny_bundle, expected, multilingual_texts,
                                              monkeypatch) -> None:
    """While a body of more than INLINE_VALUES values is being written (held there), a one-text
    call is answered: the large body does not hold the HTTP loop; then it arrives whole. A body
    of INLINE_VALUES values is written on the loop itself."""
    dims = 64  # the tiny model's
    n = INLINE_VALUES // dims + 1  # the first count written off the loop
    written, release = threading.Event(), threading.Event()

    where: dict[int, str] = {}  # inputs -> the thread that wrote the body

    def held(vectors, *args):
        where[len(vectors)] = threading.current_thread().name
        if values_in(vectors) > INLINE_VALUES:
            written.set()
            assert release.wait(60)
        return embeddings_body(vectors, *args)

    monkeypatch.setattr(http_app, "embeddings_body", held)
    srv = ServerThread(tiny_bundle, http_port=free_port(), max_inputs=n, reflection=False)
    srv.start()
    try:
        texts = [multilingual_texts[i % len(multilingual_texts)] for i in range(n)]
        big: dict = {}
        heavy = threading.Thread(target=lambda: big.update(r=_post(srv, {"input": texts})))
        heavy.start()
        assert written.wait(60)
        light = _post(srv, {"input": texts[:1]}, timeout=20)
        assert light.status_code == 200 and heavy.is_alive()
        release.set()
        heavy.join(60)
        assert big["r"].status_code == 200
        got = np.array([d["embedding"] for d in big["r"].json()["data"]], np.float32)
        np.testing.assert_allclose(got, expected(texts, "none"), atol=TOL, rtol=0)
        np.testing.assert_allclose(light.json()["data"][0]["embedding"], got[0], atol=TOL,
                                   rtol=0)
        at_limit = _post(srv, {"input": texts[: n - 1]})  # INLINE_VALUES values: on the loop
        assert at_limit.status_code == 200 and len(at_limit.json()["data"]) == n - 1
        assert where[n].startswith("moe-embed-http-respond")
        assert where[1] == where[n - 1] == "moe-embed-http"
    finally:
        release.set()
        srv.stop()


def test_many_concurrent_http_and_grpc_clients_agree(server, expected, multilingual_texts) -> None:
    """HTTP and gRPC requests interleaved on the same batcher: each gets its own vectors."""
    texts = multilingual_texts[:12]
    want = expected(texts, "none")
    errors: list[BaseException] = []

    def http_client(k: int) -> None:
        session = requests.Session()
        for i in range(8):
            j = (k + i) % len(texts)
            try:
                got = session.post(server.url + "/v1/embeddings",
                                   json={"input": texts[j:j + 2]}, timeout=60).json()
                np.testing.assert_allclose([d["embedding"] for d in got["data"]],
                                           want[j:j + 2], atol=1e-5, rtol=0)
            except BaseException as exc:
                errors.append(exc)

    def grpc_client(k: int) -> None:
        for i in range(8):
            j = (k + i) % len(texts)
            try:
                np.testing.assert_allclose(vectors(_grpc(server, texts[j:j + 2])),
                                           want[j:j + 2], atol=1e-5, rtol=0)
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=f, args=(k,)) for k in range(3)
               for f in (http_client, grpc_client)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    assert time.monotonic() - start < 60



# ---- load, queue, disconnects, SIGTERM: `moe-embed serve` whose worker the test pauses --------


def test_loading_is_503_with_retry_after_and_ready_says_why(tiny_bundle) -> None:
    """The loading state is created (listening, workers not started), not raced for."""
    srv = ServerThread(tiny_bundle, http_port=free_port()).start(wait_ready=False, load=False)
    try:
        early = requests.post(srv.url + "/v1/embeddings", json={"input": "x"}, timeout=30)
        assert early.status_code == 503 and early.headers["Retry-After"] == "1"
        assert early.json()["error"]["code"] == "unavailable"
        ready = requests.get(srv.url + "/ready", timeout=30)
        assert (ready.status_code, ready.json()) == (503, {"status": "loading"})
        assert ready.headers["Retry-After"] == "1"
        assert requests.get(srv.url + "/health", timeout=30).status_code == 200
        srv.load()
        srv.wait_ready()
        assert requests.get(srv.url + "/ready", timeout=30).json() == {"status": "ok"}
        assert requests.post(srv.url + "/v1/embeddings", json={"input": "x"},
                             timeout=30).status_code == 200
    finally:
        srv.stop()


def test_loading_queue_full_disconnect_and_sigterm_drain(tiny_bundle, tmp_path) -> None:
    """While loading: embeddings 503 with Retry-After, /ready 503 `loading`, /health 200. With
    the only worker stopped (both its slots taken): a client that hangs up has its request
    CANCELLED and its queued input dropped; a full queue is 429 with Retry-After. SIGTERM: the
    HTTP port stays open through the drain (uvicorn must not take the signal), /ready says
    `draining`, new requests get 503 with `Connection: close`, the requests admitted before
    finish with 200, and the process exits 0."""
    with ServeProcess(tiny_bundle, tmp_path / "serve.log", "--workers", "1", "--max-queue", "4",
                      MOE_EMBED_DRAIN_GRACE_S="30") as srv:
        url = srv.url + "/v1/embeddings"

        def answered(path: str) -> bool:
            try:
                return requests.get(srv.url + path, timeout=5) is not None
            except requests.ConnectionError:
                return False

        wait_for(lambda: answered("/health") or srv.proc.poll() is not None, 60,
                 "the HTTP port to open", interval=0.05)
        early = requests.post(url, json={"input": "too early"}, timeout=10)
        ready = requests.get(srv.url + "/ready", timeout=10)
        if ready.status_code == 503:  # still loading, so `early` came while loading too
            assert ready.json() == {"status": "loading"}
            assert early.status_code == 503 and early.headers["Retry-After"] == "1"
            assert early.json()["error"]["code"] == "unavailable"
        srv.wait_serving()
        assert requests.get(srv.url + "/ready", timeout=10).json() == {"status": "ok"}
        with socket.create_connection(("127.0.0.1", srv.http_port), timeout=10) as sock:
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")  # uvicorn logs it: as a JSON line
            assert sock.recv(100).startswith(b"HTTP/1.1 400")

        def metric(key: str) -> float:
            return srv.metrics().get(key, 0.0)

        def dispatched() -> float:
            return metric("moe_embed_batch_size_inputs_sum")

        def queued() -> float:
            return metric("moe_embed_queue_depth")

        held: dict[str, requests.Response] = {}

        def hold(name: str, n: int) -> threading.Thread:
            t = threading.Thread(target=lambda: held.setdefault(name, requests.post(
                url, json={"input": [f"{name} {i}" for i in range(n)]}, timeout=60)))
            t.start()
            return t

        (worker,) = srv.worker_pids()
        before = dispatched()  # `early`, when the server was ready before it came
        os.kill(worker, signal.SIGSTOP)  # nothing finishes until SIGCONT
        try:
            holders = [hold("a", 3)]
            wait_for(lambda: dispatched() == before + 3, 10, "a batch in flight", interval=0.05)
            holders.append(hold("b", 1))
            wait_for(lambda: dispatched() == before + 4 and queued() == 0, 10,
                     "the express slot taken", interval=0.05)

            with pytest.raises(requests.Timeout):  # queued; the client gives up, hangs up
                requests.post(url, json={"input": "gone"}, timeout=0.5)
            cancelled = 'moe_embed_requests_total{code="CANCELLED",method="http:/v1/embeddings"}'
            wait_for(lambda: metric(cancelled) == 1, 10, "the request to be cancelled",
                     interval=0.05)
            assert queued() == 0 and metric("moe_embed_inputs_dropped_total") == 1

            holders.append(hold("c", 4))
            wait_for(lambda: queued() == 4, 10, "the queue to fill", interval=0.05)
            full = requests.post(url, json={"input": "one more"}, timeout=10,
                                 headers={"x-request-id": "queue-full-1"})
            assert full.status_code == 429, full.text
            assert full.headers["Retry-After"] == "1"
            assert full.json()["error"]["code"] == "queue_full"

            srv.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: srv.events("draining"), 10, "the drain to begin")
            for _ in range(6):  # over several of uvicorn's 0.1 s ticks: the port stays open
                ready = requests.get(srv.url + "/ready", timeout=10)
                assert (ready.status_code, ready.json()) == (503, {"status": "draining"})
                time.sleep(0.1)
            late = requests.post(url, json={"input": "late"}, timeout=10)
            assert late.status_code == 503 and late.headers["Connection"] == "close"
            assert "draining" in late.json()["error"]["message"]
        finally:
            os.kill(worker, signal.SIGCONT)
        for t in holders:
            t.join(60)
        assert {k: (r.status_code, len(r.json()["data"])) for k, r in held.items()} == {
            "a": (200, 3), "b": (200, 1), "c": (200, 4)}
        assert srv.proc.wait(60) == 0
    assert '"finished_in_grace": true' in srv.log_path.read_text()
    # JSON lines only (uvicorn's records too), and HTTP failures logged like gRPC's
    lines = [line for line in srv.log_path.read_text().splitlines() if line.strip()]
    assert all(line.startswith("{") and json.loads(line) for line in lines), lines[:5]
    assert any("Invalid HTTP request" in e.get("message", "") for e in srv.events("uvicorn"))
    (refused,) = [e for e in srv.events("request_failed") if e["code"] == "RESOURCE_EXHAUSTED"]
    assert (refused["method"], refused["request_id"]) == ("http:/v1/embeddings", "queue-full-1")
