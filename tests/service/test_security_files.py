"""API keys and TLS material read from files (service/security.py), in process and fast: the key
file's rules, the caller id, what a reload takes and what it refuses, the HTTP context's switch
to the newest certificate (a real TLS handshake over memory), the gRPC fetcher (a real gRPC
server on loopback) and the API-key interceptor on every kind of call. The served end to end
versions of these are in test_security.py."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import inspect
import os
import ssl
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import structlog
from structlog.testing import capture_logs

from moe_embed.service.config import ServeConfig
from moe_embed.service.errors import Code
from moe_embed.service.metrics import Metrics
from moe_embed.service.security import (
    RELOAD_POLL_S,
    UNAUTHENTICATED_MESSAGE,
    ApiKeyInterceptor,
    ApiKeys,
    Security,
    SecurityError,
    metadata_value,
    unauthenticated,
)
from moe_embed.testing.service import free_port
from moe_embed.testing.tls import HOST, Pki, served_certificate, write_keys


def _caller_id(key: str) -> str:
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _keys(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "keys"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


# ---- the key file and the key check -----------------------------------------------------------


def test_a_key_file_that_cannot_be_read_or_is_empty_is_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent")
    with pytest.raises(SecurityError, match=f"API key file {missing}: cannot read it "
                                            r"\(No such file or directory\)"):
        ApiKeys.from_file(missing)
    with pytest.raises(SecurityError, match="cannot read it"):
        ApiKeys.from_file(str(tmp_path))  # a directory
    for blank in ("", " \n\t\n"):
        with pytest.raises(SecurityError, match="the file is empty"):
            ApiKeys.from_file(_keys(tmp_path, blank))
    with pytest.raises(SecurityError, match="no key in it"):
        ApiKeys.from_file(_keys(tmp_path, "#sk-a\n  # sk-b\n"))
    with pytest.raises(SecurityError, match="no API key given"):
        ApiKeys([])


@pytest.mark.parametrize(("text", "n"), [
    ("sk-a\nsk-b c\tx\n", 2), (b"sk-a\n\xff\xfe\n", 2), ("# c\n\nsk-\u00e9\n", 1),
    ("sk-a\nsk-b\nsk-\x7f\n", 3), (bytes(range(256)) * 4, 1),
])
def test_a_key_no_client_can_send_is_refused_naming_its_number(tmp_path: Path, text: str | bytes,
                                                               n: int) -> None:
    """Counted among the keys only (comments and blank lines are not keys)."""
    with pytest.raises(SecurityError, match=f"key {n} is not printable ASCII"):
        ApiKeys.from_file(_keys(tmp_path, text))


def test_printable_ascii_keys_with_spaces_inside_are_taken(tmp_path: Path) -> None:
    keys = ApiKeys.from_file(_keys(tmp_path, "  sk a b  \n~!@#$%^&*()\n"))
    assert len(keys) == 2
    assert keys.identify("Bearer sk a b") == _caller_id("sk a b")
    assert keys.identify("Bearer ~!@#$%^&*()") == _caller_id("~!@#$%^&*()")


def test_every_key_of_the_file_identifies_its_own_caller(tmp_path: Path) -> None:
    keys = ApiKeys.from_file(_keys(tmp_path, "k1\nk2\nk3\n"))
    assert len(keys) == 3
    for k in ("k1", "k2", "k3"):  # first, middle and last: every key is compared
        assert keys.identify(f"Bearer {k}") == _caller_id(k)
        assert keys.identify(f"BEARER   {k}  ") == _caller_id(k)
    for bad in ("Bearer", "Bearer k", "Bearerk1", "Bearer  k4", "Token k1", "bearer\tk1", "k1",
                "Bearer k1k2", "Token: k1", "Xearer k1"):  # 7 characters, then a real key
        assert keys.identify(bad) is None, bad
    assert ApiKeys([b"raw"]).identify("Bearer raw") == _caller_id("raw")  # bytes keys too


def test_caller_and_metadata() -> None:
    assert Security(ServeConfig()).caller(None) == ""  # keys off: everyone, one caller
    assert Security(ServeConfig()).caller("Bearer anything") == ""
    md = (("x-other", "1"), ("authorization", b"Bearer bytes"), ("authorization", "Bearer s"),
          ("authorization", "Bearer later"))
    assert metadata_value(md, "authorization") == "Bearer s"  # the first str value
    assert metadata_value(md, "x-none") is None
    assert metadata_value(None, "authorization") is None
    err = unauthenticated()
    assert err.code is Code.UNAUTHENTICATED and err.message == UNAUTHENTICATED_MESSAGE


# ---- reloading files -------------------------------------------------------------------------


def test_keys_reload_when_their_file_changes_and_only_then(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    write_keys(path, "sk-1")
    security = Security(ServeConfig(api_key_file=str(path)))
    assert security.files == [str(path)]
    security.load()
    assert security.caller("Bearer sk-1") == _caller_id("sk-1")
    assert security.reload() is False and security.reloads == 0
    write_keys(path, "sk-1")  # a new file, the same keys: nothing changed
    assert security.reload() is False and security.reloads == 0
    assert security.reload(force=True) is False
    write_keys(path, "sk-2", "sk-3")
    assert security.reload() is True and security.reloads == 1
    assert security.caller("Bearer sk-1") is None
    assert security.caller("Bearer sk-3") == _caller_id("sk-3")
    assert security.reload() is False and security.reloads == 1


def test_a_forced_reload_reads_files_whose_signature_did_not_change(tmp_path: Path) -> None:
    """SIGHUP re-reads even when size, inode and mtime are the same (a file rewritten in place
    within one mtime tick)."""
    path = tmp_path / "keys"
    path.write_text("sk-aaaa\n")
    security = Security(ServeConfig(api_key_file=str(path)))
    security.load()
    st = os.stat(path)
    path.write_text("sk-bbbb\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert security.reload() is False  # same signature: not read
    assert security.caller("Bearer sk-aaaa")
    assert security.reload(force=True) is True
    assert security.caller("Bearer sk-bbbb") and not security.caller("Bearer sk-aaaa")


def test_a_key_file_rewritten_in_place_at_the_same_length_is_reloaded(tmp_path: Path) -> None:
    """The same inode and size, a later mtime (an editor's in-place save, a revoked key
    replaced by one of the same length): the revoked key stops working at the next poll."""
    path = tmp_path / "keys"
    path.write_text("sk-revoked\n")
    security = Security(ServeConfig(api_key_file=str(path)))
    security.load()
    st = os.stat(path)
    with open(path, "r+b") as f:  # in place: the inode stays
        f.write(b"sk-replace\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    after = os.stat(path)
    assert (after.st_ino, after.st_size) == (st.st_ino, st.st_size)
    assert security.reload() is True
    assert security.caller("Bearer sk-revoked") is None
    assert security.caller("Bearer sk-replace") == _caller_id("sk-replace")


def test_a_failed_reload_keeps_the_old_keys_logs_once_and_retries(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    write_keys(path, "sk-1")
    security = Security(ServeConfig(api_key_file=str(path)))
    security.load()
    logged = []
    with capture_logs() as logs:
        path.write_text("# emptied\n")
        for step in ("poll", "poll", "sighup", "unlinked", "poll"):
            if step == "unlinked":  # then polled
                path.unlink()
            assert security.reload(force=step == "sighup") is False
            logged.append(sum(e["event"] == "credentials_reload_failed" for e in logs))
    # logged: the first error, not its repeat at the next poll, again on SIGHUP, then another
    # error, not repeated at the next poll
    assert logged == [1, 1, 2, 3, 3], logs
    failed = [e for e in logs if e["event"] == "credentials_reload_failed"]
    assert "no key in it" in failed[0]["errors"][0]
    assert "cannot read it" in failed[2]["errors"][0]
    assert security.caller("Bearer sk-1") == _caller_id("sk-1")
    write_keys(path, "sk-2")
    with capture_logs() as logs:
        assert security.reload() is True
        path.write_text("")
        assert security.reload() is False
    assert [e["event"] for e in logs] == ["credentials_reloaded", "credentials_reload_failed"]
    assert logs[0]["api_keys"] == 1 and logs[0]["changed"] == ["api_keys"]
    assert "sk-2" not in repr(logs)  # a key is never logged
    assert security.caller("Bearer sk-2") and security.reloads == 1


def test_the_watch_picks_up_a_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    write_keys(path, "sk-1")
    security = Security(ServeConfig(api_key_file=str(path)))
    security.load()

    async def main() -> None:
        watch = asyncio.create_task(security.watch(poll_s=0.001))
        write_keys(path, "sk-2")
        for _ in range(10_000):
            if security.reloads:
                break
            await asyncio.sleep(0.001)
        watch.cancel()

    asyncio.run(main())
    assert security.reloads == 1 and security.caller("Bearer sk-2")


def test_the_files_are_polled_as_often_as_the_docs_say() -> None:
    """README and the chart's README promise a changed file is picked up within 5 s."""
    root = Path(__file__).resolve().parents[2]
    assert f"(checked every {RELOAD_POLL_S:g} s)" in (root / "README.md").read_text()
    assert f"picks them up within {RELOAD_POLL_S:g} s" in " ".join(
        (root / "helm" / "README.md").read_text().split())
    assert inspect.signature(Security.watch).parameters["poll_s"].default == RELOAD_POLL_S


