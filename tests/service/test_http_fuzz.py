"""A schema-driven fuzz of the HTTP API against a real server and worker: schemathesis
generates requests from the server's own OpenAPI document (valid ones and ones that break
it), and hypothesis puts JSON of every type in every field and throws raw bytes at it. Bounded
and deterministic (derandomized, a fixed number of examples). No response may be a 5xx, every
one must be JSON with a documented status, and the worker must never be lost."""

from __future__ import annotations

import json

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from moe_embed.testing.service import ServerThread, free_port

EXAMPLES = 100  # per operation and mode; the whole module runs in well under a minute
FIELDS = ("input", "model", "encoding_format", "dimensions", "user", "task", "truncate",
          "normalize")
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def server(tiny_bundle):
    srv = ServerThread(tiny_bundle, http_port=free_port(), max_inputs=8,
                       max_message_bytes=256 * 1024).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def session() -> requests.Session:
    return requests.Session()


def _check(resp, documented: set[str]) -> None:
    """No server error; JSON with a documented status; an error in OpenAI's shape."""
    status = resp.status_code
    assert status < 500, (status, resp.text[:500])
    assert str(status) in documented or status in (404, 405), (status, resp.text[:500])
    body = json.loads(resp.content)
    if status >= 400:
        assert set(body) == {"error"}, body
        assert {"message", "type", "param", "code"} == set(body["error"]), body


def _fuzz(operation, mode: GenerationMode, base_url: str, session: requests.Session,
          documented: set[str]) -> list[int]:
    """Run EXAMPLES generated cases of one operation; the statuses seen."""
    statuses: list[int] = []

    @SETTINGS
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        resp = case.call(base_url=base_url, session=session, timeout=60)
        statuses.append(resp.status_code)
        _check(resp, documented)

    try:
        run()
    except Unsatisfiable:  # nothing to break in an operation without parameters or body
        assert mode == GenerationMode.NEGATIVE and not statuses
    return statuses


def test_schemathesis_finds_no_server_error(server, session) -> None:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    doc = requests.get(server.url + "/openapi.json", timeout=10).json()
    pids = server.pool.pids()
    seen: dict[str, list[int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        documented = set(doc["paths"][operation.path][operation.method.lower()]["responses"])
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            seen[f"{operation.method.upper()} {operation.path} {mode.value}"] = _fuzz(
                operation, mode, server.url, session, documented)
    embeddings = seen["POST /v1/embeddings positive"] + seen["POST /v1/embeddings negative"]
    assert len(embeddings) == 2 * EXAMPLES and {200, 400} <= set(embeddings), set(embeddings)
    assert server.pool.pids() == pids and server.pool.restarts == 0


# JSON of every type, nested a little
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)


@st.composite
def bodies(draw) -> bytes:
    """A valid request with one field replaced by any JSON, or any JSON, or any bytes."""
    kind = draw(st.sampled_from(["field", "field", "field", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(JSON_VALUES)).encode()
    body = {"input": ["hello world", "tschüss"], "dimensions": 32}
    body[draw(st.sampled_from(FIELDS))] = draw(JSON_VALUES)
    return json.dumps(body).encode()


def test_any_json_in_any_field_is_a_clear_4xx_or_a_result(server, session) -> None:
    url = server.url + "/v1/embeddings"
    doc = requests.get(server.url + "/openapi.json", timeout=10).json()
    documented = set(doc["paths"]["/v1/embeddings"]["post"]["responses"])
    pids = server.pool.pids()
    statuses: list[int] = []

    @settings(SETTINGS, max_examples=150)
    @given(body=bodies())
    @example(body=b'{"input": ["hello world"], "user": null, "model": null}')  # both sides,
    @example(body=b'{"input": ["hello world"], "normalize": "no"}')  # whatever is generated
    def run(body: bytes) -> None:
        resp = session.post(url, data=body, timeout=60)
        statuses.append(resp.status_code)
        _check(resp, documented)

    run()
    assert 400 in statuses and 200 in statuses  # the fuzz reached both sides
    assert server.pool.pids() == pids and server.pool.restarts == 0
    ok = session.post(url, json={"input": "still serving"}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 64
