"""The frontend <-> worker wire format: small binary messages over a pipe.

Token ids travel as one int32 buffer plus offsets and vectors as one float32 buffer plus row
widths; nothing is pickled, so a batch costs a couple of memcpys each way. Every message
starts with a one-byte kind.

  BATCH   frontend -> worker  batch_id, n, offsets[n+1], ids[total], dims[n], normalize[n]
  STOP    frontend -> worker  exit the main loop
  READY   worker -> frontend  JSON {pid, load_s}
  RESULT  worker -> frontend  batch_id, n, compute_ms, widths[n], values[sum widths],
                              moe_layers[L], expert_tokens[L, E]
  FAILED  worker -> frontend  batch_id, JSON {kind, message}: the batch raised, worker lives on
  LOAD_FAILED worker -> frontend JSON {message}: the runtime could not be created
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

BATCH, STOP, READY, RESULT, FAILED, LOAD_FAILED = 1, 2, 10, 11, 12, 13

_BATCH_HEAD = struct.Struct("<BQI")  # kind, batch_id, n
_RESULT_HEAD = struct.Struct("<BQIdII")  # kind, batch_id, n, compute_ms, layers, experts
_FAILED_HEAD = struct.Struct("<BQ")  # kind, batch_id


@dataclass
class BatchMessage:
    batch_id: int
    offsets: np.ndarray  # int32 [n+1]
    ids: np.ndarray  # int32 [total]
    dims: np.ndarray  # int32 [n]: output size per input (already resolved, never 0)
    normalize: np.ndarray  # bool [n]

    def __len__(self) -> int:
        return self.dims.size

    def id_lists(self) -> list[list[int]]:
        """Per-input id lists (lists, not arrays: the runtime's checks iterate them)."""
        flat = self.ids.tolist()
        off = self.offsets.tolist()
        return [flat[off[i]: off[i + 1]] for i in range(len(off) - 1)]


@dataclass
class ResultMessage:
    batch_id: int
    compute_ms: float
    widths: np.ndarray  # int32 [n]
    values: np.ndarray  # float32 [sum widths]
    moe_layers: list[int]
    expert_tokens: np.ndarray  # int64 [L, E]

    def vectors(self) -> list[np.ndarray]:
        """One float32 vector per input, views into `values`."""
        ends = np.cumsum(self.widths).tolist()
        starts = [0, *ends[:-1]]
        return [self.values[s:e] for s, e in zip(starts, ends, strict=True)]


def encode_batch(batch_id: int, ids: np.ndarray, offsets: np.ndarray, dims: np.ndarray,
                 normalize: np.ndarray) -> bytes:
    n = dims.size
    return b"".join((
        _BATCH_HEAD.pack(BATCH, batch_id, n),
        np.ascontiguousarray(offsets, dtype="<i4").tobytes(),
        np.ascontiguousarray(ids, dtype="<i4").tobytes(),
        np.ascontiguousarray(dims, dtype="<i4").tobytes(),
        np.ascontiguousarray(normalize, dtype=np.uint8).tobytes(),
    ))


def decode_batch(buf: bytes) -> BatchMessage:
    _, batch_id, n = _BATCH_HEAD.unpack_from(buf)
    pos = _BATCH_HEAD.size
    offsets = np.frombuffer(buf, "<i4", n + 1, pos)
    pos += 4 * (n + 1)
    total = int(offsets[-1])
    ids = np.frombuffer(buf, "<i4", total, pos)
    pos += 4 * total
    dims = np.frombuffer(buf, "<i4", n, pos)
    pos += 4 * n
    normalize = np.frombuffer(buf, np.uint8, n, pos).astype(bool)
    return BatchMessage(batch_id, offsets, ids, dims, normalize)


def encode_result(batch_id: int, compute_ms: float, vectors: list[np.ndarray],
                  moe_layers: list[int], expert_tokens: np.ndarray) -> bytes:
    layers, experts = expert_tokens.shape if expert_tokens.ndim == 2 else (0, 0)
    widths = np.fromiter((v.size for v in vectors), dtype="<i4", count=len(vectors))
    return b"".join((
        _RESULT_HEAD.pack(RESULT, batch_id, len(vectors), compute_ms, layers, experts),
        widths.tobytes(),
        *(np.ascontiguousarray(v, dtype="<f4").tobytes() for v in vectors),
        np.asarray(moe_layers, dtype="<i4").tobytes(),
        np.ascontiguousarray(expert_tokens, dtype="<i8").tobytes(),
    ))


def decode_result(buf: bytes) -> ResultMessage:
    _, batch_id, n, compute_ms, layers, experts = _RESULT_HEAD.unpack_from(buf)
    pos = _RESULT_HEAD.size
    widths = np.frombuffer(buf, "<i4", n, pos)
    pos += 4 * n
    total = int(widths.sum())
    values = np.frombuffer(buf, "<f4", total, pos)
    pos += 4 * total
    moe_layers = np.frombuffer(buf, "<i4", layers, pos).tolist()
    pos += 4 * layers
    counts = np.frombuffer(buf, "<i8", layers * experts, pos).reshape(layers, experts)
    return ResultMessage(batch_id, compute_ms, widths, values, moe_layers, counts)


def encode_failed(batch_id: int, kind: str, message: str) -> bytes:
    body = json.dumps({"kind": kind, "message": message}).encode()
    return _FAILED_HEAD.pack(FAILED, batch_id) + body


def decode_failed(buf: bytes) -> tuple[int, dict[str, Any]]:
    _, batch_id = _FAILED_HEAD.unpack_from(buf)
    return batch_id, json.loads(buf[_FAILED_HEAD.size:])


def encode_json(kind: int, payload: dict[str, Any]) -> bytes:
    """READY / LOAD_FAILED: rare messages, JSON is fine."""
    return bytes([kind]) + json.dumps(payload).encode()


def decode_json(buf: bytes) -> dict[str, Any]:
    return json.loads(buf[1:])


STOP_MESSAGE = bytes([STOP])
