"""Cut a packed batch into whole-sequence chunks of about CHUNK_TOKENS real tokens.

ONNX Runtime's CPU MatMul is fastest when its operands stay in cache: on this model's linear
shapes (2 threads) it runs 15-20% faster with 512 rows than with 4096 (`make bench` measures
both, in the machine table of benchmarks/RESULTS.md), and the elementwise ops between the
MatMuls (GELU, LayerNorm, residual adds) also run from cache on a 512-row chunk. So a dense
segment runs chunk by chunk, while routing and the experts still see the whole batch (an
expert's rows are gathered from every chunk). Each chunk also trims the padding columns it does
not need: attention is [b, longest in the chunk], not the batch's.
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


def packed_layout(mask: np.ndarray) -> dict[str, np.ndarray]:
    """The feeds that let attention gather packed rows into a right-padded [B, S] `mask`:
    unpad_index, the padded slot of every real token (row-major, which is the packed order),
    and pad_index, the packed row of every padded slot."""
    b, s = mask.shape
    real = np.flatnonzero(mask.reshape(-1))
    pad_index = np.zeros(b * s, dtype=np.int64)  # padding slots read row 0: masked keys
    pad_index[real] = np.arange(real.size)
    return {"attention_mask": mask, "pad_index": pad_index, "unpad_index": real}


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
        layout = packed_layout(np.ascontiguousarray(mask[start:end, :width]))
        out.append(Chunk(slice(row, row + tokens), layout))
        start, row = end, row + tokens
    return out


def row_pieces(n: int, most: int) -> list[slice]:
    """`n` rows in near-equal contiguous pieces of at most `most` rows each."""
    pieces = max(1, -(-n // most))
    bounds = [n * i // pieces for i in range(pieces + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
