"""A small Python client for the service, and `embed_remote` behind `moe-embed embed --server`.

    from moe_embed.service.client import EmbedClient
    with EmbedClient("localhost:50051") as client:
        vectors = client.embed(["tell me about embeddings"], task="search_query")

Texts beyond the server's per-request limit are sent in several requests, in order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from ..v1 import embedder_pb2 as pb
from ..v1 import embedder_pb2_grpc as pb_grpc
from ..workers.errors import InvalidInput

TASKS = {
    "none": pb.TASK_NONE,
    "search_query": pb.TASK_SEARCH_QUERY,
    "search_document": pb.TASK_SEARCH_DOCUMENT,
    "classification": pb.TASK_CLASSIFICATION,
    "clustering": pb.TASK_CLUSTERING,
}
_WHERE = re.compile(r"^(?P<field>[a-z_]+)(\[(?P<index>\d+)\])?: (?P<detail>.*)$", re.S)


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
        m = _WHERE.match(err.details() or "")
        if m:
            index = int(m["index"]) + offset if m["index"] is not None else None
            raise InvalidInput(m["field"], m["detail"], index=index) from None
    raise RemoteError(target, err.code(), err.details() or "") from None


class EmbedClient:
    """A channel to one server; not for use across fork()."""

    def __init__(self, target: str, timeout_s: float = 60.0) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.EmbedderStub(self._channel)
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
                self._info = self._stub.Info(pb.InfoRequest(), timeout=self.timeout_s)
            except grpc.RpcError as err:
                _raise(self.target, err)
        return self._info

    def embed_response(self, texts: Sequence[str], task: str, dimensions: int = 0,
                       truncate: bool = True, normalize: bool = True) -> list[pb.EmbedResponse]:
        """The raw responses, one per chunk of at most the server's max_inputs texts."""
        if task not in TASKS:
            raise InvalidInput("task", f"unknown task {task!r}; expected one of {list(TASKS)}")
        texts = list(texts)
        step = max(1, self.info().max_inputs) if len(texts) > 1 else 1
        out = []
        for start in range(0, max(1, len(texts)), step):
            req = pb.EmbedRequest(inputs=texts[start:start + step], task=TASKS[task],
                                  dimensions=dimensions, truncate=truncate, normalize=normalize)
            try:
                out.append(self._stub.Embed(req, timeout=self.timeout_s))
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
    {"embeddings": [[...]], "tokens": [n, ...], "dimensions": d}."""
    with EmbedClient(target) as client:
        responses = client.embed_response(texts, task, dimensions)
    return {
        "embeddings": [list(e.values) for r in responses for e in r.embeddings],
        "tokens": [n for r in responses for n in r.token_counts],
        "dimensions": responses[0].dimensions,
    }
