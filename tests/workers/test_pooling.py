"""Pooling on packed rows, per-row options (workers/runtime/pooling.py), against plain numpy."""

from __future__ import annotations

import numpy as np

from moe_embed.workers.runtime.pooling import finish, finish_rows, mean_pool


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_mean_pool_over_each_sequence_rows_only() -> None:
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((7, 4)).astype(np.float32)
    offsets = np.array([0, 1, 4, 7])
    pooled = mean_pool(hidden, offsets)
    want = [hidden[0:1].mean(0), hidden[1:4].mean(0), hidden[4:7].mean(0)]
    np.testing.assert_allclose(pooled, want, rtol=1e-6)


def test_finish_normalizes_truncates_and_renormalizes() -> None:
    v = np.array([[3.0, 4.0, 12.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(finish(v, 4, True)[0], _unit(v[0]), rtol=1e-6)
    np.testing.assert_allclose(finish(v, 2, True)[0], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(finish(v, 2, False)[0], [3.0, 4.0])  # raw means, cut
    np.testing.assert_array_equal(finish(v, 4, False)[0], v[0])


def test_each_row_gets_its_own_dimensions_and_normalize_in_one_batch() -> None:
    """Rows of the same size but another normalize (and the reverse) share a batch: each keeps
    its own options."""
    rng = np.random.default_rng(1)
    pooled = rng.standard_normal((6, 8)).astype(np.float32) * 5
    dims = np.array([8, 8, 4, 4, 8, 4])
    norm = np.array([True, False, True, False, True, False])
    out = finish_rows(pooled, dims, norm)
    for row in range(6):
        want = finish(pooled[row:row + 1], int(dims[row]), bool(norm[row]))[0]
        np.testing.assert_array_equal(out[row], want)
        assert out[row].shape == (dims[row],)
        assert np.isclose(np.linalg.norm(out[row]), 1.0) == bool(norm[row])
