"""Token-id bodies are bounded before they cost anything: the values a body holds are counted
as it arrives (service/http/json_scan.py), and a body with more than any request can take
(max_inputs inputs of max_tokens ids), or a list of more ids than one input may hold (what
truncation keeps: token ids are never truncated), is refused before it is read whole or
parsed."""

from __future__ import annotations

import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest
import requests

from moe_embed.service.errors import InvalidInput
from moe_embed.service.http.json_scan import TooManyValues, ValueCounter
from moe_embed.service.validation import Limits, validate_embed
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


def _fed_whole_and_in_pieces(body: bytes, counter: callable, step: int) -> list:
    """What feeding `body` whole, and in pieces of `step` bytes, raises (None when nothing)."""
    outcomes = []
    for size in (len(body), step):
        c = counter()
        try:
            for i in range(0, len(body), size):
                c.feed(body[i:i + size])
            outcomes.append(None)
        except TooManyValues as exc:
            outcomes.append((exc.kind, exc.field, exc.index))
    return outcomes


def test_the_counter_refuses_a_list_one_past_max_ids_naming_its_field_and_input() -> None:
    rng = random.Random(1)
    def counter():
        return ValueCounter(10 ** 9, 10 ** 9, 8, 10 ** 9)
    for _ in range(300):
        inputs: list = [rng.choice(["a, [b] {c}", [1] * rng.randint(1, 8), "\\\"x"])
                        for _ in range(rng.randint(1, 5))]
        extra = {"e": [[1, 2], {"k": [3] * 8, "s": "[,,"}], "f": "]"}
        body = orjson.dumps({**extra, "input": inputs} if rng.random() < 0.5
                            else {"input": inputs, **extra})
        for outcome in _fed_whole_and_in_pieces(body, counter, rng.randint(1, 9)):
            assert outcome is None, body
        long = rng.randrange(len(inputs) + 1)
        inputs.insert(long, [2] * 9)
        body = orjson.dumps({**extra, "input": inputs})
        for outcome in _fed_whole_and_in_pieces(body, counter, rng.randint(1, 9)):
            assert outcome == ("ids", "input", long), body
    flat = orjson.dumps({"input": [4] * 9})
    assert _fed_whole_and_in_pieces(flat, counter, 3) == [("ids", "input", 0)] * 2
    other = orjson.dumps({"input": "x", "other": [4] * 9})
    assert _fed_whole_and_in_pieces(other, counter, 2) == [("ids", "other", None)] * 2
    deeper = orjson.dumps({"input": [[1], [[4] * 9]]})  # no input's list: no index
    assert _fed_whole_and_in_pieces(deeper, counter, 2) == [("ids", "input", None)] * 2
    top = orjson.dumps([[1], [4] * 9])  # not an object: no field
    assert _fed_whole_and_in_pieces(top, counter, 2) == [("ids", "body", None)] * 2
    stray = b']]}}{"input": [' + b"4," * 8  # closings with nothing open: invalid, no crash
    assert _fed_whole_and_in_pieces(stray, counter, 2) == [("ids", "input", 0)] * 2
    # texts, and numbers between texts, are no list of ids however many
    texts = orjson.dumps({"input": ["a"] * 20 + [1, 1, 1, 1, "b", 1, 1, 1, 1, 1]})
    assert _fed_whole_and_in_pieces(texts, counter, 2) == [None] * 2


def test_the_counter_counts_a_list_past_its_first_16_kb_in_one_chunk() -> None:
    """A piece is counted in two parts (the first 16 KB first, to refuse early): ids padded
    with spaces put the 513th past them; whole chunks, as a fast client's arrive."""
    padded = b'{"input": [' + b",".join([b"7" + b" " * 40] * (MAX_TOKENS + 1)) + b"]}"
    at = b'{"input": [' + b",".join([b"7" + b" " * 40] * MAX_TOKENS) + b"]}"
    assert len(padded) > 16 << 10
    counter = ValueCounter(MAX_VALUES, 100, MAX_TOKENS, 100)
    counter.feed(at)
    assert counter.values == MAX_TOKENS - 1
    with pytest.raises(TooManyValues) as exc:
        ValueCounter(MAX_VALUES, 100, MAX_TOKENS, 100).feed(padded)
    assert (exc.value.kind, exc.value.field, exc.value.index) == ("ids", "input", 0)


def test_the_counter_refuses_one_past_its_brackets() -> None:
    at = b'{"input": [[1], [2], [3]]}'  # 10 brackets and braces
    assert ValueCounter(10 ** 9, 10 ** 9, 10, 10).feed(at) is None
    with pytest.raises(TooManyValues) as exc:
        ValueCounter(10 ** 9, 10 ** 9, 10, 10).feed(b'{"input": [[1], [2], [3], [4], [')  # 11
    assert exc.value.kind == "containers"


@pytest.mark.parametrize("truncate", [True, False])
def test_the_validator_takes_512_ids_and_refuses_513_whatever_truncate_says(truncate) -> None:
    """The in-process API and every other caller of the one validator (HTTP refuses such a
    list while counting, before the validator sees it)."""
    limits = Limits(8, 64, MAX_TOKENS, 1000)
    validate_embed(["x", [5] * MAX_TOKENS], "none", 0, limits, truncate)
    with pytest.raises(InvalidInput) as exc:
        validate_embed(["x", [5] * 2, [5] * (MAX_TOKENS + 1)], "none", 0, limits, truncate)
    assert (exc.value.field, exc.value.index) == ("inputs", 2)
    assert f"is {MAX_TOKENS + 1} token ids long" in exc.value.message


