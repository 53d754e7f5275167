"""TLS, mTLS and API keys on gRPC and HTTP, with certificates made in the test and real
handshakes: `moe-embed serve` processes on loopback, called by gRPC channels, `requests` and
the `openai` client; rotation by SIGHUP and by a file change, without a restart."""

from __future__ import annotations

import signal

import grpc
import numpy as np
import openai
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from moe_embed.service.client import EmbedClient, RemoteError
from moe_embed.testing.service import (
    SERVING,
    ServeProcess,
    ServerThread,
    free_port,
    vectors,
    wait_for,
)
from moe_embed.testing.tls import HOST, Pki, locked_server, served_certificate, write_keys
from moe_embed.v1 import embedder_pb2 as pb
from moe_embed.v1 import embedder_pb2_grpc as pb_grpc

KEY, OTHER_KEY, WRONG_KEY = "sk-test-0123456789abcdef", "sk-second-key", "sk-wrong"


def _embed(texts: list[str]) -> pb.EmbedRequest:
    return pb.EmbedRequest(inputs=texts, task=pb.TASK_NONE)


def _bearer(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


def _health(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5).status


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    return exc.value.code()


# ---- everything on: mTLS, keys, the plaintext health port -----------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki.make(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def locked(tiny_bundle, pki, tmp_path_factory):
    """A server with mTLS, two API keys and a plaintext health port."""
    with locked_server(tiny_bundle, pki, tmp_path_factory.mktemp("secrets"), KEY, OTHER_KEY) as srv:
        yield srv.wait_serving()


def test_grpc_over_mtls_with_a_key(locked, pki) -> None:
    """A client with a certificate and a key is served; the same call without the key, with a
    wrong one, or as a plaintext client is refused."""
    stub = pki.stub(locked.port)
    resp = stub.Embed(_embed(["hello"]), metadata=_bearer(KEY), timeout=30)
    assert len(resp.embeddings) == 1
    assert len(stub.Embed(_embed(["hi"]), metadata=_bearer(OTHER_KEY), timeout=30).embeddings)
    assert _code(lambda: stub.Embed(_embed(["x"]), timeout=10)) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: stub.Embed(_embed(["x"]), metadata=_bearer(WRONG_KEY), timeout=10)) \
        == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: list(stub.EmbedStream(iter([_embed(["x"])]), timeout=10))) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: stub.Info(pb.InfoRequest(), timeout=10)) == \
        grpc.StatusCode.UNAUTHENTICATED
    plain = pb.EmbedRequest(inputs=["x"], task=pb.TASK_NONE)
    with grpc.insecure_channel(locked.target) as channel:
        assert _code(lambda: pb_grpc.EmbedderStub(channel).Embed(
            plain, metadata=_bearer(KEY), timeout=5)) == grpc.StatusCode.UNAVAILABLE


def test_the_python_client_speaks_mtls_and_keys(locked, pki) -> None:
    with EmbedClient(locked.target, credentials=pki.channel_credentials(), api_key=KEY) as c:
        assert c.embed(["hello", "world"], task="search_query", dimensions=16).shape == (2, 16)
    with EmbedClient(locked.target, credentials=pki.channel_credentials()) as c, \
            pytest.raises(RemoteError) as exc:
        c.embed(["hello"], task="search_query")
    assert exc.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_mtls_refuses_a_client_without_a_certificate(locked, pki, tmp_path) -> None:
    """At the handshake, for gRPC and HTTP alike, whatever key it sends; a certificate from
    another CA is refused too."""
    stub = pki.stub(locked.port, client_cert=False)
    assert _code(lambda: stub.Embed(_embed(["x"]), metadata=_bearer(KEY), timeout=5)) == \
        grpc.StatusCode.UNAVAILABLE
    with pytest.raises((requests.exceptions.SSLError, requests.ConnectionError)):
        requests.post(locked.url.replace("http:", "https:") + "/v1/embeddings",
                      json={"input": "x"}, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=10, **pki.requests_kwargs(client_cert=False))
    stranger = Pki.make(tmp_path / "stranger")
    intruder = grpc.ssl_channel_credentials(
        pki.ca.cert_pem.bytes(), stranger.client.private_key_pem.bytes(),
        stranger.client.cert_chain_pems[0].bytes())
    with grpc.secure_channel(locked.target, intruder) as channel:
        assert _code(lambda: pb_grpc.EmbedderStub(channel).Embed(
            _embed(["x"]), metadata=_bearer(KEY), timeout=5)) == grpc.StatusCode.UNAVAILABLE


