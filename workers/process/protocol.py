"""The frontend <-> worker wire format: small binary messages over a pipe.

Every message starts with a one-byte `Kind`. Token ids travel packed, exactly as the runtime
takes them (one int32 buffer plus offsets), and vectors as one float32 buffer plus row widths;
nothing is pickled, so a batch costs a couple of memcpys each way.

  BATCH       frontend -> worker  batch_id, n, offsets[n+1], ids[total], dims[n], normalize[n]
  STOP        frontend -> worker  exit the main loop
  FORK        frontend -> loader  index; followed by the new worker's two pipe ends (SCM_RIGHTS)
  READY       worker -> frontend  pid, load_s
  RESULT      worker -> frontend  batch_id, n, compute_ms, widths[n], values[sum widths],
                                  moe_layers[L], expert_tokens[L, E]
  FAILED      worker -> frontend  batch_id, message: the batch raised (a bug: requests are
                                  validated before they are queued), the worker lives on
  LOAD_FAILED worker -> frontend  message: the runtime could not be created
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class Kind(IntEnum):
    BATCH = 1
    STOP = 2
    FORK = 3
    READY = 10
    RESULT = 11
    FAILED = 12
    LOAD_FAILED = 13


_BATCH_HEAD = struct.Struct("<BQI")  # kind, batch_id, n
_RESULT_HEAD = struct.Struct("<BQIdII")  # kind, batch_id, n, compute_ms, layers, experts
_FAILED_HEAD = struct.Struct("<BQ")  # kind, batch_id
_READY = struct.Struct("<Bqd")  # kind, pid, load_s
_FORK = struct.Struct("<BI")  # kind, worker index


@dataclass
class Batch:
    batch_id: int
    ids: np.ndarray  # int32 [total]
    offsets: np.ndarray  # int32 [n+1]
    dims: np.ndarray  # int32 [n]: output size per input (already resolved, never 0)
    normalize: np.ndarray  # bool [n]

    def __len__(self) -> int:
        return self.dims.size

    def encode(self) -> bytes:
        return b"".join((
            _BATCH_HEAD.pack(Kind.BATCH, self.batch_id, self.dims.size),
            np.ascontiguousarray(self.offsets, dtype="<i4").tobytes(),
            np.ascontiguousarray(self.ids, dtype="<i4").tobytes(),
            np.ascontiguousarray(self.dims, dtype="<i4").tobytes(),
            np.ascontiguousarray(self.normalize, dtype=np.uint8).tobytes(),
        ))

    @classmethod
    def decode(cls, buf: bytes) -> Batch:
        _, batch_id, n = _BATCH_HEAD.unpack_from(buf)
        pos = _BATCH_HEAD.size
        offsets = np.frombuffer(buf, "<i4", n + 1, pos)
        pos += 4 * (n + 1)
        ids = np.frombuffer(buf, "<i4", int(offsets[-1]), pos)
        pos += ids.nbytes
        dims = np.frombuffer(buf, "<i4", n, pos)
        pos += 4 * n
        normalize = np.frombuffer(buf, np.uint8, n, pos).astype(bool)
        return cls(batch_id, ids, offsets, dims, normalize)


@dataclass
class Stop:
    def encode(self) -> bytes:
        return bytes([Kind.STOP])


@dataclass
class Fork:
    """Ask the loader for worker `index`; its pipe ends follow as file descriptors."""

    index: int

    def encode(self) -> bytes:
        return _FORK.pack(Kind.FORK, self.index)

    @classmethod
    def decode(cls, buf: bytes) -> Fork:
        return cls(_FORK.unpack_from(buf)[1])


@dataclass
class Ready:
    pid: int
    load_s: float

    def encode(self) -> bytes:
        return _READY.pack(Kind.READY, self.pid, self.load_s)

    @classmethod
    def decode(cls, buf: bytes) -> Ready:
        _, pid, load_s = _READY.unpack_from(buf)
        return cls(pid, load_s)


@dataclass
class Result:
    batch_id: int
    compute_ms: float
    widths: np.ndarray  # int32 [n]
    values: np.ndarray  # float32 [sum widths]
    moe_layers: list[int]
    expert_tokens: np.ndarray  # int64 [L, E]

    @classmethod
    def of(cls, batch_id: int, compute_ms: float, vectors: list[np.ndarray],
           moe_layers: list[int], expert_tokens: np.ndarray) -> Result:
        widths = np.fromiter((v.size for v in vectors), dtype=np.int32, count=len(vectors))
        values = np.concatenate(vectors) if vectors else np.zeros(0, np.float32)
        return cls(batch_id, compute_ms, widths, values.astype(np.float32, copy=False),
                   list(moe_layers), expert_tokens)

    def vectors(self) -> list[np.ndarray]:
        """One float32 vector per input, views into `values`."""
        ends = np.cumsum(self.widths).tolist()
        starts = [0, *ends[:-1]][: len(ends)]
        return [self.values[s:e] for s, e in zip(starts, ends, strict=True)]

    def encode(self) -> bytes:
        counts = self.expert_tokens
        layers, experts = counts.shape if counts.ndim == 2 else (0, 0)
        return b"".join((
            _RESULT_HEAD.pack(Kind.RESULT, self.batch_id, self.widths.size, self.compute_ms,
                              layers, experts),
            np.ascontiguousarray(self.widths, dtype="<i4").tobytes(),
            np.ascontiguousarray(self.values, dtype="<f4").tobytes(),
            np.asarray(self.moe_layers, dtype="<i4").tobytes(),
            np.ascontiguousarray(counts, dtype="<i8").tobytes(),
        ))

    @classmethod
    def decode(cls, buf: bytes) -> Result:
        _, batch_id, n, compute_ms, layers, experts = _RESULT_HEAD.unpack_from(buf)
        pos = _RESULT_HEAD.size
        widths = np.frombuffer(buf, "<i4", n, pos)
        pos += 4 * n
        values = np.frombuffer(buf, "<f4", int(widths.sum()), pos)
        pos += values.nbytes
        moe_layers = np.frombuffer(buf, "<i4", layers, pos).tolist()
        pos += 4 * layers
        counts = np.frombuffer(buf, "<i8", layers * experts, pos).reshape(layers, experts)
        return cls(batch_id, compute_ms, widths, values, moe_layers, counts)


@dataclass
class Failed:
    batch_id: int
    message: str

    def encode(self) -> bytes:
        return _FAILED_HEAD.pack(Kind.FAILED, self.batch_id) + self.message.encode()

    @classmethod
    def decode(cls, buf: bytes) -> Failed:
        _, batch_id = _FAILED_HEAD.unpack_from(buf)
        return cls(batch_id, buf[_FAILED_HEAD.size:].decode(errors="replace"))


@dataclass
class LoadFailed:
    message: str

    def encode(self) -> bytes:
        return bytes([Kind.LOAD_FAILED]) + self.message.encode()

    @classmethod
    def decode(cls, buf: bytes) -> LoadFailed:
        return cls(buf[1:].decode(errors="replace"))


Message = Batch | Stop | Fork | Ready | Result | Failed | LoadFailed
_DECODERS = {Kind.BATCH: Batch.decode, Kind.STOP: lambda buf: Stop(), Kind.FORK: Fork.decode,
             Kind.READY: Ready.decode,
             Kind.RESULT: Result.decode, Kind.FAILED: Failed.decode,
             Kind.LOAD_FAILED: LoadFailed.decode}


def decode(buf: bytes) -> Message:
    """Any message, by its kind byte."""
    return _DECODERS[Kind(buf[0])](buf)
