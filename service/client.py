"""A small Python client for the service, and `embed_remote` behind `moe-embed embed --server`.

    from moe_embed.service.client import EmbedClient
    with EmbedClient("localhost:50051") as client:
        vectors = client.embed(["tell me about embeddings"], task="search_query")

Texts beyond the server's per-request limit are sent in several requests, in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from ..v1 import embedder_pb2 as pb
from ..v1 import embedder_pb2_grpc as pb_grpc
from .errors import InvalidInput
from .tasks import task_named
from .wire import PROTO_OF_TASK, bad_request


class RemoteError(RuntimeError):
    """The server answered with a status other than OK and INVALID_ARGUMENT."""

    def __init__(self, target: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{target}: {code.name}: {details}")
        self.code = code
        self.details = details


def _raise(target: str, err: grpc.RpcError, offset: int = 0) -> None:
    """INVALID_ARGUMENT -> InvalidInput naming the field (and the caller's index), as the
    in-process embedder would; anything else -> RemoteError."""
    if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
        violation = bad_request(err)
        if violation is not None:
            field, index, detail = violation
            index = index + offset if index is not None else None
            raise InvalidInput(field, detail, index=index) from None
    raise RemoteError(target, err.code(), err.details() or "") from None


class EmbedClient:
    """A channel to one server; not for use across fork(). With `credentials` (e.g.
    `grpc.ssl_channel_credentials(ca, key, cert)`) the channel speaks TLS; with `api_key`
    every call carries `authorization: Bearer <api_key>`."""

    def __init__(self, target: str, timeout_s: float = 60.0,
                 credentials: grpc.ChannelCredentials | None = None,
                 api_key: str | None = None) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._channel = (grpc.secure_channel(target, credentials) if credentials is not None
                         else grpc.insecure_channel(target))
        self._stub = pb_grpc.EmbedderStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._info: pb.InfoResponse | None = None

    def __enter__(self) -> EmbedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def info(self) -> pb.InfoResponse:
        if self._info is None:
            try:
                self._info = self._stub.Info(pb.InfoRequest(), timeout=self.timeout_s,
                                             metadata=self._metadata)
            except grpc.RpcError as err:
                _raise(self.target, err)
        return self._info

    def embed_response(self, texts: Sequence[str], task: str, dimensions: int = 0,
                       truncate: bool = True, normalize: bool = True) -> list[pb.EmbedResponse]:
        """The raw responses, one per chunk of at most the server's max_inputs texts."""
        proto_task = PROTO_OF_TASK[task_named(task).name]
        texts = list(texts)
        step = max(1, self.info().max_inputs) if len(texts) > 1 else 1
        out = []
        for start in range(0, max(1, len(texts)), step):
            req = pb.EmbedRequest(inputs=texts[start:start + step], task=proto_task,
                                  dimensions=dimensions, truncate=truncate, normalize=normalize)
            try:
                out.append(self._stub.Embed(req, timeout=self.timeout_s,
                                            metadata=self._metadata))
            except grpc.RpcError as err:
                _raise(self.target, err, offset=start)
        return out

    def embed(self, texts: Sequence[str], task: str, dimensions: int = 0,
              truncate: bool = True, normalize: bool = True) -> np.ndarray:
        """float32 [len(texts), d], in input order."""
        responses = self.embed_response(texts, task, dimensions, truncate, normalize)
        return np.array([list(e.values) for r in responses for e in r.embeddings],
                        dtype=np.float32)


def embed_remote(target: str, texts: Sequence[str], task: str,
                 dimensions: int = 0) -> dict[str, Any]:
    """What the in-process `embed` prints, computed by a running server:
    {"embeddings": [[...]], "tokens": [n, ...], "truncated": [bool, ...], "dimensions": d}."""
    with EmbedClient(target) as client:
        responses = client.embed_response(texts, task, dimensions)
    return {
        "embeddings": [list(e.values) for r in responses for e in r.embeddings],
        "tokens": [n for r in responses for n in r.token_counts],
        "truncated": [cut for r in responses for cut in r.truncated],
        "dimensions": responses[0].dimensions,
    }
