"""Chunking long documents with the real XLM-R tokenizer: window sizes, overlaps, the 512-token
limit as the model sees each chunk, and the option boundaries."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as HFTokenizer

from moe_embed.batch.chunking import Chunker
from moe_embed.export.synthetic import tokenizer_json_path
from moe_embed.service.tasks import task_named
from moe_embed.service.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def counter() -> Tokenizer:
    return Tokenizer(tokenizer_json_path(), 512)


@pytest.fixture(scope="module")
def hf() -> HFTokenizer:
    return HFTokenizer.from_file(str(tokenizer_json_path()))


@pytest.fixture(scope="module")
def long_text(multilingual_texts: list[str]) -> str:
    # runs of spaces and newlines between texts: the normalizer folds them, offsets must not
    return "  \n\n   ".join(multilingual_texts * 6) + "   "


def _chunker(counter: Tokenizer, n: int, m: int, task: str = "search_document") -> Chunker:
    return Chunker(tokenizer_json_path(), counter, task_named(task), n, m)


def _offsets(hf: HFTokenizer, text: str) -> list[tuple[int, int]]:
    return [(a, b) for a, b in hf.encode(text, add_special_tokens=False).offsets if b > a]


@pytest.mark.parametrize(("n", "m"), [(64, 16), (100, 0), (37, 36)])
def test_windows_have_n_tokens_and_overlap_m(counter, hf, long_text, n, m) -> None:
    windows = _chunker(counter, n, m).windows(long_text)
    offsets = _offsets(hf, long_text)
    assert windows[0].first == 0 and windows[-1].end == len(offsets)  # every token in a chunk
    assert all(w.end - w.first == n for w in windows[:-1])
    assert 0 < windows[-1].end - windows[-1].first <= n
    for prev, nxt in zip(windows, windows[1:], strict=False):
        assert nxt.first == prev.end - m  # exactly M tokens shared
    for w in windows:  # the characters of its tokens in the original text, stripped
        a, b = offsets[w.first][0], offsets[w.end - 1][1]
        assert long_text[w.char_start:w.char_end] == long_text[a:b].strip()
        assert (w.char_start, w.char_end) == (a + len(long_text[a:b]) -
                                              len(long_text[a:b].lstrip()),
                                              b - len(long_text[a:b]) +
                                              len(long_text[a:b].rstrip()))


def test_whitespace_only_windows_are_left_out(counter) -> None:
    text = "a b c" + " " * 6  # ends in lone "▁" tokens
    spans = _chunker(counter, 1, 0).spans(text)
    assert [text[a:b] for a, b in spans] == ["a", "b", "c"]


@pytest.mark.parametrize("plain", [False, True])
@pytest.mark.parametrize("task", ["none", "search_document"])
def test_n_512_shrinks_each_window_until_the_model_sees_at_most_512(counter, long_text,
                                                                     task, plain) -> None:
    """Plain words re-tokenize as they were cut: the windows are then over by just the
    specials (and prefix), 2 tokens for task none."""
    text = "the quick brown fox jumps over the lazy dog " * 200 if plain else long_text
    chunker = _chunker(counter, 512, 64, task)
    spans = chunker.spans(text)
    seen = [chunker.seen_tokens(text[a:b]) for a, b in spans]
    assert len(spans) > 2
    assert max(seen) <= 512
    assert min(seen[:-1]) >= 500  # shrunk by the excess only, not to some safe small size


def test_the_task_prefix_counts(counter, long_text) -> None:
    """512 text tokens fit with no prefix only after the two specials are made room for;
    with `search_document: ` the windows must shrink a little more."""
    none, doc = _chunker(counter, 512, 0, "none"), _chunker(counter, 512, 0)
    a0, b0 = none.spans(long_text)[0]
    a1, b1 = doc.spans(long_text)[0]
    assert none.seen_tokens(long_text[a0:b0]) <= 512 and doc.seen_tokens(long_text[a1:b1]) <= 512
    assert b1 < b0


def test_a_text_within_one_window_is_one_chunk(counter) -> None:
    text = "  Tell me about embeddings.  "
    assert _chunker(counter, 16, 2).spans(text) == [(2, 27)]


@pytest.mark.parametrize(("n", "m", "message"), [
    (513, 0, r"chunk_tokens \(--chunk-tokens\) is 513; it must be within 1\.\.512"),
    (0, 0, r"chunk_tokens \(--chunk-tokens\) is 0"),
    (64, 64, r"chunk_overlap \(--chunk-overlap\) is 64; it must be within 0\.\.63"),
    (64, -1, r"chunk_overlap \(--chunk-overlap\) is -1"),
])
def test_impossible_windows_are_refused_naming_the_option(counter, n, m, message) -> None:
    with pytest.raises(ValueError, match=message):
        _chunker(counter, n, m)


def test_the_limits_themselves_are_accepted(counter, long_text) -> None:
    windows = _chunker(counter, 512, 511).windows(long_text[:4000])
    assert [w.first for w in windows[:3]] == [0, 1, 2]  # one token further each time
