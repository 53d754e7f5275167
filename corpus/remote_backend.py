"""Remote backend: running moe-embed servers over gRPC `EmbedStream`, one stream each.

Each call goes to the server with the fewest calls in flight, at most WINDOW per server:
a call waits for room (back-pressure) rather than piling up in memory or in a server's queue.
A call refused with UNAVAILABLE or RESOURCE_EXHAUSTED, or lost with its stream, is sent again
after a backoff (possibly to another server); a broken stream is reopened. TLS, mTLS and the
API key are the service's own options.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from moe_embed.service.errors import InvalidInput
from moe_embed.service.tasks import task_named
from moe_embed.v1 import embedder_pb2 as pb
from moe_embed.v1 import embedder_pb2_grpc as pb_grpc

from .embedding import Embedded
from .retry import RETRYABLE, BackendError, Retryable, with_retries

WINDOW = 4  # calls in flight per server (the server reads up to its own STREAM_WINDOW)
# characters per request (~1k tokens): the server batches a window of them; one request of
# ~6k tokens made a first batch that outran the server's stuck-batch limit on a loaded machine
CALL_CHARS = 4096
INFO_TIMEOUT_S = 30.0
MAX_MESSAGE_BYTES = 64 << 20
_CODES = {c.value[0]: c for c in grpc.StatusCode}


@dataclass(frozen=True)
class Security:
    """Client side of the service's TLS, mTLS and API-key options (all files)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    api_key_file: str | None = None

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("--tls-cert-file and --tls-key-file go together (a client "
                             "certificate for mTLS): give both or neither")

    @property
    def tls(self) -> bool:
        return bool(self.ca_file or self.cert_file)

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file),
                                            read(self.cert_file))

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """`authorization: Bearer <key>`: the first line of the key file that is neither blank
        nor a # comment (the server's key file format)."""
        if not self.api_key_file:
            return ()
        for line in Path(self.api_key_file).read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                return (("authorization", f"Bearer {line.strip()}"),)
        raise ValueError(f"--api-key-file {self.api_key_file}: no key in it")


def _failure(where: str, code: grpc.StatusCode, message: str) -> Exception:
    if code in RETRYABLE:
        return Retryable(where, code, message)
    return BackendError(where, code, message)


class _Stream:
    """One EmbedStream to one server; responses matched to requests by id."""

    def __init__(self, target: str, channel: grpc.aio.Channel, metadata: tuple) -> None:
        self.target = target
        self.stub = pb_grpc.EmbedderStub(channel)
        self.metadata = metadata
        self.room = asyncio.Semaphore(WINDOW)
        self.writing = asyncio.Lock()
        self.in_flight = 0
        self.call: grpc.aio.StreamStreamCall | None = None
        self.pending: dict[str, asyncio.Future] = {}
        self.reader: asyncio.Task | None = None

    def _open(self) -> grpc.aio.StreamStreamCall:
        call = self.stub.EmbedStream(metadata=self.metadata)
        self.call = call
        self.reader = asyncio.ensure_future(self._read(call))
        return call

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        err: Exception = Retryable(self.target, grpc.StatusCode.UNAVAILABLE, "the stream ended")
        try:
            async for resp in call:
                fut = self.pending.pop(resp.id, None)
                if fut is not None and not fut.done():
                    fut.set_result(resp)
        except grpc.aio.AioRpcError as exc:
            err = _failure(self.target, exc.code(), exc.details() or "")
        finally:
            if self.call is call:
                self.call = None
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(err)
            self.pending.clear()

    async def request(self, req: pb.EmbedRequest) -> pb.EmbedResponse:
        async with self.room:
            self.in_flight += 1
            try:
                call = self.call or self._open()
                fut = asyncio.get_running_loop().create_future()
                self.pending[req.id] = fut
                try:
                    async with self.writing:  # grpc.aio allows one write at a time per call
                        await call.write(req)
                except BaseException as exc:
                    self.pending.pop(req.id, None)
                    if fut.done():
                        fut.exception()  # the reader failed it too: retrieved, not logged
                    fut.cancel()
                    if isinstance(exc, grpc.aio.AioRpcError):
                        raise _failure(self.target, exc.code(), exc.details() or "") from exc
                    if isinstance(exc, Exception):  # the call ended while writing
                        raise Retryable(self.target, grpc.StatusCode.UNAVAILABLE,
                                        f"the stream closed ({exc!r})") from exc
                    raise
                return await fut
            finally:
                self.in_flight -= 1

    async def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
        if self.reader is not None:
            self.reader.cancel()