def test_api_keys_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# team a\nsk-a\n\n  sk-b  \n#sk-commented\n")
    keys = ApiKeys.from_file(str(path))
    assert len(keys) == 2
    assert keys.identify("Bearer sk-a") and keys.identify("bearer sk-b")
    assert keys.identify("Bearer sk-a") != keys.identify("Bearer sk-b")  # one caller each
    for bad in (None, "", "sk-a", "Bearer ", "Bearer sk-", "Bearer sk-a2", "Basic sk-a",
                "Bearer #sk-commented", "Bearer sk-commented"):
        assert keys.identify(bad) is None, bad
    assert "sk-a" not in keys.identify("Bearer sk-a")


# ---- TLS material ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _structlog_defaults() -> None:
    """Another test's in-process server may have left structlog filtering below warning (its
    log level): these tests read info events, so each starts from structlog's defaults."""
    structlog.reset_defaults()


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pki, Pki]:
    base = tmp_path_factory.mktemp("pki")
    return Pki.make(base / "old"), Pki.make(base / "new")


def _tls(tmp_path: Path, pki: Pki, ca: bool = False) -> tuple[Security, Path, Path]:
    cert, key, ca_file = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt"
    pki.install(cert, key, ca_file if ca else None)
    cfg = ServeConfig(tls_cert_file=str(cert), tls_key_file=str(key),
                      tls_client_ca_file=str(ca_file) if ca else "")
    return Security(cfg), cert, key


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[bytes, str | None]:
    """A TLS handshake over memory: the certificate the server presented and the ALPN
    protocol it chose."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=HOST)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {c: False, s: False}
    for _ in range(20):
        for side in (c, s):
            if not done[side]:
                try:
                    side.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values())
    s.write(b"ping")  # mTLS refusals of TLS 1.3 arrive after the client's handshake
    c_in.write(s_out.read())
    assert c.read(4) == b"ping"
    return c.getpeercert(binary_form=True), c.selected_alpn_protocol()


def _client(*pkis: Pki, cert: Pki | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for p in pkis:
        ctx.load_verify_locations(cafile=str(p.ca_file))
    if cert is not None:
        ctx.load_cert_chain(str(cert.client_file))
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


def test_the_http_context_serves_the_newest_certificate(tmp_path: Path,
                                                        pkis: tuple[Pki, Pki]) -> None:
    old, new = pkis
    security, cert, key = _tls(tmp_path, old)
    security.load()
    ctx = security.http_ssl_context()
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE  # no client CA: no client certificate asked
    assert _handshake(ctx, _client(old, new)) == (old.server_der, "http/1.1")
    new.install(cert, key)
    with capture_logs() as logs:
        assert security.reload() is True and security.reloads == 1
    assert [(e["event"], e["changed"], e["api_keys"]) for e in logs] == [
        ("credentials_reloaded", ["tls"], 0)]  # no API keys configured: 0 of them
    assert _handshake(ctx, _client(old, new))[0] == new.server_der  # the same listener
    assert security.reload() is False
    assert _handshake(ctx, _client(old, new))[0] == new.server_der


def test_mtls_requires_a_client_certificate_of_the_ca(tmp_path: Path,
                                                      pkis: tuple[Pki, Pki]) -> None:
    old, new = pkis
    security, _, _ = _tls(tmp_path, old, ca=True)
    security.load()
    assert security.tls.client_ca == old.ca.cert_pem.bytes()
    ctx = security.http_ssl_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert _handshake(ctx, _client(old, cert=old))[0] == old.server_der
    for client in (_client(old), _client(old, cert=new)):  # none, or of another CA
        with pytest.raises(ssl.SSLError):
            _handshake(ctx, client)


@pytest.mark.parametrize("case", ["garbage-ca", "key-of-another-cert", "empty-key",
                                  "missing-cert"])
def test_unusable_tls_files_are_refused_and_the_old_ones_kept(tmp_path: Path,
                                                              pkis: tuple[Pki, Pki],
                                                              case: str) -> None:
    old, new = pkis
    security, cert, key = _tls(tmp_path, old, ca=True)
    security.load()
    before = security.tls
    if case == "garbage-ca":
        ca = security.cfg.tls_client_ca_file
        Path(ca).write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        message = f"TLS client CA file {ca}: not a usable PEM CA bundle"
    elif case == "key-of-another-cert":
        key.write_bytes(new.server.private_key_pem.bytes())
        message = f"TLS certificate {cert} and key {key}: not a usable pair"
    elif case == "empty-key":
        key.write_bytes(b"\n")
        message = f"TLS key file {key}: the file is empty"
    else:
        cert.unlink()
        message = f"TLS certificate file {cert}: cannot read it"
    with capture_logs() as logs:
        assert security.reload() is False
    assert message in logs[0]["errors"][0]
    assert security.tls is before and security.reloads == 0
    with pytest.raises(SecurityError, match=message.split(":")[0]):
        Security(security.cfg).load()
    old.install(cert, key, ca=Path(security.cfg.tls_client_ca_file))
    assert security.reload() is False  # back to what is in use: nothing changed


def test_the_client_ca_rotated_alone_is_taken(tmp_path: Path, pkis: tuple[Pki, Pki]) -> None:
    """Only the CA file changes (clients move to a new CA, the server keeps its certificate):
    the next handshake asks for a client certificate of the new CA."""
    old, new = pkis
    security, cert, _ = _tls(tmp_path, old, ca=True)
    security.load()
    ctx = security.http_ssl_context()
    assert _handshake(ctx, _client(old, cert=old))[0] == old.server_der
    ca = Path(security.cfg.tls_client_ca_file)
    tmp = ca.with_suffix(".new")
    tmp.write_bytes(new.ca.cert_pem.bytes())
    os.replace(tmp, ca)
    assert security.reload() is True and security.reloads == 1
    assert security.tls.client_ca == new.ca.cert_pem.bytes()
    assert security.tls.cert == cert.read_bytes()
    assert _handshake(ctx, _client(old, cert=new))[0] == old.server_der
    with pytest.raises(ssl.SSLError):
        _handshake(ctx, _client(old, cert=old))


def test_tls_without_a_client_ca_has_none(tmp_path: Path, pkis: tuple[Pki, Pki]) -> None:
    security, cert, key = _tls(tmp_path, pkis[0])
    security.load()
    assert security.tls.client_ca is None
    with pytest.raises(dataclasses.FrozenInstanceError):  # what is in use is never edited
        security.tls.key = b""  # type: ignore[misc]
    assert security.tls.cert == cert.read_bytes() and security.tls.key == key.read_bytes()
    assert security.files == [str(cert), str(key)]


def test_the_memory_file_fallback_without_memfd(tmp_path: Path, pkis: tuple[Pki, Pki],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Where os.memfd_create does not exist (macOS), the PEM goes through a private
    temporary directory, removed after."""
    monkeypatch.delattr(os, "memfd_create")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    security, _, _ = _tls(tmp_path, pkis[0])
    security.load()
    assert _handshake(security.http_ssl_context(), _client(pkis[0]))[0] == pkis[0].server_der
    assert list((tmp_path / "tmp").iterdir()) == []