def test_http_over_mtls_with_a_key_and_the_openai_client(locked, pki) -> None:
    url = locked.url.replace("http:", "https:")
    ok = requests.post(url + "/v1/embeddings", json={"input": ["hello"]}, timeout=30,
                       headers={"Authorization": f"Bearer {KEY}"}, **pki.requests_kwargs())
    assert ok.status_code == 200, ok.text
    for headers in ({}, {"Authorization": f"Bearer {WRONG_KEY}"}, {"Authorization": KEY}):
        denied = requests.post(url + "/v1/embeddings", json={"input": ["hello"]}, timeout=30,
                               headers=headers, **pki.requests_kwargs())
        assert denied.status_code == 401, headers
        assert denied.headers["WWW-Authenticate"] == "Bearer"
        assert denied.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(url + "/v1/models", timeout=10, **pki.requests_kwargs()).status_code \
        == 401

    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0,
                           http_client=openai.DefaultHttpxClient(verify=pki.ssl_context()))
    got = client.embeddings.create(model="synthetic-tiny", input=["a", "b"], dimensions=16)
    want = pki.stub(locked.port).Embed(pb.EmbedRequest(inputs=["a", "b"], task=pb.TASK_NONE,
                                                       dimensions=16),
                                       metadata=_bearer(KEY), timeout=30)
    np.testing.assert_allclose([d.embedding for d in got.data], vectors(want), atol=1e-6,
                               rtol=0)
    wrong = openai.OpenAI(base_url=url + "/v1", api_key=WRONG_KEY, max_retries=0,
                          http_client=openai.DefaultHttpxClient(verify=pki.ssl_context()))
    with pytest.raises(openai.AuthenticationError):
        wrong.embeddings.create(model="synthetic-tiny", input="a")


def test_probes_pass_with_tls_and_keys_on(locked, pki) -> None:
    """The kubelet's gRPC probe speaks neither TLS nor keys: the plaintext health port answers
    it (health and nothing else). Health needs no key on the TLS ports either."""
    with grpc.insecure_channel(locked.health_target) as channel:
        assert _health(channel) == SERVING
        assert _health(channel, "moe_embed.v1.Embedder") == SERVING
        assert _code(lambda: pb_grpc.EmbedderStub(channel).Embed(_embed(["x"]), timeout=5)) \
            == grpc.StatusCode.UNIMPLEMENTED  # no data on the health port
    with pki.channel(locked.port) as channel:
        assert _health(channel, "moe_embed.v1.Embedder") == SERVING  # no key sent
    url = locked.url.replace("http:", "https:")
    for path in ("/health", "/ready"):
        resp = requests.get(url + path, timeout=10, **pki.requests_kwargs())
        assert (resp.status_code, resp.json()) == (200, {"status": "ok"}), path


def test_reflection_needs_a_key_and_keys_are_never_logged(locked, pki) -> None:
    def services(metadata=()) -> list[str]:
        with pki.channel(locked.port) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                metadata=metadata, timeout=10)
            return [s.name for r in replies for s in r.list_services_response.service]

    assert "moe_embed.v1.Embedder" in services(_bearer(KEY))
    assert _code(lambda: services()) == grpc.StatusCode.UNAUTHENTICATED
    refused = {e["method"].rsplit("/", 1)[-1] for e in locked.events("request_unauthenticated")}
    assert {"Embed", "ServerReflectionInfo"} <= refused, refused
    log = locked.log_path.read_text()
    for key in (KEY, OTHER_KEY, WRONG_KEY):
        assert key not in log
    m = locked.metrics()
    assert m['moe_embed_requests_total{code="UNAUTHENTICATED",method="Embed"}'] >= 2
    assert m['moe_embed_requests_total{code="UNAUTHENTICATED",method="http:/v1/embeddings"}'] \
        >= 1


# ---- rotation without a restart ---------------------------------------------------------------