class RemoteBackend:
    """`await start()`, `await embed(texts)`, `await close()` against `targets`."""

    name = "remote"
    concurrency: int
    max_inputs: int
    max_chars = CALL_CHARS

    def __init__(self, targets: list[str], task: str, dimensions: int, normalize: bool,
                 security: Security = Security()) -> None:
        if not targets:
            raise ValueError("--server: give at least one HOST:PORT")
        self.targets = targets
        self.task = pb.Task.Value(task_named(task).proto)
        self.dimensions = dimensions
        self.normalize = normalize
        self.security = security
        self.channels: list[grpc.aio.Channel] = []
        self.streams: list[_Stream] = []
        self._ids = itertools.count()

    async def start(self) -> dict:
        creds, metadata = self.security.credentials(), self.security.metadata()
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        infos = []
        for target in self.targets:
            channel = (grpc.aio.secure_channel(target, creds, options) if creds
                       else grpc.aio.insecure_channel(target, options))
            self.channels.append(channel)
            try:
                info = await with_retries(lambda ch=channel, t=target: self._info(ch, t))
            except BackendError as exc:
                raise BackendError(target, exc.code, f"Info failed: {exc}") from exc
            infos.append(info)
            self.streams.append(_Stream(target, channel, metadata))
        hashes = {i.bundle_hash for i in infos}
        if len(hashes) > 1:
            raise ValueError("the servers run different bundles: " + ", ".join(
                f"{t} {i.bundle_hash[:12]}" for t, i in zip(self.targets, infos, strict=True)))
        first = infos[0]
        dims = self.dimensions or first.dimensions
        if not first.min_dimensions <= dims <= first.max_dimensions:
            raise InvalidInput("dimensions", f"{dims} is outside the servers' range "
                               f"{first.min_dimensions}..{first.max_dimensions} (0 = full)")
        self.max_inputs = max(1, min(i.max_inputs for i in infos))
        self.concurrency = WINDOW * len(self.streams)
        return {"model_id": first.model_id, "bundle_hash": first.bundle_hash,
                "precision": first.precision, "dimensions": dims}

    async def _info(self, channel: grpc.aio.Channel, target: str) -> pb.InfoResponse:
        try:
            return await pb_grpc.EmbedderStub(channel).Info(
                pb.InfoRequest(), timeout=INFO_TIMEOUT_S, metadata=self.security.metadata())
        except grpc.aio.AioRpcError as exc:
            raise _failure(target, exc.code(), exc.details() or "") from exc

    async def embed(self, texts: list[str]) -> Embedded:
        return await with_retries(lambda: self._once(texts))

    async def _once(self, texts: list[str]) -> Embedded:
        stream = min(self.streams, key=lambda s: s.in_flight)
        req = pb.EmbedRequest(id=str(next(self._ids)), inputs=texts, task=self.task,
                              dimensions=self.dimensions, truncate=True,
                              normalize=self.normalize)
        resp = await stream.request(req)
        if resp.HasField("error") and resp.error.code != 0:
            e = resp.error
            code = _CODES.get(e.code, grpc.StatusCode.UNKNOWN)
            if code == grpc.StatusCode.INVALID_ARGUMENT and e.HasField("index"):
                raise InvalidInput(e.field or "inputs", e.message, e.index)
            raise _failure(stream.target, code, e.message)
        if len(resp.truncated) != len(texts):  # a server from before the field
            raise _failure(stream.target, grpc.StatusCode.FAILED_PRECONDITION,
                           "the server does not report truncation (EmbedResponse.truncated); "
                           "upgrade it")
        return Embedded([np.array(v.values, dtype=np.float32) for v in resp.embeddings],
                        list(resp.token_counts), list(resp.truncated))

    async def close(self) -> None:
        for s in self.streams:
            await s.close()
        for ch in self.channels:
            await ch.close()