def test_grpc_takes_the_newest_certificate_at_the_next_handshake(tmp_path: Path,
                                                                 pkis: tuple[Pki, Pki]) -> None:
    old, new = pkis
    security, cert, key = _tls(tmp_path, old)
    security.load()
    server = grpc.server(futures.ThreadPoolExecutor(1))
    port = server.add_secure_port(f"{HOST}:{free_port()}", security.grpc_credentials())
    server.start()
    try:
        assert served_certificate(port, "h2") == old.server_der
        new.install(cert, key)
        assert security.reload() is True
        assert served_certificate(port, "h2") == new.server_der
        assert served_certificate(port, "h2") == new.server_der  # fetched once, kept
    finally:
        server.stop(None)


@pytest.mark.parametrize("ca", [True, False], ids=["client-ca", "no-client-ca"])
def test_grpc_asks_a_client_certificate_exactly_when_a_client_ca_is_set(
        tmp_path: Path, pkis: tuple[Pki, Pki], ca: bool) -> None:
    """A real gRPC call over the server's credentials: with a client CA, a client without a
    certificate (or with one of another CA) is refused at the handshake and one with a
    certificate of the CA is served; without a client CA, a client without one is served."""
    old, new = pkis
    security, _, _ = _tls(tmp_path, old, ca=ca)
    security.load()
    server = grpc.server(futures.ThreadPoolExecutor(1))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Svc", {
        "Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)}),))
    port = server.add_secure_port(f"{HOST}:{free_port()}", security.grpc_credentials())
    server.start()

    def call(credentials: grpc.ChannelCredentials) -> grpc.StatusCode:
        with grpc.secure_channel(f"{HOST}:{port}", credentials) as ch:
            try:
                assert ch.unary_unary("/t.Svc/Echo")(b"hi", timeout=10) == b"hi"
                return grpc.StatusCode.OK
            except grpc.RpcError as e:
                return e.code()

    other_ca = grpc.ssl_channel_credentials(  # a client certificate the server's CA did not sign
        old.ca.cert_pem.bytes(), new.client.private_key_pem.bytes(),
        b"".join(b.bytes() for b in new.client.cert_chain_pems))
    try:
        assert call(old.channel_credentials(client_cert=True)) == grpc.StatusCode.OK
        refused = grpc.StatusCode.UNAVAILABLE
        assert call(old.channel_credentials(client_cert=False)) == (
            refused if ca else grpc.StatusCode.OK)
        if ca:
            assert call(other_ca) == refused
    finally:
        server.stop(None)


