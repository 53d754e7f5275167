"""The /v1/embeddings body written a vector at a time: the same bytes as one orjson call over
the whole object, and no orjson call (which holds the GIL throughout) over more than one vector."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest

from moe_embed.service.http import embeddings_body as body_module
from moe_embed.service.http.embeddings_body import INLINE_VALUES, embeddings_body, values_in


def _vectors(n: int, dims: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = [rng.standard_normal(dims).astype(np.float32) for _ in range(n)]
    if n:
        out[0][:3] = [np.float32(1e-38), np.float32(-0.0), np.float32(3.4e38)]  # edge values
    return out


def _one_call(vectors: list[np.ndarray], truncated: list[bool], encoding: str, model: str,
              tokens: int) -> bytes:
    def emb(v: np.ndarray) -> object:
        if encoding == "base64":
            return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
        return v
    return orjson.dumps({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": emb(v), "truncated": c}
                 for i, (v, c) in enumerate(zip(vectors, truncated, strict=True))],
        "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }, option=orjson.OPT_SERIALIZE_NUMPY)


@pytest.mark.parametrize("encoding", ["float", "base64"])
@pytest.mark.parametrize("n", [0, 1, 2, 37])
def test_the_same_bytes_as_one_call(n: int, encoding: str) -> None:
    vectors = _vectors(n, 768, seed=n)
    truncated = [i % 3 == 1 for i in range(n)]
    model = 'nomic-ai/nomic-embed-text-v2-moe "q"'  # a name that JSON must escape
    got = embeddings_body(vectors, truncated, encoding, model, 12345)
    assert got == _one_call(vectors, truncated, encoding, model, 12345)
    parsed = orjson.loads(got)
    assert [d["index"] for d in parsed["data"]] == list(range(n))
    if encoding == "float" and n:  # float32 values round-trip exactly
        np.testing.assert_array_equal(np.array(parsed["data"][-1]["embedding"], np.float32),
                                      vectors[-1])


def test_a_vector_per_orjson_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """orjson keeps the GIL for a whole call: 256 x 768 values in one held it ~5-10 ms."""
    seen: list[int] = []

    class Counting:
        OPT_SERIALIZE_NUMPY = orjson.OPT_SERIALIZE_NUMPY

        @staticmethod
        def dumps(obj: object, option: int = 0) -> bytes:
            seen.append(_arrays_in(obj))
            return orjson.dumps(obj, option=option)

    monkeypatch.setattr(body_module, "orjson", Counting)
    vectors = _vectors(256, 768)
    embeddings_body(vectors, [False] * 256, "float", "m", 1)
    assert sum(seen) == 256 and max(seen) == 1


def _arrays_in(obj: object) -> int:
    if isinstance(obj, np.ndarray):
        return 1
    if isinstance(obj, dict):
        return sum(_arrays_in(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_arrays_in(v) for v in obj)
    return 0


def test_values_in_decides_where_a_body_is_written() -> None:
    dims = 64
    at_limit = _vectors(INLINE_VALUES // dims, dims)
    assert values_in(at_limit) == INLINE_VALUES
    assert values_in(at_limit + _vectors(1, dims)) == INLINE_VALUES + dims
    assert values_in(_vectors(3, 16) + _vectors(2, 8)) == 64
