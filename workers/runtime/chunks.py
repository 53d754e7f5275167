"""Cut a packed batch into whole-sequence chunks for the dense segments.

ONNX Runtime's CPU MatMul is fastest when its operands stay in cache: on this model's linear
shapes (2 threads) it runs 15-20% faster with 512 rows than with 4096 (`make bench` measures
both, in the machine table of benchmarks/RESULTS.md), and the elementwise ops between the
MatMuls (GELU, LayerNorm, residual adds) also run from cache on a 512-row chunk. So a dense
segment runs chunk by chunk, while routing and the experts still see the whole batch (an
expert's rows are gathered from every chunk).

Attention alone pads: a chunk's sequences are gathered into [b, longest in the chunk]. A chunk
therefore has two bounds: CHUNK_TOKENS real tokens (what its linear layers compute) and
CHUNK_PADDED padded slots, b x longest (what its attention computes and holds). The runtime
orders sequences by length first, so neighbours in a chunk have similar lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNK_TOKENS = 512
CHUNK_PADDED = 2 * CHUNK_TOKENS
EXPERT_ROWS = 1024


@dataclass
class Chunk:
    rows: slice  # its real tokens: a contiguous range of the packed [N, H] rows
    layout: dict[str, np.ndarray]  # attention_mask [b, s], pad_index [b*s], unpad_index [n]


def packed_layout(lengths: np.ndarray) -> dict[str, np.ndarray]:
    """The feeds that let attention gather the packed rows of sequences of `lengths` into a
    right-padded [b, s] mask: unpad_index, the padded slot of every real token (row-major,
    which is the packed order), and pad_index, the packed row of every padded slot."""
    b, s = len(lengths), int(lengths.max())
    mask = (np.arange(s)[None, :] < lengths[:, None]).astype(np.int64)
    real = np.flatnonzero(mask.reshape(-1))
    pad_index = np.zeros(b * s, dtype=np.int64)  # padding slots read row 0: masked keys
    pad_index[real] = np.arange(real.size)
    return {"attention_mask": mask, "pad_index": pad_index, "unpad_index": real}


def chunks(lengths: np.ndarray, budget: int = CHUNK_TOKENS,
           padded_budget: int | None = None) -> list[Chunk]:
    """Consecutive sequences grouped while their real tokens fit `budget` and their padded
    slots fit `padded_budget` (default 2 x budget); a sequence over either is a chunk alone."""
    padded_budget = 2 * budget if padded_budget is None else padded_budget
    out: list[Chunk] = []
    start, row = 0, 0
    while start < len(lengths):
        end, tokens, width = start + 1, int(lengths[start]), int(lengths[start])
        while end < len(lengths):
            n = int(lengths[end])
            if tokens + n > budget or (end - start + 1) * max(width, n) > padded_budget:
                break
            tokens, width, end = tokens + n, max(width, n), end + 1
        out.append(Chunk(slice(row, row + tokens), packed_layout(lengths[start:end])))
        start, row = end, row + tokens
    return out


def row_pieces(n: int, most: int) -> list[slice]:
    """`n` rows in near-equal contiguous pieces of at most `most` rows each."""
    pieces = max(1, -(-n // most))
    bounds = [n * i // pieces for i in range(pieces + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
