"""Cut a packed batch into whole-sequence chunks of about CHUNK_TOKENS real tokens.

ONNX Runtime's CPU MatMul is fastest when its operands stay in cache: on this model's linear
shapes (2 threads, AMD EPYC) it runs at ~180 GFLOPS with 512 rows and ~150 with 4096, and the
elementwise ops between the MatMuls (GELU, LayerNorm, residual adds) also run from cache on a
512-row chunk. So a dense segment runs chunk by chunk, while routing and the experts still see
the whole batch (an expert's rows are gathered from every chunk). Each chunk also trims the
padding columns it does not need: attention is [b, longest in the chunk], not the batch's.
Measured with tests/perf/bench.py (W2/W3) and the probe in the closing note of issue 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNK_TOKENS = 512
EXPERT_ROWS = 1024


@dataclass
class Chunk:
    rows: slice  # its real tokens: a contiguous range of the packed [N, H] rows
    layout: dict[str, np.ndarray]  # attention_mask [b, s], pad_index [b*s], unpad_index [n]


def packed_layout(mask: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """For a right-padded [B, S] mask: the padded slot of every real token (row-major, which is
    the packed order) and the feeds that let attention gather packed rows into [B, S]."""
    b, s = mask.shape
    real = np.flatnonzero(mask.reshape(-1))  # unpad_index
    pad_index = np.zeros(b * s, dtype=np.int64)  # padding slots read row 0: masked keys
    pad_index[real] = np.arange(real.size)
    return real, {"attention_mask": mask, "pad_index": pad_index, "unpad_index": real}


def chunks(lengths: np.ndarray, mask: np.ndarray, budget: int = CHUNK_TOKENS) -> list[Chunk]:
    """Consecutive sequences grouped while their real tokens fit `budget` (a longer sequence
    is a chunk of its own)."""
    out: list[Chunk] = []
    start, row = 0, 0
    while start < len(lengths):
        end, tokens = start + 1, int(lengths[start])
        while end < len(lengths) and tokens + int(lengths[end]) <= budget:
            tokens += int(lengths[end])
            end += 1
        width = int(lengths[start:end].max())
        _, layout = packed_layout(np.ascontiguousarray(mask[start:end, :width]))
        out.append(Chunk(slice(row, row + tokens), layout))
        start, row = end, row + tokens
    return out


def row_pieces(n: int, most: int) -> list[slice]:
    """`n` rows in near-equal contiguous pieces of at most `most` rows each."""
    pieces = max(1, -(-n // most))
    bounds = [n * i // pieces for i in range(pieces + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
