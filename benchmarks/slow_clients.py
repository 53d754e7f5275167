"""Hostile HTTP clients over raw sockets, shared by the soak (benchmarks/soak.py) and the
hardening measurements (benchmarks/hardening.py): sockets that stop mid-header, mid-body or
after a response, token-id floods, clients that hang up mid-body."""

from __future__ import annotations

import socket
import time

HOST = "127.0.0.1"
SLOW_KINDS = ("nothing", "half-header", "half-body", "idle-after-response")
HALF_BODY = (b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
             b"Content-Length: 100\r\n\r\n" + b'{"input": "he')
OPENING = {
    "nothing": b"",
    "half-header": b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Ty",
    "half-body": HALF_BODY,
    "idle-after-response": b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n",
}


def open_slow(port: int, kind: str) -> socket.socket:
    """A connection that sends the opening of `kind` and then nothing more."""
    sock = socket.create_connection((HOST, port), timeout=30)
    if OPENING[kind]:
        sock.sendall(OPENING[kind])
    sock.setblocking(False)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed the connection (reading what it sent meanwhile)."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def id_flood_body(megabytes: float = 4.0) -> bytes:
    """A body of token ids (in the vocabulary) about `megabytes` long."""
    count = int(megabytes * 1e6 / 7)
    return b'{"input": [[' + b",".join([b"123456"] * count) + b"]]}"


def post_raw(port: int, body: bytes, timeout: float = 60) -> tuple[int, float]:
    """POST `body` to /v1/embeddings as fast as the server takes it; (status, seconds). The
    status is that of the first response line; 0 when the connection failed."""
    start = time.perf_counter()
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\n"
                         b"Content-Type: application/json\r\nConnection: close\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
            try:
                sock.sendall(body)
            except OSError:  # refused before it was all sent: read the answer
                pass
            head = sock.recv(64)
    except OSError:
        return 0, time.perf_counter() - start
    status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/1.1 ") else 0
    return status, time.perf_counter() - start


def hang_up(port: int) -> None:
    """Send headers and half a body, then close: the server's request is cancelled."""
    with socket.create_connection((HOST, port), timeout=30) as sock:
        sock.sendall(HALF_BODY)
