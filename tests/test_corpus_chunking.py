"""Chunking long documents with the real XLM-R tokenizer: window sizes, overlaps, the 512-token
limit as the model sees each chunk, and the option boundaries."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as HFTokenizer

from moe_embed.batch.chunking import Chunker
from moe_embed.export.synthetic import tokenizer_json_path
from moe_embed.workers.runtime.tasks import task_named
from moe_embed.workers.runtime.tokenizer import Tokenizer


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
    """Offsets of the text's tokens that hold more than whitespace, without the space a
    token's offsets may start with (XLM-R's "▁word" covers the space before the word)."""
    out = []
    for a, b in hf.encode(text, add_special_tokens=False).offsets:
        piece = text[a:b]
        if b > a and not piece.isspace():
            out.append((a + len(piece) - len(piece.lstrip()), b))
    return out


def _token_ranges(hf: HFTokenizer, text: str, spans: list[tuple[int, int]]) -> list[range]:
    """The text's token indices (the text alone) that each span covers."""
    offsets = _offsets(hf, text)
    out = []
    for a, b in spans:
        inside = [i for i, (x, y) in enumerate(offsets) if x >= a and y <= b]
        assert inside == list(range(inside[0], inside[-1] + 1))
        out.append(range(inside[0], inside[-1] + 1))
    return out


@pytest.mark.parametrize(("n", "m"), [(64, 16), (100, 0), (37, 36)])
def test_windows_have_n_tokens_and_overlap_m(counter, hf, long_text, n, m) -> None:
    spans = _chunker(counter, n, m).spans(long_text)
    ranges = _token_ranges(hf, long_text, spans)
    total = len(_offsets(hf, long_text))
    assert ranges[0].start == 0 and ranges[-1].stop == total  # every token in some chunk
    assert all(len(r) == n for r in ranges[:-1]) and 0 < len(ranges[-1]) <= n
    for prev, nxt in zip(ranges, ranges[1:], strict=False):
        assert nxt.start == prev.stop - m  # exactly M tokens shared
    for a, b in spans:  # offsets into the original text, no space at either end
        assert 0 <= a < b <= len(long_text)
        assert not long_text[a].isspace() and not long_text[b - 1].isspace()


@pytest.mark.parametrize("task", ["none", "search_document"])  # 2 and 6 tokens over
def test_n_512_shrinks_each_window_until_the_model_sees_at_most_512(counter, long_text,
                                                                     task) -> None:
    chunker = _chunker(counter, 512, 64, task)
    spans = chunker.spans(long_text)
    seen = [chunker.seen_tokens(long_text[a:b]) for a, b in spans]
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
    assert _chunker(counter, 8, 2).spans(text) == [(2, 27)]


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
    assert _chunker(counter, 512, 511).tokens == 512
    spans = _chunker(counter, 1, 0).spans("a b c")
    assert [("a b c")[a:b] for a, b in spans] == ["a", "b", "c"]
