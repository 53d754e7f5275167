"""Pooling on packed rows, per-row options (workers/runtime/pooling.py), against plain numpy."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_every_normalized_row_of_a_group_is_divided_by_its_own_norm() -> None:
    """Several rows of one (dimensions, normalize) are finished together: each row by its own
    norm, before and after the cut (3 rows of 2 dimensions, 2 rows of 2: no shape lines up)."""
    rng = np.random.default_rng(2)
    for rows, dims in ((3, 2), (2, 2), (4, 3)):
        pooled = rng.standard_normal((rows, 6)).astype(np.float32) * 3
        out = finish(pooled, dims, True)
        for row in range(rows):
            want = _unit(_unit(pooled[row])[:dims])
            np.testing.assert_allclose(out[row], want, rtol=1e-6)


def test_full_width_is_normalized_once_bit_for_bit() -> None:
    """At the model's full width nothing is cut, so nothing is normalized a second time: the
    vector is exactly the mean divided by its norm (a second division changes low bits; a
    width over 256, where Python's small-int identity no longer holds)."""
    rng = np.random.default_rng(3)
    pooled = rng.standard_normal((16, 300)).astype(np.float32) * 7
    want = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
    np.testing.assert_array_equal(finish(pooled, 300, True), want)
    np.testing.assert_array_equal(finish(pooled, 300, False), pooled)
    rows = finish_rows(pooled, np.full(16, 300), np.ones(16, dtype=bool))
    np.testing.assert_array_equal(np.stack(rows), want)


def test_many_option_pairs_in_one_batch_each_row_its_own() -> None:
    """Every (dimensions, normalize) pair of a wide range, rows interleaved: no row is finished
    with another pair's options, whatever order the pairs are visited in."""
    rng = np.random.default_rng(4)
    pairs = [(d, n) for d in range(1, 9) for n in (True, False)]
    order = rng.permutation(len(pairs) * 3) % len(pairs)
    dims = np.array([pairs[i][0] for i in order])
    norm = np.array([pairs[i][1] for i in order])
    pooled = rng.standard_normal((len(order), 8)).astype(np.float32) * 4
    out = finish_rows(pooled, dims, norm)
    for row in range(len(order)):
        assert out[row].shape == (dims[row],)
        want = finish(pooled[row:row + 1], int(dims[row]), bool(norm[row]))[0]
        np.testing.assert_array_equal(out[row], want)


def test_options_of_another_length_than_the_rows_are_refused() -> None:
    pooled = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(ValueError):
        finish_rows(pooled, np.array([4, 4]), np.array([True, True, True]))
    with pytest.raises(ValueError):
        finish_rows(pooled, np.array([4, 4, 4]), np.array([True, True]))
