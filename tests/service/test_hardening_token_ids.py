"""Token-id bodies are bounded before they cost anything: the values a body holds are counted
as it arrives (service/http/json_scan.py), and a body with more than any request can take
(max_inputs inputs of max_tokens ids) is refused before it is read whole or parsed."""

from __future__ import annotations

import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest
import requests

from moe_embed.service.http.json_scan import TooManyValues, ValueCounter
from moe_embed.testing.service import ServerThread, free_port

MAX_INPUTS = 4
MAX_TOKENS = 512  # the tiny bundle's
FIELD_ALLOWANCE = 64
MAX_VALUES = MAX_INPUTS * MAX_TOKENS + FIELD_ALLOWANCE


def _reference(body: bytes) -> tuple[int, int]:
    """Commas outside strings and strings, by walking the JSON text character by character."""
    commas = strings = 0
    inside = escaped = False
    for c in body.decode():
        if inside:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                inside = False
        elif c == '"':
            inside, strings = True, strings + 1
        elif c == ",":
            commas += 1
    return commas, strings


def _response(sock: socket.socket) -> bytes:
    """One whole HTTP response (head and Content-Length body), however it arrives."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head = data.split(b"\r\n\r\n")[0]
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(data) < len(head) + 4 + length:
        data += sock.recv(65536)
    return data


def test_the_counter_agrees_with_a_character_walk_however_the_body_is_split() -> None:
    rng = random.Random(0)
    alphabet = 'ab,"\\\n é嵌'
    for _ in range(2000):
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
                 for _ in range(rng.randint(1, 5))]
        body = orjson.dumps({"input": [*texts, [rng.randint(0, 9) for _ in range(6)]],
                             "k": [1, "\\"]})
        counter, i = ValueCounter(10 ** 9, 10 ** 9), 0
        while i < len(body):
            step = rng.randint(1, 7)
            counter.feed(body[i:i + step])
            i += step
        assert (counter.values, counter.strings) == _reference(body), body


def test_the_counter_refuses_one_past_its_bounds() -> None:
    at = ValueCounter(10, 3)
    at.feed(b'{"a": [' + b",".join([b"1"] * 11) + b"]}")  # 10 commas, 1 string
    with pytest.raises(TooManyValues) as exc:
        ValueCounter(10, 3).feed(b'{"a": [' + b",".join([b"1"] * 12) + b"]}")
    assert exc.value.kind == "values"
    ValueCounter(10, 3).feed(b'["a", "b", "c"]')
    with pytest.raises(TooManyValues) as exc:
        ValueCounter(10, 3).feed(b'["a", "b", "c", "d"]')
    assert exc.value.kind == "strings"


@pytest.fixture(scope="module")
def server(tiny_bundle):
    srv = ServerThread(tiny_bundle, http_port=free_port(), max_inputs=MAX_INPUTS).start()
    yield srv
    srv.stop()


def _post(server, body: dict | bytes) -> requests.Response:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return requests.post(server.url + "/v1/embeddings", data=data, timeout=120,
                         headers={"Content-Type": "application/json"})


def test_token_ids_up_to_the_bound_are_served_and_one_past_is_refused(server) -> None:
    at = _post(server, {"input": [[5] * (MAX_VALUES + 1)]})  # MAX_VALUES commas
    assert at.status_code == 200, at.text
    assert at.json()["data"][0]["truncated"] is True
    past = _post(server, {"input": [[5] * (MAX_VALUES + 2)]})
    assert past.status_code == 413, past.text
    error = past.json()["error"]
    assert (error["param"], error["code"]) == ("body", "request_too_large")
    assert f"{MAX_INPUTS} inputs of {MAX_TOKENS} token ids" in error["message"]


def test_every_input_at_its_full_length_is_served(server) -> None:
    full = _post(server, {"input": [[5] * MAX_TOKENS] * MAX_INPUTS, "model": "synthetic-tiny"})
    assert full.status_code == 200, full.text
    assert full.json()["usage"]["prompt_tokens"] == MAX_INPUTS * MAX_TOKENS


def test_a_token_id_flood_is_refused_before_the_body_is_read_whole(server) -> None:
    """Content-Length says 4 MB; the server answers once the first ~100 KB prove it too many
    ids, while the rest has not been sent."""
    ids = b",".join([b"123456"] * 15_000)
    with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=60) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 4000000\r\n\r\n"
                     b'{"input": [' + ids)
        reply = _response(sock)
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert b"request_too_large" in reply


def test_commas_inside_texts_are_not_values(server) -> None:
    text = "a, \\\"b\\\", " * (MAX_VALUES // 2)  # far more commas than values allowed
    resp = _post(server, {"input": [text]})
    assert resp.status_code == 200, resp.text


def test_more_strings_than_inputs_allow_is_refused_naming_input(server) -> None:
    """Strings cost an object each to parse too, wherever they are (an ignored field here):
    up to the bound they are parsed (and ignored), one past it the body is refused."""
    strings = MAX_INPUTS + FIELD_ALLOWANCE - 3  # beside "input", its text, "extra"
    at = _post(server, {"input": "x", "extra": ["s"] * strings})
    assert at.status_code == 200, at.text
    resp = _post(server, {"input": "x", "extra": ["s"] * (strings + 1)})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "input"
    assert f"more than {MAX_INPUTS + FIELD_ALLOWANCE} strings" in resp.json()["error"]["message"]


def test_many_token_ids_are_checked_off_the_event_loop(tiny_bundle) -> None:
    """The tokenizing thread is held (made: a task that waits on an event): a request of a few
    bad ids is refused at once, on the event loop; one of many bad ids waits for the thread,
    so checking it never holds up the loop, and is refused once the thread is free."""
    server = ServerThread(tiny_bundle, http_port=free_port()).start()
    engine = server.server.engine
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait(60)

    try:
        engine._tokenizing.submit(hold)
        assert held.wait(10)
        with ThreadPoolExecutor(1) as pool:
            try:
                many = pool.submit(_post, server,
                                   {"input": [[5] * MAX_TOKENS] * 8 + [[7] * 500 + [-1]]})
                few = _post(server, {"input": [[5, -1]]})
                assert few.status_code == 400 and "-1" in few.json()["error"]["message"]
                time.sleep(0.5)  # long enough for an inline check to have answered
                assert not many.done()
            finally:
                release.set()
            refused = many.result(30)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == "input[8]"
    finally:
        server.stop()