@pytest.mark.parametrize("case", ["empty", "comments-only", "cert-key-mismatch", "missing-ca",
                                  "garbage-cert"])
def test_unusable_files_are_named(tmp_path: Path, pkis: tuple[Pki, Pki], case: str) -> None:
    keys, cert, key = tmp_path / "keys", tmp_path / "tls.crt", tmp_path / "tls.key"
    pki, other = pkis
    pki.install(cert, key)
    settings: dict = {"tls_cert_file": str(cert), "tls_key_file": str(key)}
    named = cert
    if case == "empty":
        keys.write_text("")
        settings, named = {"api_key_file": str(keys)}, keys
    elif case == "comments-only":
        keys.write_text("# no key yet\n\n   \n")
        settings, named = {"api_key_file": str(keys)}, keys
    elif case == "cert-key-mismatch":
        key.write_bytes(other.server.private_key_pem.bytes())
    elif case == "missing-ca":
        settings["tls_client_ca_file"] = named = str(tmp_path / "ca.crt")
    else:
        cert.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(SecurityError) as exc:
        Security(ServeConfig(**settings)).load()
    assert str(named) in str(exc.value)


def test_tls_settings_go_together() -> None:
    with pytest.raises(ValueError, match="tls_cert_file and tls_key_file"):
        ServeConfig(tls_cert_file="a.crt")
    with pytest.raises(ValueError, match="needs tls_cert_file"):
        ServeConfig(tls_client_ca_file="ca.crt")


