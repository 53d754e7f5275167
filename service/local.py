"""The in-process API (the CLI and benchmarks use it): validate -> tokenize -> pack -> run,
the frontend's validator and tokenizer beside a worker's runtime in one process.

The same validator and tokenizer as the service's, so a request gets the same answer (or
the same error) in process as through gRPC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..workers.bundle.format import Bundle
from ..workers.runtime.runtime import Runtime, pack
from .tokenizer import Tokenizer
from .validation import Input, Limits, validate_embed


@dataclass
class Embeddings:
    vectors: np.ndarray  # float32 [B, d]
    tokens: list[int]  # token count per input, after truncation
    expert_tokens: np.ndarray  # int64 [n_moe_layers, n_experts]
    truncated: list[bool]  # per input: cut to the model's max_tokens

    def to_json(self) -> dict:
        return {"embeddings": self.vectors.tolist(), "tokens": self.tokens,
                "truncated": self.truncated, "dimensions": int(self.vectors.shape[1])}


class LocalEmbedder:
    def __init__(self, bundle: str | Path | Bundle, threads: int | None = None) -> None:
        self.runtime = Runtime(bundle, threads)
        self.bundle = self.runtime.bundle
        self.limits = Limits.of(self.bundle)
        self.tokenizer = Tokenizer.from_bundle(self.bundle)

    def embed(self, inputs: Sequence[Input], task: str, dimensions: int = 0,
              truncate: bool = True, normalize: bool = True) -> Embeddings:
        req = validate_embed(inputs, task, dimensions, self.limits, truncate, normalize)
        ids, truncated = self.tokenizer.encode_marked(req.inputs, req.task, req.truncate)
        r = self.runtime.embed(*pack(ids), req.dimensions, req.normalize)
        return Embeddings(np.stack(r.vectors), [len(x) for x in ids], r.expert_tokens,
                          truncated)
