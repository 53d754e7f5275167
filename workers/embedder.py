"""In-process embedding: tokenizer + runtime behind one call, for the CLI and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..export.bundle import Bundle
from .errors import InvalidInput
from .runtime import Runtime
from .tokenizer import Tokenizer


@dataclass
class Embeddings:
    vectors: np.ndarray  # float32 [B, d]
    tokens: list[int]  # token count per input, after truncation
    expert_tokens: np.ndarray  # int64 [n_moe_layers, n_experts]

    def to_json(self) -> dict:
        return {"embeddings": self.vectors.tolist(), "tokens": self.tokens,
                "dimensions": int(self.vectors.shape[1])}


class LocalEmbedder:
    def __init__(self, bundle: str | Path | Bundle, threads: int | None = None) -> None:
        self.runtime = Runtime(bundle, threads)
        self.bundle = self.runtime.bundle
        self.tokenizer = Tokenizer.from_bundle(self.bundle)

    def embed(self, texts: Sequence[str], task: str, dimensions: int = 0, truncate: bool = True,
              normalize: bool = True) -> Embeddings:
        if not texts:
            raise InvalidInput("inputs", "at least one input is required")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t:
                raise InvalidInput("inputs", "must be a non-empty string", index=i)
        ids = self.tokenizer.encode(texts, task, truncate)
        r = self.runtime.embed_ids(ids, dimensions, normalize)
        return Embeddings(r.embeddings, [len(x) for x in ids], r.expert_tokens)
