"""Whole-sequence chunks of a packed batch (workers/runtime/chunks.py): each budget at its limit
and one past it, the attention layout against a plain padded statement, and the expert-call
pieces."""

from __future__ import annotations

import numpy as np
import pytest

from moe_embed.workers.runtime.chunks import (
    CHUNK_PADDED,
    CHUNK_TOKENS,
    EXPERT_ROWS,
    chunks,
    packed_layout,
    row_pieces,
)


def _groups(lengths: list[int], budget: int | None = None,
            padded: int | None = None) -> list[list[int]]:
    """The lengths of each chunk's sequences, read back from its row range and its mask."""
    out, row = [], 0
    parts = chunks(np.array(lengths)) if budget is None else \
        chunks(np.array(lengths), budget, padded)
    for part in parts:
        mask = part.layout["attention_mask"]
        assert part.rows.start == row  # contiguous, in packed order
        row = part.rows.stop
        out.append(mask.sum(axis=1).tolist())
    assert row == sum(lengths)
    return out


def test_the_token_budget_at_its_limit_and_one_past_it() -> None:
    """Sequences whose tokens add up to exactly the budget share a chunk; one token more and
    the last one starts the next chunk."""
    assert _groups([3, 5], budget=8, padded=100) == [[3, 5]]
    assert _groups([3, 6], budget=8, padded=100) == [[3], [6]]
    assert _groups([4, 4, 1], budget=8, padded=100) == [[4, 4], [1]]


def test_the_padded_budget_at_its_limit_and_one_past_it() -> None:
    """b x longest padded slots: exactly the padded budget fits, one slot more does not."""
    assert _groups([1, 5], budget=100, padded=10) == [[1, 5]]  # 2 x 5 = 10
    assert _groups([1, 6], budget=100, padded=11) == [[1], [6]]  # 2 x 6 = 12
    assert _groups([5, 1], budget=100, padded=10) == [[5, 1]]  # the longest came first
    assert _groups([2, 2, 2], budget=100, padded=6) == [[2, 2, 2]]
    assert _groups([2, 2, 2], budget=100, padded=5) == [[2, 2], [2]]


def test_the_padded_budget_defaults_to_twice_the_token_budget() -> None:
    assert CHUNK_PADDED == 2 * CHUNK_TOKENS
    # budget 10: 20 padded slots. 4 x 5 = 20 fits (8 tokens); 3 x 7 = 21 does not (9 tokens)
    assert _groups([1, 1, 1, 5], budget=10) == [[1, 1, 1, 5]]
    assert _groups([1, 1, 7], budget=10) == [[1, 1], [7]]


def test_a_sequence_over_either_budget_is_a_chunk_alone() -> None:
    assert _groups([2, 9, 2], budget=8, padded=100) == [[2], [9], [2]]
    assert _groups([2, 9, 2], budget=100, padded=8) == [[2], [9], [2]]
    assert _groups([9], budget=8) == [[9]]


@pytest.mark.parametrize("seed", range(5))
def test_chunks_are_greedy_and_within_budget(seed: int) -> None:
    """Every chunk of several sequences fits both budgets, and no chunk could have taken the
    next chunk's first sequence too."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 40, size=60).tolist()
    budget, padded = 64, 96
    groups = _groups(lengths, budget, padded)
    assert [n for g in groups for n in g] == lengths
    for g, nxt in zip(groups, [*groups[1:], None], strict=True):
        if len(g) > 1:
            assert sum(g) <= budget and len(g) * max(g) <= padded
        if nxt is not None:
            more = [*g, nxt[0]]
            assert sum(more) > budget or len(more) * max(more) > padded


def test_packed_layout_against_a_padded_statement() -> None:
    """unpad_index: the padded slot of each packed row; pad_index: the packed row of each
    padded slot, 0 for padding (a masked key)."""
    lengths = np.array([2, 4, 1])
    layout = packed_layout(lengths)
    mask = layout["attention_mask"]
    assert mask.dtype == np.int64 and mask.shape == (3, 4)
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    packed = np.arange(1, 8) * 10  # row values of the 7 packed tokens
    padded = np.zeros(12, dtype=np.int64)
    padded[layout["unpad_index"]] = packed
    np.testing.assert_array_equal(padded.reshape(3, 4), [[10, 20, 0, 0], [30, 40, 50, 60],
                                                         [70, 0, 0, 0]])
    np.testing.assert_array_equal(layout["pad_index"], [0, 1, 0, 0, 2, 3, 4, 5, 6, 0, 0, 0])
    np.testing.assert_array_equal(packed[layout["pad_index"]][layout["unpad_index"]], packed)
    assert layout["pad_index"].dtype == np.int64 and layout["unpad_index"].dtype == np.int64


def test_each_chunk_carries_the_layout_of_its_own_sequences() -> None:
    parts = chunks(np.array([3, 1, 7, 2]), budget=4)
    assert [(p.rows.start, p.rows.stop) for p in parts] == [(0, 4), (4, 11), (11, 13)]
    for part, lens in zip(parts, ([3, 1], [7], [2]), strict=True):
        want = packed_layout(np.array(lens))
        for key, value in want.items():
            np.testing.assert_array_equal(part.layout[key], value)


@pytest.mark.parametrize(("n", "most", "sizes"), [
    (0, 4, [0]), (1, 4, [1]), (4, 4, [4]), (5, 4, [2, 3]), (8, 4, [4, 4]), (9, 4, [3, 3, 3]),
    (10, 3, [2, 3, 2, 3]),
])
def test_row_pieces_at_the_limit_and_one_past_it(n: int, most: int, sizes: list[int]) -> None:
    """At most `most` rows each, as few pieces as that allows, near-equal, contiguous."""
    pieces = row_pieces(n, most)
    assert [p.stop - p.start for p in pieces] == sizes
    assert pieces[0].start == 0 and pieces[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(pieces[:-1], pieces[1:], strict=True))


def test_the_default_budgets_at_their_limit_and_one_past_it() -> None:
    """A chunk holds at most 512 real tokens (what a dense segment call takes, and an express
    batch's size), an expert call at most 1024 rows."""
    assert CHUNK_TOKENS == 512 and EXPERT_ROWS == 1024
    assert _groups([256, 256]) == [[256, 256]]
    assert _groups([256, 257]) == [[256], [257]]
    assert [p.stop - p.start for p in row_pieces(1024, EXPERT_ROWS)] == [1024]
    assert [p.stop - p.start for p in row_pieces(1025, EXPERT_ROWS)] == [512, 513]


def test_hundreds_of_sequences_are_all_chunked() -> None:
    """Past 256 sequences (where Python's small ints are no longer shared objects) every
    sequence still lands in exactly one chunk, in order."""
    lengths = [1 + i % 5 for i in range(700)]
    groups = _groups(lengths, budget=512, padded=100_000)
    assert [n for g in groups for n in g] == lengths
    assert len(_groups([1] * 300, budget=1000, padded=100_000)) == 1
