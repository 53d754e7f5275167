"""Slow and idle clients against a real `moe-embed serve` process: every phase of an HTTP
connection has a deadline, a port holds a bounded number of connections, the metrics port
spends no thread per connection, and running out of descriptors costs a few JSON lines.

Each condition is created, not waited for: a socket that stops mid-header or mid-body, a
descriptor limit lowered on the running server with prlimit.
"""

from __future__ import annotations

import json
import resource
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from grpc_health.v1 import health_pb2

from moe_embed.testing import procfs
from moe_embed.testing.service import (
    ServeProcess,
    ServerThread,
    free_port,
    health_status,
    scrape,
    wait_for,
)
from moe_embed.v1 import embedder_pb2 as pb

SHORT_S = 2  # the timeouts of the `short` server
CLOSE_WAIT_S = 90  # generous: a closed socket is seen long before this on any machine
HOLD = 4  # connections the `bounded` server holds


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=CLOSE_WAIT_S)
    return sock


def _closed_by_server(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (raises on a timeout)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def _get(sock: socket.socket, path: str) -> bytes:
    """One keep-alive GET on an open connection; its whole response."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head


def _json_lines(path: Path) -> list[dict]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    bad = [line for line in lines if not line.startswith("{")]
    assert not bad, bad[:5]
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def short(tiny_bundle, tmp_path_factory):
    """A server whose HTTP and metrics connections get SHORT_S for every phase."""
    log = tmp_path_factory.mktemp("short") / "serve.log"
    with ServeProcess(tiny_bundle, log, "--workers", "1",
                      "--http-header-timeout-s", str(SHORT_S),
                      "--http-body-timeout-s", str(SHORT_S),
                      "--http-keepalive-s", str(SHORT_S)) as srv:
        yield srv.wait_serving()


@pytest.fixture(scope="module")
def bounded(tiny_bundle, tmp_path_factory):
    """A server that holds HOLD HTTP connections, each as long as the test likes."""
    log = tmp_path_factory.mktemp("bounded") / "serve.log"
    with ServeProcess(tiny_bundle, log, "--workers", "1", "--http-header-timeout-s", "600",
                      "--http-keepalive-s", "600",
                      "--http-max-connections", str(HOLD)) as srv:
        yield srv.wait_serving()


@pytest.mark.parametrize("sent", [b"", b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nCont"],
                         ids=["nothing", "half-a-header"])
def test_a_connection_without_its_headers_is_closed(short, sent) -> None:
    before = short.metrics().get(
        'moe_embed_connections_closed_total{port="http",reason="headers_timeout"}', 0)
    with _connect(short.http_port) as sock:
        sock.sendall(sent)
        assert _closed_by_server(sock) == b""  # closed, nothing sent back
    after = short.metrics()
    assert after['moe_embed_connections_closed_total{port="http",reason="headers_timeout"}'] \
        == before + 1


def test_a_body_that_stops_halfway_gets_408_and_counts_as_cancelled(short) -> None:
    with _connect(short.http_port) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                     b'{"input": "he')
        reply = _closed_by_server(sock)
    assert reply.startswith(b"HTTP/1.1 408 ")
    cancelled = 'moe_embed_requests_total{code="CANCELLED",method="http:/v1/embeddings"}'
    wait_for(lambda: short.metrics().get(cancelled, 0) >= 1, 30, "the request to be counted")
    m = short.metrics()
    assert m['moe_embed_connections_closed_total{port="http",reason="body_timeout"}'] >= 1
    assert not any("INTERNAL" in k for k in m)
    assert not short.events("request_error")


def test_bytes_after_a_response_restart_the_header_deadline(short) -> None:
    """uvicorn stops its keep-alive timer at the first byte of a next request: half a header
    after a response must not hold the connection for ever."""
    with _connect(short.http_port) as sock:
        assert _get(sock, "/health").startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")
        assert _closed_by_server(sock) == b""


def test_an_idle_keep_alive_connection_is_closed(short) -> None:
    with _connect(short.http_port) as sock:
        assert _get(sock, "/health").startswith(b"HTTP/1.1 200")
        assert _closed_by_server(sock) == b""


def test_an_idle_metrics_connection_is_closed(short) -> None:
    with _connect(short.metrics_port) as sock:
        sock.sendall(b"GET /metr")
        assert _closed_by_server(sock) == b""
    assert short.metrics()[
        'moe_embed_connections_closed_total{port="metrics",reason="headers_timeout"}'] >= 1


def test_a_port_holds_at_most_its_connections_and_refuses_the_rest(bounded) -> None:
    held = [_connect(bounded.http_port) for _ in range(HOLD)]
    try:
        for sock in held:  # each one accepted and served: the port holds HOLD
            assert _get(sock, "/health").startswith(b"HTTP/1.1 200")
        with _connect(bounded.http_port) as extra:
            assert _closed_by_server(extra) == b""  # one past the bound: closed at once
        assert bounded.metrics()[
            'moe_embed_connections_closed_total{port="http",reason="max_connections"}'] == 1
    finally:
        held.pop().close()
    try:  # one given back: a new client is served again
        wait_for(lambda: requests.get(bounded.url + "/health", timeout=10).ok, 30,
                 "a connection to be served again")
    finally:
        for sock in held:
            sock.close()
    (line,) = bounded.events("connection_refused")  # one line, with the bound
    assert line["max_connections"] == HOLD


def test_idle_metrics_connections_cost_no_threads(bounded) -> None:
    """Half a request line on each of 40 sockets: the old threaded server parked a thread on
    each. A complete scrape after them proves they were all accepted (accepts are in order)."""
    pid = bounded.proc.pid
    scrape(bounded.metrics_port)
    before = procfs.thread_count(pid)
    idle = [_connect(bounded.metrics_port) for _ in range(40)]
    try:
        for sock in idle:
            sock.sendall(b"GET /met")
        assert "moe_embed_queue_depth" in scrape(bounded.metrics_port)
        assert procfs.thread_count(pid) <= before + 2  # not one per connection
    finally:
        for sock in idle:
            sock.close()


def test_running_out_of_descriptors_costs_one_json_line(tiny_bundle, tmp_path) -> None:
    """With the descriptor limit lowered under the running server, new HTTP connections cannot
    be accepted: the server logs that once per interval (asyncio retries every second), never
    a traceback per retry, and serves again once descriptors are back."""
    log = tmp_path / "serve.log"
    with ServeProcess(tiny_bundle, log, "--workers", "1") as srv:
        srv.wait_serving()
        pid = srv.proc.pid
        used = procfs.fd_count(pid)
        old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (used + 8, old[1]))
        socks = []
        try:
            for _ in range(40):
                sock = socket.socket()
                sock.settimeout(10)
                sock.connect(("127.0.0.1", srv.http_port))  # the backlog takes them
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
                socks.append(sock)
            wait_for(lambda: srv.events("descriptors_exhausted"), 60, "the exhaustion log")
            started = time.monotonic()
            time.sleep(5)  # asyncio retries the accept every second meanwhile
            seen = len(srv.events("descriptors_exhausted"))
            assert seen <= 2 + (time.monotonic() - started) / 10, seen
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, old)
            for sock in socks:
                sock.close()
        wait_for(lambda: requests.get(srv.url + "/health", timeout=10).ok, 60,
                 "HTTP to serve again")
        lines = _json_lines(log)
        assert log.stat().st_size < 256 * 1024
        assert not [e for e in lines if "Traceback" in json.dumps(e)]


HOLD_S = 3.0  # how long the test keeps the HTTP API's event loop busy


def test_grpc_and_its_health_answer_while_the_http_loop_is_held(tiny_bundle) -> None:
    """A flood of HTTP connections keeps the HTTP API's event loop busy (~1.5 ms of uvicorn,
    h11 and routing each); gRPC and its health checks must not wait for its turns. The loop is
    held here by a Python spin that holds the GIL between switches, as that work does: gRPC
    health and an Embed answer meanwhile, the HTTP call only after."""
    srv = ServerThread(tiny_bundle, http_port=free_port()).start()
    try:
        http_loop = srv.server._http.loop
        held = threading.Event()

        def hold() -> None:
            held.set()
            end = time.monotonic() + HOLD_S
            while time.monotonic() < end:
                pass

        stub = srv.stub()
        stub.Embed(pb.EmbedRequest(inputs=["warm"], task=pb.TASK_SEARCH_QUERY), timeout=60)
        with ThreadPoolExecutor(1) as pool:
            http_loop.call_soon_threadsafe(hold)
            assert held.wait(10)
            started = time.monotonic()
            http = pool.submit(requests.get, srv.url + "/ready", timeout=60)
            assert health_status(srv.target) == health_pb2.HealthCheckResponse.SERVING
            resp = stub.Embed(pb.EmbedRequest(inputs=["während die HTTP-Schleife wartet"],
                                              task=pb.TASK_SEARCH_QUERY), timeout=60)
            grpc_s = time.monotonic() - started
            assert http.result().status_code == 200
            http_s = time.monotonic() - started
        assert len(resp.embeddings) == 1
        assert http_s >= HOLD_S * 0.8, http_s  # the loop really was held
        assert grpc_s < HOLD_S / 2, grpc_s
    finally:
        srv.stop()
