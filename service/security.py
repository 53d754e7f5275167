"""TLS, mTLS and API keys for the gRPC and HTTP ports, from files that are re-read when they
change (or on SIGHUP), so a rotated certificate (cert-manager) or key (a Secret) needs no
restart.

- TLS: gRPC gets `dynamic_ssl_server_credentials` whose fetcher hands gRPC core the newest
  material at each new handshake; HTTP gets one `ssl.SSLContext` whose SNI callback (called at
  every ClientHello, with or without SNI) switches the handshake to the newest context. Both
  read the same validated material, so the two ports never disagree. A rotation that leaves
  the files unusable (half written, key and certificate not matching) is refused with an
  error log, and the previous material stays in use.
- API keys: compared in constant time against every key (a SHA-256 of each side first, so
  neither the length nor the position of a match leaks); a key is never logged. A request is
  identified by a short hash of its key, the fairness unit of the queue.
- Health (grpc.health.v1, HTTP /health and /ready) never needs a key. With TLS on, the kubelet
  (whose gRPC probe speaks no TLS) uses the plaintext `--health-port`, which serves health only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import ssl
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog

from . import errors
from .config import ServeConfig
from .metrics import Metrics

log = structlog.get_logger("moe_embed.security")

AUTHORIZATION = "authorization"
BEARER = "bearer "
HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
RELOAD_POLL_S = 5.0  # how often the files are checked for a change (SIGHUP re-reads at once)


class SecurityError(ValueError):
    """A TLS or API-key file that cannot be used; the message names the file."""


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SecurityError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None
    if not data.strip():
        raise SecurityError(f"{what} {path}: the file is empty")
    return data


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


class ApiKeys:
    """A set of API keys, checked in constant time."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(k) for k in keys]
        if not self._digests:
            raise SecurityError("no API key given")

    def __len__(self) -> int:
        return len(self._digests)

    @classmethod
    def from_file(cls, path: str) -> ApiKeys:
        """One key per line; blank lines and lines starting with # are ignored."""
        text = _read(path, "API key file").decode("utf-8", "replace")
        keys = [line.strip() for line in text.splitlines()]
        keys = [k for k in keys if k and not k.startswith("#")]
        for n, key in enumerate(keys, 1):  # an HTTP header carries printable ASCII only
            if not (key.isascii() and key.isprintable()):
                raise SecurityError(f"API key file {path}: key {n} is not printable ASCII "
                                    "(a key a client could never send)")
        if not keys:
            raise SecurityError(f"API key file {path}: no key in it (only blank lines or "
                                "# comments)")
        return cls(keys)

    def identify(self, authorization: str | None) -> str | None:
        """The caller id (`key:` + a short hash of the key) of a valid `Bearer KEY` header,
        else None. Every key is compared, whether one matched or not."""
        if not authorization or not authorization[:len(BEARER)].lower() == BEARER:
            return None
        given = _digest(authorization[len(BEARER):].strip())
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(given, digest)
        return "key:" + given.hex()[:12] if found else None


@dataclass(frozen=True)
class TlsMaterial:
    """Certificate chain, key and (for mTLS) client CA as PEM bytes; `ssl_context` checks
    that they work (OpenSSL parses them, the key matches the certificate)."""

    cert: bytes
    key: bytes
    client_ca: bytes | None

    @classmethod
    def load(cls, cfg: ServeConfig) -> TlsMaterial:
        return cls(_read(cfg.tls_cert_file, "TLS certificate file"),
                   _read(cfg.tls_key_file, "TLS key file"),
                   _read(cfg.tls_client_ca_file, "TLS client CA file")
                   if cfg.tls_client_ca_file else None)

    def ssl_context(self, cfg: ServeConfig) -> ssl.SSLContext:
        """A server context for HTTP (TLS 1.2+; client certificates required for mTLS)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        # OpenSSL's Python API loads certificates and keys from files only: hand it the bytes
        # validated here (not the live paths, which a rotation may change between two reads)
        # through in-memory files that never touch a disk.
        with _memory_file(self.cert) as cert, _memory_file(self.key) as key:
            try:
                ctx.load_cert_chain(cert, key)
            except (ssl.SSLError, ValueError) as exc:
                raise SecurityError(f"TLS certificate {cfg.tls_cert_file} and key "
                                    f"{cfg.tls_key_file}: not a usable pair ({exc})") from None
        if self.client_ca is not None:
            try:
                ctx.load_verify_locations(cadata=self.client_ca.decode("ascii", "replace"))
            except (ssl.SSLError, ValueError) as exc:
                raise SecurityError(f"TLS client CA file {cfg.tls_client_ca_file}: not a "
                                    f"usable PEM CA bundle ({exc})") from None
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def grpc_configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key, self.cert)], root_certificates=self.client_ca)


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path to `data` in memory (memfd), or in a private temporary directory where memfd
    does not exist."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("moe-embed-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="moe-embed-tls-") as tmp:
        path = Path(tmp) / "pem"
        path.write_bytes(data)
        yield str(path)


def _signature(paths: Iterable[str]) -> tuple:
    """What changes when a file is rewritten or a Kubernetes Secret volume swaps its
    `..data` link: the followed file's identity, size and mtime."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