@pytest.fixture(scope="module")
def server(tiny_bundle):
    srv = ServerThread(tiny_bundle, http_port=free_port(), max_inputs=MAX_INPUTS).start()
    yield srv
    srv.stop()


def _post(server, body: dict | bytes) -> requests.Response:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return requests.post(server.url + "/v1/embeddings", data=data, timeout=120,
                         headers={"Content-Type": "application/json"})


def test_a_body_over_the_values_of_the_largest_request_is_refused_at_one_past(server) -> None:
    """max_inputs lists of 512 ids, and an ignored field's numbers up to the body's values
    bound (FIELD_ALLOWANCE beside the inputs): served; one more number: 413 `body`."""
    inputs = [[5] * MAX_TOKENS] * MAX_INPUTS
    spare = MAX_VALUES - (MAX_INPUTS * MAX_TOKENS - 1) - 1  # the commas left for "extra"
    at = _post(server, {"input": inputs, "extra": [1] * (spare + 1)})
    assert at.status_code == 200, at.text
    past = _post(server, {"input": inputs, "extra": [1] * (spare + 2)})
    assert past.status_code == 413, past.text
    error = past.json()["error"]
    assert (error["param"], error["code"]) == ("body", "request_too_large")
    assert f"{MAX_INPUTS} inputs of {MAX_TOKENS} token ids" in error["message"]


@pytest.mark.parametrize("truncate", [True, False])
def test_a_token_id_input_at_512_is_served_and_one_past_refused_naming_it(server,
                                                                        truncate) -> None:
    """Inputs mixed in one request (a text, a full list, a flat list alone): the one of 513
    ids is refused 400 naming its index, whether or not truncation was asked for."""
    at = _post(server, {"input": ["a text", [5] * MAX_TOKENS, [6] * MAX_TOKENS],
                        "truncate": truncate})
    assert at.status_code == 200, at.text
    assert [d["truncated"] for d in at.json()["data"]] == [False, False, False]
    for body, where in (({"input": ["a text", [5] * MAX_TOKENS, [6] * (MAX_TOKENS + 1)]},
                         "input[2]"),
                        ({"input": [[5] * 3, "a text", [6] * (MAX_TOKENS + 1), [7]]},
                         "input[2]"),
                        ({"extra": [[1], {"a": [2]}], "input": [[6] * (MAX_TOKENS + 1)]},
                         "input[0]"),
                        ({"input": [6] * (MAX_TOKENS + 1)}, "input[0]")):
        past = _post(server, {**body, "truncate": truncate})
        assert past.status_code == 400, past.text
        error = past.json()["error"]
        assert (error["param"], error["code"]) == (where, "invalid_argument"), (body.keys(), error)
        assert f"more than the model's {MAX_TOKENS}" in error["message"], error


def test_a_long_list_of_numbers_in_an_ignored_field_is_refused_naming_it(server) -> None:
    at = _post(server, {"input": "x", "extra": [1] * MAX_TOKENS})
    assert at.status_code == 200, at.text
    past = _post(server, {"input": "x", "extra": [1] * (MAX_TOKENS + 1)})
    assert past.status_code == 400, past.text
    assert past.json()["error"]["param"] == "extra"


def test_every_input_at_its_full_length_is_served(server) -> None:
    full = _post(server, {"input": [[5] * MAX_TOKENS] * MAX_INPUTS, "model": "synthetic-tiny"})
    assert full.status_code == 200, full.text
    assert full.json()["usage"]["prompt_tokens"] == MAX_INPUTS * MAX_TOKENS


def _refused_early(server, start: bytes) -> bytes:
    """Content-Length says 4 MB; only `start` is sent: the answer must come without the rest."""
    with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=60) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 4000000\r\n\r\n"
                     + start)
        return _response(sock)


def test_a_token_id_flood_is_refused_after_its_first_few_kilobytes(server) -> None:
    """One list of 4 MB of ids: refused once its first 513 ids (~4 KB) are in, naming it."""
    ids = b",".join([b"123456"] * (MAX_TOKENS + 1))
    reply = _refused_early(server, b'{"input": [' + ids)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    assert b'"param":"input[0]"' in reply.replace(b" ", b""), reply[-300:]


def test_many_full_lists_are_refused_once_they_exceed_the_largest_request(server) -> None:
    """Lists of 512 ids each: refused 413 once they hold more values than max_inputs of them."""
    lists = b",".join([b"[" + b",".join([b"123456"] * MAX_TOKENS) + b"]"] * (MAX_INPUTS + 1))
    reply = _refused_early(server, b'{"input": [' + lists)
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert b"request_too_large" in reply


def test_many_tiny_lists_are_refused_by_their_brackets(server) -> None:
    """`[1],[1],...`: each list costs a Python step to count, so lists are bounded too."""
    reply = _refused_early(server, b'{"input": [' + b",".join([b"[1]"] * 1000))
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    assert b"containers" in reply and f"at most {MAX_INPUTS} inputs".encode() in reply


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