def test_a_bad_key_file_does_not_hold_back_a_certificate_rotation(tmp_path: Path,
                                                                 pkis: tuple[Pki, Pki]) -> None:
    """Keys and TLS reload independently; what failed is tried again at the next poll."""
    old, new = pkis
    cert, key, keys = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "keys"
    old.install(cert, key)
    write_keys(keys, "sk-first")
    security = Security(ServeConfig(tls_cert_file=str(cert), tls_key_file=str(key),
                                    api_key_file=str(keys)))
    security.load()
    new.install(cert, key)
    keys.write_text("# emptied by mistake\n")
    assert security.reload() is True  # the certificate, not the keys
    assert security.tls.cert == b"".join(b.bytes() for b in new.server.cert_chain_pems)
    assert security.caller("Bearer sk-first")  # the old keys stay in use
    assert security.reload() is False  # nothing new
    write_keys(keys, "sk-second")
    assert security.reload() is True
    assert security.caller("Bearer sk-second") and not security.caller("Bearer sk-first")


# ---- the gRPC interceptor ----------------------------------------------------------------------


def _handlers(seen: list[bytes]) -> tuple[grpc.GenericRpcHandler, ...]:
    """One method of each kind on service t.Svc, one on other.Svc and health's Check and
    Watch; requests are parsed by a deserializer that refuses anything but b'ok'."""

    def parse(raw: bytes) -> bytes:
        if raw != b"ok":
            raise ValueError("not parseable")
        seen.append(raw)
        return raw

    async def unary(req: bytes, ctx: object) -> bytes:
        return b"u:" + req

    async def stream_out(req: bytes, ctx: object):
        yield b"s:" + req

    async def stream_in(reqs, ctx: object) -> bytes:
        return b"c:" + b"".join([r async for r in reqs])

    async def both(reqs, ctx: object):
        async for r in reqs:
            yield b"b:" + r

    kinds = {"Unary": grpc.unary_unary_rpc_method_handler(unary, parse, bytes),
             "Out": grpc.unary_stream_rpc_method_handler(stream_out, parse, bytes),
             "In": grpc.stream_unary_rpc_method_handler(stream_in, parse, bytes),
             "Both": grpc.stream_stream_rpc_method_handler(both, parse, bytes)}
    return grpc.method_handlers_generic_handler("t.Svc", kinds), \
        grpc.method_handlers_generic_handler("other.Svc", {"Unary": kinds["Unary"]}), \
        grpc.method_handlers_generic_handler("grpc.health.v1.Health",
                                             {"Check": kinds["Unary"], "Watch": kinds["Out"]})