class Security:
    """The TLS material and API keys of one server, with their reload."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.keys: ApiKeys | None = None
        self.tls: TlsMaterial | None = None
        self.reloads = 0  # successful reloads that changed something (tests, logs)
        self._lock = threading.Lock()  # the gRPC fetcher runs on a gRPC core thread
        self._grpc_pending: grpc.ServerCertificateConfiguration | None = None
        self._http_context: ssl.SSLContext | None = None
        self._signature: tuple = ()
        self._failed: list[str] = []  # the last reload's errors (logged once each)

    # -- loading --------------------------------------------------------------------------
    @property
    def files(self) -> list[str]:
        c = self.cfg
        return [f for f in (c.tls_cert_file, c.tls_key_file, c.tls_client_ca_file,
                            c.api_key_file) if f]

    def load(self) -> None:
        """Read every configured file; raises SecurityError naming a file that is missing,
        empty or unusable."""
        self._signature = _signature(self.files)
        if self.cfg.api_key_file:
            self.keys = ApiKeys.from_file(self.cfg.api_key_file)
        if self.cfg.tls:
            self.tls = TlsMaterial.load(self.cfg)
            self._http_context = self.tls.ssl_context(self.cfg)

    def reload(self, force: bool = False) -> bool:
        """Re-read the files if they changed (or if `force`, as on SIGHUP). Keys and TLS are
        taken independently; what cannot be used is logged and its previous material kept,
        and the files are tried again at the next poll (the error is logged again only if it
        changes, or on SIGHUP). Returns whether anything changed."""
        signature = _signature(self.files)
        if not force and signature == self._signature:
            return False
        changed, failed = [], []
        if self.cfg.api_key_file:
            try:
                keys = ApiKeys.from_file(self.cfg.api_key_file)
                if self.keys is None or keys._digests != self.keys._digests:
                    self.keys = keys
                    changed.append("api_keys")
            except SecurityError as exc:
                failed.append(str(exc))
        if self.cfg.tls:
            try:
                tls = TlsMaterial.load(self.cfg)
                if tls != self.tls:
                    context = tls.ssl_context(self.cfg)
                    with self._lock:
                        self.tls = tls
                        self._grpc_pending = tls.grpc_configuration()
                    self._http_context = context
                    changed.append("tls")
            except SecurityError as exc:
                failed.append(str(exc))
        if failed:  # the signature stays old: the next poll tries again
            if force or failed != self._failed:
                log.error("credentials_reload_failed", errors=failed,
                          note="the previous certificates and keys stay in use")
            self._failed = failed
        else:
            self._signature, self._failed = signature, []
        if changed:
            self.reloads += 1
            log.info("credentials_reloaded", changed=changed,
                     api_keys=len(self.keys) if self.keys else 0)
        return bool(changed)

    async def watch(self, poll_s: float = RELOAD_POLL_S) -> None:
        """Poll the files for a change, forever (cancel to stop)."""
        while True:
            await asyncio.sleep(poll_s)
            if self.files:
                self.reload()

    # -- gRPC -----------------------------------------------------------------------------
    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Server credentials whose certificates follow `reload` (new handshakes only)."""
        assert self.tls is not None
        return grpc.dynamic_ssl_server_credentials(
            self.tls.grpc_configuration(), self._fetch_grpc_configuration,
            require_client_authentication=self.tls.client_ca is not None)

    def _fetch_grpc_configuration(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC core before each handshake: the new material once, else None."""
        with self._lock:
            pending, self._grpc_pending = self._grpc_pending, None
        return pending

    # -- HTTP -----------------------------------------------------------------------------
    def http_ssl_context(self) -> ssl.SSLContext:
        """The context the HTTP listener is created with; each handshake switches to the
        newest material in the SNI callback (called for every ClientHello)."""
        assert self._http_context is not None
        base = self._http_context

        def newest(sslobj: ssl.SSLObject, _server_name: str | None,
                   _ctx: ssl.SSLContext) -> None:
            current = self._http_context
            if current is not None and current is not sslobj.context:
                sslobj.context = current

        base.sni_callback = newest
        return base

    # -- API keys -------------------------------------------------------------------------
    def caller(self, authorization: str | None) -> str | None:
        """The caller id of a valid key; None if keys are on and this one is not valid."""
        if self.keys is None:
            return ""
        return self.keys.identify(authorization)


def metadata_value(metadata: Iterable[tuple[str, str | bytes]] | None, key: str) -> str | None:
    for k, v in metadata or ():
        if k == key and isinstance(v, str):
            return v
    return None


UNAUTHENTICATED_MESSAGE = ("missing or invalid API key: send `authorization: Bearer <key>` "
                           "(HTTP: an `Authorization: Bearer <key>` header)")


def unauthenticated() -> errors.EngineError:
    return errors.EngineError(errors.Code.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every gRPC call but health without a valid `authorization: Bearer` key, before
    its request is even parsed; counted in the metrics like any failed call."""

    def __init__(self, security: Security, metrics: Metrics, service_name: str) -> None:
        self.security = security
        self.metrics = metrics
        self.prefix = f"/{service_name}/"

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails],
                                     Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        if method.startswith(HEALTH_METHOD_PREFIX):
            return await continuation(details)
        auth = metadata_value(details.invocation_metadata, AUTHORIZATION)
        if self.security.caller(auth) is not None:
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        name = method.removeprefix(self.prefix) if method.startswith(self.prefix) else method
        if method.startswith(self.prefix):
            self.metrics.observe_request(name, "UNAUTHENTICATED", 0.0)
        log.info("request_unauthenticated", method=name, key_given=auth is not None)
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind that refuses with UNAUTHENTICATED without reading the
    request (the request stays raw bytes: nothing is parsed)."""
    async def refuse(_request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    serializer = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, None, serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, None, serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, None, serializer)
    return grpc.unary_unary_rpc_method_handler(refuse, None, serializer)
