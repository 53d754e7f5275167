"""The routed runtime: dense ONNX segments, torch router, one ONNX session per expert.

forward, on the real tokens only (packed [N, H]; attention alone sees [B, S]): segment 0
(embeddings .. attention of the first MoE layer) -> for each MoE layer:
route the real tokens, run each expert on exactly its tokens, weighted scatter-add, bias once
-> next segment. Padding is never routed; experts that got no token are not run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..export.bundle import Bundle
from .chunks import CHUNK_TOKENS, EXPERT_ROWS, Chunk, chunks, row_pieces
from .dimensions import resolve_dimensions
from .errors import InvalidInput
from .router import Router
from .sessions import create_session, init_thread_pool


@dataclass
class EmbedResult:
    embeddings: np.ndarray  # float32 [B, d]
    expert_tokens: np.ndarray  # int64 [n_moe_layers, n_experts]
    moe_layers: list[int]


@dataclass
class HiddenResult:
    hidden: np.ndarray  # float32 [B, S, H], last layer, padding rows included
    mask: np.ndarray  # int64 [B, S]
    expert_ids: dict[int, np.ndarray]  # layer -> int64 [n_real_tokens, k], row-major real tokens
    expert_tokens: np.ndarray


def pad_ids(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad into int64 [B, S] ids and mask."""
    if not ids or any(len(x) == 0 for x in ids):
        raise InvalidInput("inputs", "every input needs at least one token")
    s = max(len(x) for x in ids)
    input_ids = np.full((len(ids), s), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), s), dtype=np.int64)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = x
        mask[i, : len(x)] = 1
    return input_ids, mask


def pool(hidden: np.ndarray, mask: np.ndarray, dimensions: int, normalize: bool) -> np.ndarray:
    """Mean over real tokens, then (normalize) L2-normalize, Matryoshka-truncate, re-normalize.

    normalize=False returns the raw mean-pooled vector, truncated to `dimensions`.
    """
    m = mask[..., None].astype(np.float32)
    pooled = (hidden * m).sum(axis=1) / m.sum(axis=1)
    if normalize:
        pooled = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
    if dimensions and dimensions < pooled.shape[1]:
        pooled = pooled[:, :dimensions]
        if normalize:
            pooled = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
    return np.ascontiguousarray(pooled, dtype=np.float32)


class Runtime:
    """One per worker process; not thread safe (sessions and buffers are reused)."""

    def __init__(self, bundle: str | Path | Bundle, threads: int | None = None) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        self.config = self.bundle.config
        self.threads = init_thread_pool(threads)
        torch.set_num_threads(1)  # the router is tiny; torch threads would fight ORT's pool
        self.chunk_tokens = CHUNK_TOKENS  # real tokens per dense-segment call (chunks.py)
        self.expert_rows = EXPERT_ROWS  # most rows per expert call (chunks.py)
        g = self.bundle.graphs
        self.moe_layers = self.config.moe_layers
        if self.bundle.moe_mode == "routed":
            self.segments = [(create_session(self.bundle.file(s["file"]), self.threads),
                              s["needs_mask"]) for s in g["segments"]]
            self.experts = {int(layer): [create_session(self.bundle.file(f), self.threads)
                                         for f in files] for layer, files in g["experts"].items()}
            rw = load_file(str(self.bundle.file(g["router"])))
            self.routers = {layer: Router(rw[f"{layer}.router"], rw[f"{layer}.expert_bias"],
                                          self.config.moe_top_k) for layer in self.moe_layers}
        else:
            self.model = create_session(self.bundle.file(g["model"]), self.threads)

    def check_dimensions(self, dimensions: int) -> int:
        return resolve_dimensions(self.bundle, dimensions)

    def embed_ids(self, ids: Sequence[Sequence[int]], dimensions: int = 0,
                  normalize: bool = True) -> EmbedResult:
        dims = self.check_dimensions(dimensions)
        r = self.forward(ids)
        vecs = pool(r.hidden, r.mask, dims, normalize)
        return EmbedResult(vecs, r.expert_tokens, list(self.moe_layers))

    def forward(self, ids: Sequence[Sequence[int]]) -> HiddenResult:
        """Last hidden states for a batch of token id lists."""
        for i, x in enumerate(ids):
            if len(x) > self.bundle.max_tokens:
                raise InvalidInput("inputs", f"{len(x)} tokens exceed {self.bundle.max_tokens}",
                                   index=i)
            if x and (min(x) < 0 or max(x) >= self.config.vocab_size):
                raise InvalidInput("inputs", "token id out of the vocabulary", index=i)
        input_ids, mask = pad_ids(ids, self.config.pad_token_id)
        counts = np.zeros((len(self.moe_layers), self.config.num_experts), dtype=np.int64)
        if self.bundle.moe_mode != "routed":
            (hidden,) = self.model.run(None, {"input_ids": input_ids, "attention_mask": mask})
            return HiddenResult(hidden, mask, {}, counts)
        return self._forward_routed(input_ids, mask, counts)

    def _forward_routed(self, input_ids: np.ndarray, mask: np.ndarray,
                        counts: np.ndarray) -> HiddenResult:
        """Packed layout: every segment and expert sees the N real tokens as [N, H] rows, so
        padding costs no linear layer; only attention gathers them into [b, s] (pad_index).
        Dense segments run in whole-sequence chunks (see chunks.py); the MoE layers route the
        whole batch at once."""
        b, s = input_ids.shape
        real = np.flatnonzero(mask.reshape(-1))  # padded slot of each real token, packed order
        parts = chunks(mask.sum(axis=1), mask, self.chunk_tokens)
        tokens = input_ids.reshape(-1)[real]
        hidden = self._segment(0, parts, {"input_ids": tokens})
        expert_ids = {}
        for li, layer in enumerate(self.moe_layers):
            moe = self._moe(layer, hidden, counts[li], expert_ids)
            hidden = self._segment(li + 1, parts, {"hidden": hidden, "moe_out": moe})
        padded = np.zeros((b * s, hidden.shape[1]), dtype=np.float32)
        padded[real] = hidden
        return HiddenResult(padded.reshape(b, s, -1), mask, expert_ids, counts)

    def _segment(self, index: int, parts: list[Chunk], rows: dict[str, np.ndarray]) -> np.ndarray:
        """Run dense segment `index` chunk by chunk over the packed rows."""
        sess, needs_mask = self.segments[index]
        outs = []
        for part in parts:
            feeds = {k: v[part.rows] for k, v in rows.items()}  # row slices: views, no copy
            if needs_mask:
                feeds.update(part.layout)
            outs.append(sess.run(None, feeds)[0])
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def _moe(self, layer: int, x: np.ndarray, counts: np.ndarray,
             expert_ids: dict[int, np.ndarray]) -> np.ndarray:
        router = self.routers[layer]
        top_w, top_e = router.route(x)
        expert_ids[layer] = top_e
        out = np.zeros_like(x)
        sessions = self.experts[layer]
        for a in router.plan(top_w, top_e):
            sess = sessions[a.expert]
            for rows in row_pieces(a.tokens.size, self.expert_rows):
                tokens = a.tokens[rows]
                (y,) = sess.run(None, {"x": x[tokens]})
                out[tokens] += y * a.weights[rows]
            counts[a.expert] = a.tokens.size
        out += router.expert_bias
        return out
