"""Certificates made in the test (trustme), written where a server reads them, and the real
clients that use them: gRPC channels, `requests`, the `openai` client, a bare TLS handshake to
see which certificate a port serves."""

from __future__ import annotations

import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
import trustme

from moe_embed.v1 import embedder_pb2_grpc as pb_grpc

HOST = "127.0.0.1"


@dataclass
class Pki:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as files."""

    ca: trustme.CA
    server: trustme.LeafCert
    client: trustme.LeafCert
    dir: Path

    @classmethod
    def make(cls, directory: Path) -> Pki:
        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        pki = cls(ca, ca.issue_cert(HOST, "localhost"), ca.issue_cert("client-a"), directory)
        pki.ca.cert_pem.write_to_path(str(pki.ca_file))
        pki.client.private_key_and_cert_chain_pem.write_to_path(str(pki.client_file))
        return pki

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def client_file(self) -> Path:
        return self.dir / "client.pem"

    @property
    def server_der(self) -> bytes:
        return ssl.PEM_cert_to_DER_cert(self.server.cert_chain_pems[0].bytes().decode())

    def install(self, cert: Path, key: Path, ca: Path | None = None) -> None:
        """Write the server's files the way a Secret volume changes: each replaced whole
        (a new file renamed over the old), never rewritten in place."""
        writes = [(cert, b"".join(b.bytes() for b in self.server.cert_chain_pems)),
                  (key, self.server.private_key_pem.bytes())]
        if ca is not None:
            writes.append((ca, self.ca.cert_pem.bytes()))
        for path, data in writes:
            tmp = path.with_suffix(".new")
            tmp.write_bytes(data)
            os.replace(tmp, path)

    def channel_credentials(self, client_cert: bool = True) -> grpc.ChannelCredentials:
        if not client_cert:
            return grpc.ssl_channel_credentials(self.ca.cert_pem.bytes())
        return grpc.ssl_channel_credentials(
            self.ca.cert_pem.bytes(), self.client.private_key_pem.bytes(),
            b"".join(b.bytes() for b in self.client.cert_chain_pems))

    def stub(self, port: int, client_cert: bool = True) -> pb_grpc.EmbedderStub:
        return pb_grpc.EmbedderStub(self.channel(port, client_cert))

    def channel(self, port: int, client_cert: bool = True) -> grpc.Channel:
        return grpc.secure_channel(f"{HOST}:{port}", self.channel_credentials(client_cert))

    def requests_kwargs(self, client_cert: bool = True) -> dict:
        """verify= and cert= for `requests`."""
        kw: dict = {"verify": str(self.ca_file)}
        if client_cert:
            kw["cert"] = str(self.client_file)
        return kw

    def ssl_context(self, client_cert: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if client_cert:
            ctx.load_cert_chain(str(self.client_file))
        return ctx


def served_certificate(port: int, alpn: str = "http/1.1") -> bytes:
    """The DER certificate a TLS port presents (no verification: only to look at it)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([alpn])
    with socket.create_connection((HOST, port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=HOST) as tls:
        return tls.getpeercert(binary_form=True)


def write_keys(path: Path, *keys: str) -> None:
    """An API-key file (with a comment and a blank line), replaced in one rename."""
    tmp = path.with_suffix(".new")
    tmp.write_text("# API keys of the test\n\n" + "\n".join(keys) + "\n")
    os.replace(tmp, path)


def locked_server(bundle: Path, pki: Pki, files: Path, *keys: str):  # -> ServeProcess
    """`moe-embed serve` with mTLS, these API keys and a plaintext health port (not started
    waiting: use it as a context manager and call `wait_serving`)."""
    from .service import ServeProcess, free_port

    cert, key, key_file = files / "tls.crt", files / "tls.key", files / "api-keys"
    pki.install(cert, key)
    write_keys(key_file, *keys)
    health_port = free_port()
    srv = ServeProcess(bundle, files / "serve.log", "--workers", "1",
                       "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                       "--tls-client-ca-file", str(pki.ca_file), "--api-key-file", str(key_file),
                       "--health-port", str(health_port))
    srv.health_target = f"{HOST}:{health_port}"
    return srv