def test_every_kind_of_call_needs_a_key_but_health(tmp_path: Path) -> None:
    """Refused UNAUTHENTICATED without parsing the request (even one that cannot be parsed),
    counted under the method's name; with a valid key, served."""
    path = tmp_path / "keys"
    write_keys(path, "sk-good")
    security = Security(ServeConfig(api_key_file=str(path)))
    security.load()
    metrics, seen = Metrics(), []

    def sample(name: str, labels: dict) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    def count(method: str) -> float | None:
        return metrics.registry.get_sample_value(
            "moe_embed_requests_total", {"method": method, "code": "UNAUTHENTICATED"})

    async def main() -> None:
        server = grpc.aio.server(interceptors=[ApiKeyInterceptor(security, metrics, "t.Svc")])
        server.add_generic_rpc_handlers(_handlers(seen))
        port = server.add_insecure_port(f"{HOST}:0")
        await server.start()
        # the calls from grpc's sync client, in a thread: grpc.aio's client may report INTERNAL
        # ("Failed execute_batch") instead of the server's status when it writes to a request
        # stream the server has already ended (grpc/grpc#36066)
        sync = grpc.insecure_channel(f"{HOST}:{port}")
        try:
            good = (("authorization", "Bearer sk-good"),)
            calls = {"Unary": lambda m, md, r: sync.unary_unary(m)(r, metadata=md, timeout=30),
                     "Out": lambda m, md, r: next(sync.unary_stream(m)(r, metadata=md,
                                                                        timeout=30)),
                     "In": lambda m, md, r: sync.stream_unary(m)(iter([r]), metadata=md,
                                                                 timeout=30),
                     "Both": lambda m, md, r: next(sync.stream_stream(m)(iter([r]), metadata=md,
                                                                          timeout=30))}
            async with grpc.aio.insecure_channel(f"{HOST}:{port}") as ch:
                for kind, call in calls.items():
                    method = f"/t.Svc/{kind}"
                    assert await asyncio.to_thread(call, method, good, b"ok") in (
                        b"u:ok", b"s:ok", b"c:ok", b"b:ok")
                    for md in ((), (("authorization", "Bearer sk-bad"),)):
                        for raw in (b"ok", b"\xffunparseable"):
                            with pytest.raises(grpc.RpcError) as exc:
                                await asyncio.to_thread(call, method, md, raw)
                            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
                            assert exc.value.details() == UNAUTHENTICATED_MESSAGE
                    assert count(kind) == 4
                    # a refusal costs no time: its latency is observed as 0, not more or less
                    latency = {"method": kind}
                    assert sample("moe_embed_request_latency_seconds_count", latency) == 4
                    assert sample("moe_embed_request_latency_seconds_sum", latency) == 0.0
                    assert sample("moe_embed_errors_total",
                                  {"method": kind, "code": "UNAUTHENTICATED"}) == 4
                health = "/grpc.health.v1.Health/Check"
                assert await ch.unary_unary(health)(b"ok") == b"u:ok"  # no key needed
                watch = "/grpc.health.v1.Health/Watch"  # README: health never needs a key
                assert await _first(ch.unary_stream(watch)(b"ok")) == b"s:ok"
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await ch.unary_unary("/other.Svc/Unary")(b"ok")
                assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert count("/other.Svc/Unary") is None and count("Unary") == 4
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await ch.unary_unary("/t.Svc/Nope")(b"ok")
                assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            sync.close()
            await server.stop(None)

    with capture_logs() as logs:
        asyncio.run(main())
    assert len(seen) == 4 + 2  # parsed: the keyed calls and health, nothing refused
    refused = [e for e in logs if e["event"] == "request_unauthenticated"]
    assert len(refused) == 4 * 4 + 1
    assert {e["method"] for e in refused} == {"Unary", "Out", "In", "Both", "/other.Svc/Unary"}
    # per kind: no key (parseable, then not), a wrong key (the same two): in that order
    assert [e["key_given"] for e in refused[:4]] == [False, False, True, True]
    assert "sk-bad" not in repr(logs) and "sk-good" not in repr(logs)


async def _first(stream) -> bytes:
    async for item in stream:
        return item
    raise AssertionError("empty stream")
