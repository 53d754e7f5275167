"""Corpus jobs: a file of documents in, Parquet shards of vectors out, resumable; in process,
through running servers (`moe-embed batch`), or in a Ray Data pipeline (`RayEmbedder`)."""

from __future__ import annotations

from typing import Any

__all__ = ["RayEmbedder"]


def __getattr__(name: str) -> Any:
    # imported on use: `moe-embed serve` loads this package's CLI module, not pyarrow
    if name == "RayEmbedder":
        from .ray_embedder import RayEmbedder

        return RayEmbedder
    raise AttributeError(name)
