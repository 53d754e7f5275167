"""The doubtful cases of the second hostile probe, as decided (README, "Under load and
faults"): a NaN among token ids is that input's bad token id; a body framed by both
Content-Length and Transfer-Encoding is refused and its connection closed; HEAD works on the
probes' routes; /redoc is not served; the Content-Type is not required to be JSON; a key file
with a key no HTTP client could send is refused."""

from __future__ import annotations

import socket

import pytest
import requests

from moe_embed.service.security import ApiKeys, SecurityError
from moe_embed.testing.service import ServerThread, free_port


@pytest.fixture(scope="module")
def server(tiny_bundle):
    srv = ServerThread(tiny_bundle, http_port=free_port()).start()
    yield srv
    srv.stop()


def _post(server, body: bytes, content_type: str = "application/json") -> requests.Response:
    return requests.post(server.url + "/v1/embeddings", data=body, timeout=60,
                         headers={"Content-Type": content_type})


@pytest.mark.parametrize("ids", [b"[1, NaN]", b"[1, Infinity]", b"[1, 2.5]", b"[[1, true]]"])
def test_a_non_integer_among_token_ids_names_that_input(server, ids) -> None:
    resp = _post(server, b'{"input": ' + ids + b"}")
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "input[0]"
    assert "is not an integer" in error["message"]


def test_a_body_framed_twice_is_refused_and_the_connection_closed(server) -> None:
    body = b'{"input": "hello"}'
    with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=60) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\n"
                     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
                     + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):  # the server closes after answering
            reply += chunk
    head = reply.split(b"\r\n\r\n")[0].lower()
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:300]
    assert b"connection: close" in head
    assert b'"param":"Content-Length"' in reply


@pytest.mark.parametrize("path", ["/health", "/ready"])
def test_head_answers_on_the_probe_routes(server, path) -> None:
    resp = requests.head(server.url + path, timeout=10)
    assert resp.status_code == 200 and resp.content == b""


def test_redoc_is_not_served_and_docs_is(server) -> None:
    assert requests.get(server.url + "/redoc", timeout=10).status_code == 404
    assert requests.get(server.url + "/docs", timeout=10).status_code == 200


def test_any_content_type_is_read_as_json(server) -> None:
    """`curl -d` sends application/x-www-form-urlencoded: the body is JSON all the same."""
    resp = _post(server, b'{"input": "hello"}', "application/x-www-form-urlencoded")
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("content", ["sk-good\nsk-ключ\n".encode(), bytes(range(256)) * 4],
                         ids=["non-ascii-key", "binary-garbage"])
def test_a_key_file_a_client_could_not_use_is_refused(tmp_path, content) -> None:
    """A key that is not printable ASCII can never arrive in an HTTP header: the file is
    refused (at start: the server stops naming it; on reload: the last good keys stay)."""
    path = tmp_path / "keys.txt"
    path.write_bytes(content)
    with pytest.raises(SecurityError, match="not printable ASCII"):
        ApiKeys.from_file(str(path))
    path.write_bytes(b"# ok\nsk-good\n")
    assert len(ApiKeys.from_file(str(path))) == 1
