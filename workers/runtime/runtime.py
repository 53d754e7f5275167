"""The routed runtime: dense ONNX segments, torch router, one ONNX session per expert.

A batch arrives packed, as the wire carries it: flat token ids and offsets (sequence i is
ids[offsets[i]:offsets[i+1]]). Every step works on the packed [N, H] rows of real tokens:
segment 0 (embeddings .. attention of the first MoE layer) -> for each MoE layer: route
every token, run each expert on exactly its tokens, weighted scatter-add, bias once -> next
segment -> mean-pool each sequence's rows. Padding is never built for a linear layer (only
attention gathers a chunk into [b, longest]); experts that got no token are not run.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file

from ..bundle.format import Bundle
from .chunks import CHUNK_TOKENS, EXPERT_ROWS, Chunk, chunks, row_pieces
from .errors import MalformedBatch
from .pooling import finish_rows, mean_pool
from .router import Router
from .sessions import create_session, create_sessions, init_thread_pool

ONE_ROW_BLOCK = 128  # rows ORT's GEMMs are split into (see run_expert_rows)
T = TypeVar("T")


def pack(id_lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-sequence id lists -> flat int32 ids and int32 offsets [B+1] (the wire layout)."""
    offsets = np.zeros(len(id_lists) + 1, dtype=np.int32)
    np.cumsum([len(x) for x in id_lists], out=offsets[1:])
    ids = np.concatenate([np.asarray(x, dtype=np.int32) for x in id_lists]) if id_lists \
        else np.zeros(0, dtype=np.int32)
    return ids, offsets


@dataclass
class Forward:
    hidden: np.ndarray  # float32 [N, H]: last hidden state of every real token, packed order
    offsets: np.ndarray  # [B+1]
    expert_ids: dict[int, np.ndarray]  # MoE layer -> int64 [N, k], packed order (routed only)
    expert_tokens: np.ndarray  # int64 [n_moe_layers, n_experts]: tokens each expert computed
    expert_calls: np.ndarray  # int64 [n_moe_layers, n_experts]: session runs of each expert


@dataclass
class Embedded:
    vectors: list[np.ndarray]  # float32, one per sequence, each its own size
    expert_tokens: np.ndarray  # int64 [n_moe_layers, n_experts]
    moe_layers: list[int]
    expert_calls: np.ndarray  # int64 [n_moe_layers, n_experts]


