"""Pooling on packed rows: the mean over each sequence's real tokens (segment sums, no
padding ever built), L2-normalize, Matryoshka-truncate, re-normalize."""

from __future__ import annotations

import numpy as np


def mean_pool(hidden: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """hidden [N, H] packed rows, offsets [B+1] -> the mean of each sequence's rows [B, H]."""
    lengths = np.diff(offsets).astype(np.float32)
    sums = np.add.reduceat(hidden, offsets[:-1], axis=0)
    return sums / lengths[:, None]


def finish(pooled: np.ndarray, dimensions: int, normalize: bool) -> np.ndarray:
    """[B, H] means -> [B, dimensions]: normalize, truncate, normalize again; normalize=False
    returns the raw means truncated to `dimensions`."""
    if normalize:
        pooled = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
    if dimensions < pooled.shape[1]:
        pooled = pooled[:, :dimensions]
        if normalize:
            pooled = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
    return np.ascontiguousarray(pooled, dtype=np.float32)


def finish_rows(pooled: np.ndarray, dimensions: np.ndarray,
                normalize: np.ndarray) -> list[np.ndarray]:
    """Each row with its own (dimensions, normalize): rows sharing them are done together."""
    out: list[np.ndarray] = [None] * len(pooled)  # type: ignore[list-item]
    keys = list(zip(dimensions.tolist(), normalize.tolist(), strict=True))
    for key in set(keys):
        rows = [i for i, k in enumerate(keys) if k == key]
        for row, vec in zip(rows, finish(pooled[rows], key[0], bool(key[1])), strict=True):
            out[row] = vec
    return out
