"""Error accounting that tells the truth, and a log that is JSON line by line, against real
`moe-embed serve` processes: a client that hangs up is CANCELLED (never INTERNAL), a request
cut by the drain gets 503 (never uvicorn's 500 and traceback), an oversized Tokenize response
is RESOURCE_EXHAUSTED (never OK), a connection at its stream limit is counted, and gRPC core's
own lines come out as JSON."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
from pathlib import Path

import grpc
import pytest

from moe_embed.testing.service import ServeProcess, wait_for
from moe_embed.testing.tls import Pki
from moe_embed.v1 import embedder_pb2 as pb
from moe_embed.v1 import embedder_pb2_grpc as pb_grpc

HALF_BODY = (b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
             b"Content-Length: 100\r\n\r\n" + b'{"input": "he')


def _lines(path: Path) -> list[dict]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    bad = [line for line in lines if not line.startswith("{")]
    assert not bad, bad[:5]
    return [json.loads(line) for line in lines]


def _open_http_requests(srv: ServeProcess) -> int:
    """Connections to the HTTP port the server holds (from its own descriptors' sockets)."""
    port = f"{srv.http_port:04X}"
    established = 0
    for line in Path(f"/proc/{srv.proc.pid}/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if local.endswith(":" + port) and state == "01":
            established += 1
    return established


def _stub(srv: ServeProcess) -> pb_grpc.EmbedderStub:
    return pb_grpc.EmbedderStub(grpc.insecure_channel(srv.target))


@pytest.fixture(scope="module")
def served(tiny_bundle, tmp_path_factory):
    log = tmp_path_factory.mktemp("accounting") / "serve.log"
    with ServeProcess(tiny_bundle, log, "--workers", "1", "--max-message-bytes", "4096",
                      "--max-concurrent-streams", "3") as srv:
        yield srv.wait_serving()


def test_a_client_that_hangs_up_mid_body_is_cancelled_not_internal(served) -> None:
    cancelled = 'moe_embed_requests_total{code="CANCELLED",method="http:/v1/embeddings"}'
    before = served.metrics().get(cancelled, 0)
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", served.http_port), timeout=30) as sock:
            sock.sendall(HALF_BODY)
    wait_for(lambda: served.metrics().get(cancelled, 0) == before + 3, 60,
             "three hang-ups counted")
    assert not [k for k in served.metrics() if 'code="INTERNAL"' in k]
    assert not served.events("request_error")
    assert not [e for e in _lines(served.log_path) if "exception" in e]


def test_an_oversized_tokenize_response_is_resource_exhausted(served) -> None:
    inputs = ["a b c d e f g h i j k l m n o p q r s t u v w x y z"] * 40  # ~2 KB in
    request = pb.TokenizeRequest(inputs=inputs, task=pb.TASK_NONE)
    assert request.ByteSize() < 4096
    with pytest.raises(grpc.RpcError) as exc:
        _stub(served).Tokenize(request, timeout=30)
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Tokenize response to 40 inputs" in exc.value.details()
    refused = 'moe_embed_requests_total{code="RESOURCE_EXHAUSTED",method="Tokenize"}'
    wait_for(lambda: served.metrics().get(refused) == 1, 30, "the refusal to be counted")
    assert 'moe_embed_requests_total{code="OK",method="Tokenize"}' not in served.metrics()
    small = _stub(served).Tokenize(pb.TokenizeRequest(inputs=inputs[:4], task=pb.TASK_NONE),
                                   timeout=30)
    assert len(small.tokens) == 4  # under the limit: served


def test_a_connection_at_its_stream_limit_is_counted(served) -> None:
    """Three Embed calls held open (the worker stopped) on one channel with
    --max-concurrent-streams 3: the connection reached its limit, once."""
    metric = "moe_embed_grpc_stream_limit_reached_total"
    assert served.metrics()[metric] == 0
    (pid,) = served.worker_pids()
    os.kill(pid, signal.SIGSTOP)
    try:
        stub = _stub(served)
        calls = [stub.Embed.future(pb.EmbedRequest(inputs=[f"held {i}"], task=pb.TASK_NONE),
                                   timeout=120) for i in range(3)]
        wait_for(lambda: served.metrics()[metric] == 1, 60, "the limit to be counted")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert [len(c.result(120).embeddings) for c in calls] == [1, 1, 1]
    assert len(served.events("stream_limit_reached")) == 1


def test_a_request_cut_by_the_drain_gets_503_not_500(tiny_bundle, tmp_path) -> None:
    log = tmp_path / "serve.log"
    with ServeProcess(tiny_bundle, log, "--workers", "1", "--drain-grace-s", "3") as srv:
        srv.wait_serving()
        with socket.create_connection(("127.0.0.1", srv.http_port), timeout=60) as sock:
            sock.sendall(HALF_BODY)
            wait_for(lambda: _open_http_requests(srv) == 1, 60, "the request to be open")
            srv.proc.send_signal(signal.SIGTERM)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        assert srv.proc.wait(60) == 0
    assert reply.startswith(b"HTTP/1.1 503 "), reply[:300]
    assert b"draining" in reply
    lines = _lines(log)
    assert not [e for e in lines if "Exception in ASGI" in json.dumps(e)]
    assert [e for e in lines if e.get("event") == "request_failed"
            and e.get("code") == "UNAVAILABLE"]


def test_grpc_core_lines_are_json(tiny_bundle, tmp_path) -> None:
    """gRPC core writes to the stderr descriptor from C: at GRPC_VERBOSITY=info it says so at
    start, and a client that is no TLS client makes it log a handshake failure. Every line is
    JSON, core's as `stderr` events."""
    pki = Pki.make(tmp_path / "pki")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    pki.install(cert, key)
    log = tmp_path / "serve.log"
    with ServeProcess(tiny_bundle, log, "--workers", "1", "--tls-cert-file", str(cert),
                      "--tls-key-file", str(key), "--health-port", "0",
                      GRPC_VERBOSITY="info") as srv:
        wait_for(lambda: srv.events("serving") or srv.proc.poll() is not None, 120,
                 "the server to serve")
        for _ in range(3):  # plaintext HTTP/2 preface to a TLS port
            with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
                sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00" * 64)
                try:
                    sock.recv(1024)
                except (ConnectionResetError, ssl.SSLError, TimeoutError):
                    pass
        wait_for(lambda: srv.events("stderr"), 30, "a line from gRPC core")
        srv.stop()
    lines = _lines(log)
    core = [e for e in lines if e.get("event") == "stderr"]
    assert core and all(e["line"][:1] in "IWEF" for e in core), core[:3]