def _length_order(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Sequences ordered by length, so chunk neighbours pad little: (the packed row of every
    sorted row, the sorted lengths), or None when they already are in order."""
    lengths = np.diff(offsets)
    if (lengths[1:] >= lengths[:-1]).all():
        return None
    order = np.argsort(lengths, kind="stable")
    sorted_lengths = lengths[order]
    starts = np.repeat(offsets[:-1][order], sorted_lengths)
    first = np.repeat(np.cumsum(sorted_lengths) - sorted_lengths, sorted_lengths)
    return starts + (np.arange(int(offsets[-1])) - first), sorted_lengths


def _finish(steps: Generator[None, None, T]) -> T:
    """Run a step generator to its end and return its value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


class Runtime:
    """One per worker process; not thread safe (sessions are reused)."""

    def __init__(self, bundle: str | Path | Bundle, threads: int | None = None) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        manifest = self.bundle.manifest
        self.config = manifest.config
        self.max_tokens = manifest.max_tokens
        self.dims_range = (manifest.dimensions.min, manifest.dimensions.max)
        self.moe_mode = manifest.moe_mode
        self.threads = init_thread_pool(threads)
        torch.set_num_threads(1)  # the router is tiny; torch threads would fight ORT's pool
        self.chunk_tokens = CHUNK_TOKENS  # real tokens per dense-segment call (chunks.py)
        self.expert_rows = EXPERT_ROWS  # most rows per expert call (chunks.py)
        self.moe_layers = self.config.moe_layers
        g = manifest.graphs
        if self.moe_mode == "routed":
            layers = list(g.experts.items())
            sessions = iter(create_sessions(
                [self.bundle.file(s.file) for s in g.segments]
                + [self.bundle.file(f) for _, files in layers for f in files], self.threads))
            self.segments = [(next(sessions), s.needs_mask) for s in g.segments]
            self.experts = {layer: [next(sessions) for _ in files] for layer, files in layers}
            rw = load_file(str(self.bundle.file(g.router)))
            self.routers = {layer: Router(rw[f"{layer}.router"], rw[f"{layer}.expert_bias"],
                                          self.config.moe_top_k) for layer in self.moe_layers}
        else:
            self.model = create_session(self.bundle.file(g.model), self.threads)

    # -- the API -----------------------------------------------------------------------------
    def check(self, ids: np.ndarray, offsets: np.ndarray) -> None:
        """Cheap invariants on the packed arrays: requests were validated once, before queuing,
        so a failure here is a bug upstream (MalformedBatch, naming the row)."""
        if offsets.ndim != 1 or offsets.size < 2 or offsets[0] != 0 \
                or offsets[-1] != ids.size:
            raise MalformedBatch("malformed offsets")
        lengths = np.diff(offsets)
        bad = np.flatnonzero((lengths < 1) | (lengths > self.max_tokens))
        if bad.size:
            raise MalformedBatch(f"row {int(bad[0])}: {int(lengths[bad[0]])} tokens, not "
                                 f"1..{self.max_tokens}")
        outside = np.flatnonzero((ids < 0) | (ids >= self.config.vocab_size))
        if outside.size:
            row = int(np.searchsorted(offsets, outside[0], side="right")) - 1
            raise MalformedBatch(f"row {row}: token id out of the vocabulary")

    def _dimensions(self, dimensions: int | np.ndarray, n: int) -> np.ndarray:
        lo, hi = self.dims_range
        dims = np.broadcast_to(np.asarray(dimensions, dtype=np.int64), (n,)).copy()
        dims[dims == 0] = hi
        bad = np.flatnonzero((dims < lo) | (dims > hi))
        if bad.size:
            raise MalformedBatch(f"row {int(bad[0])}: dimensions {int(dims[bad[0]])} outside "
                                 f"{lo}..{hi}")
        return dims

    def embed(self, ids: np.ndarray, offsets: np.ndarray, dimensions: int | np.ndarray = 0,
              normalize: bool | np.ndarray = True) -> Embedded:
        """Vectors of a packed batch; `dimensions` (0 = full) and `normalize` per sequence or
        for all."""
        return _finish(self.embed_steps(ids, offsets, dimensions, normalize))

    def forward(self, ids: np.ndarray, offsets: np.ndarray) -> Forward:
        """Last hidden states of a packed batch, in its packed order."""
        return _finish(self.forward_steps(ids, offsets))

    def embed_steps(self, ids: np.ndarray, offsets: np.ndarray,
                    dimensions: int | np.ndarray = 0,
                    normalize: bool | np.ndarray = True) -> Generator[None, None, Embedded]:
        """`embed` as a generator that pauses after every session call (a chunk of a dense
        segment, an expert's piece): a worker can run a small batch in those pauses."""
        n = offsets.size - 1
        dims = self._dimensions(dimensions, n)
        norm = np.broadcast_to(np.asarray(normalize, dtype=bool), (n,))
        fwd = yield from self.forward_steps(ids, offsets)
        vectors = finish_rows(mean_pool(fwd.hidden, fwd.offsets), dims, norm)
        return Embedded(vectors, fwd.expert_tokens, list(self.moe_layers), fwd.expert_calls)

    def forward_steps(self, ids: np.ndarray,
                      offsets: np.ndarray) -> Generator[None, None, Forward]:
        self.check(ids, offsets)
        counts = np.zeros((len(self.moe_layers), self.config.num_experts), dtype=np.int64)
        calls = np.zeros_like(counts)
        if self.moe_mode != "routed":
            return Forward(self._all_experts(ids, offsets), offsets, {}, counts, calls)
        order = _length_order(offsets)
        if order is None:
            hidden, experts = yield from self._routed(ids.astype(np.int64), np.diff(offsets),
                                                      counts, calls)
            return Forward(hidden, offsets, experts, counts, calls)
        rows, lengths = order
        hidden_sorted, experts_sorted = yield from self._routed(ids[rows].astype(np.int64),
                                                                lengths, counts, calls)
        hidden = np.empty_like(hidden_sorted)
        hidden[rows] = hidden_sorted
        experts = {}
        for layer, e in experts_sorted.items():
            experts[layer] = np.empty_like(e)
            experts[layer][rows] = e
        return Forward(hidden, offsets, experts, counts, calls)

    # -- routed execution --------------------------------------------------------------------
    def _routed(self, ids: np.ndarray, lengths: np.ndarray, counts: np.ndarray,
                calls: np.ndarray
                ) -> Generator[None, None, tuple[np.ndarray, dict[int, np.ndarray]]]:
        """Dense segments run in whole-sequence chunks (chunks.py); each MoE layer routes the
        whole batch at once."""
        parts = chunks(lengths, self.chunk_tokens)
        hidden = yield from self._segment(0, parts, {"input_ids": ids})
        expert_ids: dict[int, np.ndarray] = {}
        for li, layer in enumerate(self.moe_layers):
            moe = yield from self._moe(layer, hidden, counts[li], calls[li], expert_ids)
            hidden = yield from self._segment(li + 1, parts, {"hidden": hidden, "moe_out": moe})
        return hidden, expert_ids

    def _segment(self, index: int, parts: list[Chunk],
                 rows: dict[str, np.ndarray]) -> Generator[None, None, np.ndarray]:
        """Run dense segment `index` chunk by chunk over the packed rows."""
        sess, needs_mask = self.segments[index]
        outs = []
        for part in parts:
            feeds = {k: v[part.rows] for k, v in rows.items()}  # row slices: views, no copy
            if needs_mask:
                feeds.update(part.layout)
            outs.append(sess.run(None, feeds)[0])
            yield
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def _moe(self, layer: int, x: np.ndarray, counts: np.ndarray, calls: np.ndarray,
             expert_ids: dict[int, np.ndarray]) -> Generator[None, None, np.ndarray]:
        router = self.routers[layer]
        top_w, top_e = router.route(x)
        expert_ids[layer] = top_e
        out = np.zeros_like(x)
        sessions = self.experts[layer]
        for a in router.plan(top_w, top_e):
            sess = sessions[a.expert]
            for rows in row_pieces(a.tokens.size, self.expert_rows):
                tokens = a.tokens[rows]
                y = run_expert_rows(sess, x[tokens])
                calls[a.expert] += 1
                out[tokens] += y * a.weights[rows]
                yield
            counts[a.expert] = a.tokens.size
        out += router.expert_bias
        return out

    # -- the all-experts peer ----------------------------------------------------------------
    def _all_experts(self, ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """The single-graph benchmark peer takes padded [B, S]; its real rows come back
        packed."""
        lengths = np.diff(offsets)
        mask = (np.arange(int(lengths.max()))[None, :] < lengths[:, None])
        input_ids = np.full(mask.shape, self.config.pad_token_id, dtype=np.int64)
        input_ids[mask] = ids
        (hidden,) = self.model.run(None, {"input_ids": input_ids,
                                          "attention_mask": mask.astype(np.int64)})
        return np.ascontiguousarray(hidden[mask])


def run_expert_rows(sess: Any, x: np.ndarray) -> np.ndarray:
    """An expert on `x`'s rows, so that a row's result never depends on how many rows there
    are. ONNX Runtime splits a GEMM's rows into blocks of ONE_ROW_BLOCK and computes a block of
    a single row with other kernels (MatMulNBits on AVX2: results ~1e-8..1e-6 apart, at 1, 129,
    257, ... rows with 2 or more threads); such a call gets its last row once more, dropped."""
    if len(x) % ONE_ROW_BLOCK == 1:
        return sess.run(None, {"x": np.concatenate([x, x[-1:]])})[0][:-1]
    return sess.run(None, {"x": x})[0]