def test_sighup_rotates_certificates_and_keys_without_a_restart(tiny_bundle, tmp_path) -> None:
    """TLS only (no client CA): a TLS gRPC call and a TLS HTTP call succeed. New files + SIGHUP:
    both ports serve the new certificate (of a new CA) to new connections, the new key works
    and the old one no longer does. A broken rotation is refused and the last good material
    stays in use."""
    old, new = Pki.make(tmp_path / "old"), Pki.make(tmp_path / "new")
    cert, key, keys = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "keys"
    old.install(cert, key)
    write_keys(keys, KEY)
    health_port = free_port()
    with ServeProcess(tiny_bundle, tmp_path / "serve.log", "--workers", "1",
                      "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                      "--api-key-file", str(keys), "--health-port", str(health_port)) as srv:
        srv.health_target = f"{HOST}:{health_port}"
        srv.wait_serving()
        https = srv.url.replace("http:", "https:") + "/v1/embeddings"

        def calls(pki: Pki, api_key: str) -> tuple[int, int]:
            """(gRPC embeddings, HTTP status) of one call each, trusting only `pki`'s CA."""
            with pki.channel(srv.port, client_cert=False) as channel:
                n = len(pb_grpc.EmbedderStub(channel).Embed(
                    _embed(["x"]), metadata=_bearer(api_key), timeout=30).embeddings)
            status = requests.post(https, json={"input": "x"}, timeout=30,
                                   headers={"Authorization": f"Bearer {api_key}"},
                                   **pki.requests_kwargs(client_cert=False)).status_code
            return n, status

        assert calls(old, KEY) == (1, 200)
        assert served_certificate(srv.port, "h2") == served_certificate(srv.http_port) == \
            old.server_der

        new.install(cert, key)
        write_keys(keys, OTHER_KEY)
        srv.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: srv.events("credentials_reloaded"), 10, "the reload")
        assert served_certificate(srv.port, "h2") == new.server_der
        assert served_certificate(srv.http_port) == new.server_der
        assert calls(new, OTHER_KEY) == (1, 200)
        with new.channel(srv.port, client_cert=False) as channel:
            assert _code(lambda: pb_grpc.EmbedderStub(channel).Embed(
                _embed(["x"]), metadata=_bearer(KEY), timeout=10)) == \
                grpc.StatusCode.UNAUTHENTICATED

        cert.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n")  # half written
        srv.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: srv.events("credentials_reload_failed"), 10, "the refused reload")
        assert served_certificate(srv.http_port) == new.server_der
        assert calls(new, OTHER_KEY) == (1, 200)
        assert srv.proc.poll() is None and len(srv.events("listening")) == 1  # never restarted


def test_a_changed_client_ca_is_picked_up_from_the_files(tiny_bundle, tmp_path) -> None:
    """No signal: the files are polled. After cert-manager-style replacement of tls.crt,
    tls.key and ca.crt, clients of the new CA get in and clients of the old one are refused
    (the old CA is no longer trusted), on gRPC and HTTP."""
    old, new = Pki.make(tmp_path / "old"), Pki.make(tmp_path / "new")
    cert, key, ca = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt"
    old.install(cert, key, ca)
    srv = ServerThread(tiny_bundle, http_port=free_port(), tls_cert_file=str(cert),
                       tls_key_file=str(key), tls_client_ca_file=str(ca))
    srv.server.reload_poll_s = 0.1
    srv.start()
    https = f"https://{HOST}:{srv.server.http_port}/v1/embeddings"
    try:
        assert len(old.stub(srv.server.port).Embed(_embed(["x"]), timeout=30).embeddings) == 1
        assert requests.post(https, json={"input": "x"}, timeout=30,
                             **old.requests_kwargs()).status_code == 200
        reloads = srv.server.security.reloads
        new.install(cert, key, ca)
        wait_for(lambda: srv.server.security.reloads > reloads, 10, "the files to be re-read")
        assert len(new.stub(srv.server.port).Embed(_embed(["x"]), timeout=30).embeddings) == 1
        assert requests.post(https, json={"input": "x"}, timeout=30,
                             **new.requests_kwargs()).status_code == 200
        # a client of the old CA, trusting the new server certificate, is refused
        mixed = grpc.ssl_channel_credentials(
            new.ca.cert_pem.bytes(), old.client.private_key_pem.bytes(),
            old.client.cert_chain_pems[0].bytes())
        with grpc.secure_channel(f"{HOST}:{srv.server.port}", mixed) as channel:
            assert _code(lambda: pb_grpc.EmbedderStub(channel).Embed(
                _embed(["x"]), timeout=5)) == grpc.StatusCode.UNAVAILABLE
        with pytest.raises((requests.exceptions.SSLError, requests.ConnectionError)):
            requests.post(https, json={"input": "x"}, timeout=10, verify=str(new.ca_file),
                          cert=str(old.client_file))
    finally:
        srv.stop()


# ---- files that cannot be used stop the start, naming the file ------------------------------


def test_a_missing_key_file_stops_serve_naming_it(tiny_bundle, tmp_path) -> None:
    missing = tmp_path / "no-such-keys"
    with ServeProcess(tiny_bundle, tmp_path / "serve.log", "--api-key-file", str(missing)) as srv:
        assert srv.proc.wait(60) == 2
    output = srv.log_path.read_text()  # stdout and stderr
    assert str(missing) in output
    assert '"event": "start_failed"' in output
