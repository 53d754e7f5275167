"""The `/v1/embeddings` response body, written one vector at a time.

orjson holds the GIL for a whole call: one call over 256 x 768 floats held it ~4.5 ms, and
every other thread of the frontend (the HTTP loop, the engine's loop, gRPC) stood still
meanwhile. Written a vector at a time (~20 us each) in the respond thread, the GIL changes
hands between vectors within a switch interval (another thread's wake-up late by at most ~1 ms
against ~4.5: benchmarks/body_stall.py); the pieces are joined once, and a body costs ~0.3-0.7
ms more.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import numpy as np
import orjson

# Bodies of at most this many values are written on the event loop (a one-text call: ~20 us);
# larger ones in the respond thread (service/http/app.py). ~0.3 ms of orjson, under a switch
# interval.
INLINE_VALUES = 16 * 1024


def _embedding(vector: np.ndarray, encoding: str) -> np.ndarray | str:
    if encoding == "base64":  # what the openai client decodes: little-endian float32
        return base64.b64encode(vector.astype("<f4", copy=False).tobytes()).decode("ascii")
    return np.ascontiguousarray(vector, dtype=np.float32)


def embeddings_body(vectors: Sequence[np.ndarray], truncated: Sequence[bool], encoding: str,
                    model: str, tokens: int) -> bytes:
    """OpenAI's embeddings list as JSON bytes; float32 values as their shortest exact decimal
    forms (the same bytes as one orjson call over the whole object)."""
    parts = [b'{"object":"list","data":[']
    for i, (vector, cut) in enumerate(zip(vectors, truncated, strict=True)):
        if i:
            parts.append(b",")
        parts.append(orjson.dumps({"object": "embedding", "index": i,
                                   "embedding": _embedding(vector, encoding), "truncated": cut},
                                  option=orjson.OPT_SERIALIZE_NUMPY))
    parts.append(b'],"model":' + orjson.dumps(model) + b',"usage":' + orjson.dumps(
        {"prompt_tokens": tokens, "total_tokens": tokens}) + b"}")
    return b"".join(parts)


def values_in(vectors: Sequence[np.ndarray]) -> int:
    """How many values a body of these vectors carries (what decides where it is written)."""
    return sum(int(v.size) for v in vectors)
