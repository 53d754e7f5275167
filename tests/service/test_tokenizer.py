"""The real XLM-R tokenizer: specials, task prefixes, truncation to 512 ids; the ids are HF
tokenizers' own for the same tokenizer.json, which the tests load beside it as the oracle."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

from moe_embed.service.errors import InvalidInput
from moe_embed.service.tasks import TASKS, task_named
from moe_embed.service.tokenizer import PIECE_CHARS, Tokenizer
from moe_embed.workers.bundle.format import Bundle

NONE = task_named("none")


@pytest.fixture(scope="module")
def tok(tiny_bundle) -> Tokenizer:
    return Tokenizer.from_bundle(Bundle.load(tiny_bundle))


@pytest.fixture(scope="module")
def hf(tiny_bundle) -> HFTokenizer:
    """HF's own tokenizer of the bundle's tokenizer.json: the oracle."""
    return HFTokenizer.from_file(str(Bundle.load(tiny_bundle).file("tokenizer.json")))


def test_specials_and_known_ids(tok):
    (ids,) = tok.encode(["Hello world"], NONE)
    assert ids[0] == 0 and ids[-1] == 2  # <s> ... </s>
    (pairs,) = tok.tokenize(["Hello world"], NONE)
    assert pairs[1] == ["<s>", "▁Hello", "▁world", "</s>"]


@pytest.mark.parametrize("task", [t for t in TASKS if t.name != "none"], ids=lambda t: t.name)
def test_task_prefix_is_joined_by_one_space(tok, task):
    (with_task,) = tok.encode(["embeddings"], task)
    (manual,) = tok.encode([f"{task.name}: embeddings"], NONE)
    assert with_task.tolist() == manual.tolist()


def test_unknown_task():
    with pytest.raises(InvalidInput, match="task"):
        task_named("search")


def test_truncates_to_512_keeping_end_token(tok):
    (ids,) = tok.encode(["word " * 2000], task_named("search_document"))
    assert len(ids) == 512 and ids[0] == 0 and ids[-1] == 2


def test_truncate_false_names_the_input_index(tok):
    with pytest.raises(InvalidInput, match=r"inputs\[1\].*more than the model's 512"):
        tok.encode(["short", "word " * 600], NONE, truncate=False)


def _full(hf: HFTokenizer, text: str) -> list[int]:
    """The whole text tokenized by HF, without any bound or truncation."""
    return hf.encode(text).ids


def test_truncation_keeps_the_head_and_the_task_prefix(tok, hf):
    text = " ".join(f"w{i}" for i in range(3000))  # every word different: head != tail
    (ids,) = tok.encode([text], task_named("search_query"))
    full = _full(hf, "search_query: " + text)
    assert ids.tolist() == full[:511] + [2]
    (prefix,) = tok.encode(["search_query:"], NONE)
    assert ids[:len(prefix) - 1].tolist() == prefix[:-1].tolist()  # <s> search_query :


@pytest.mark.parametrize("kind", ["words", "cjk", "spaces", "mixed", "short", "graphemes"])
def test_bounded_tokenizing_keeps_the_ids_of_the_whole_text(tok, hf, multilingual_texts, kind):
    """A long text is tokenized only as far as 512 tokens can need: the ids kept are exactly
    the whole text's, in every script, also where runs of whitespace fold away."""
    rng = np.random.default_rng(0)
    texts = {
        "words": " ".join(rng.permutation(" ".join(multilingual_texts).split()).tolist()) * 40,
        "cjk": "".join(t for t in multilingual_texts if not t.isascii()) * 60,
        "spaces": "a" + " " * 50_000 + " b\n\n\t" * 2000 + "end",
        "mixed": "".join(f"{t}{' ' * int(rng.integers(1, 300))}"
                         for t in multilingual_texts * 80),
        "short": multilingual_texts[0],
        # the tokenizer normalizes whole graphemes (o + circumflex + grave -> "ô"); spaces fold,
        # so this grapheme lies in the kept ids, right where a fixed-size cut would split it
        "graphemes": " " * (PIECE_CHARS - 2) + "o\u0302\u0300" + " word" * 3000,
    }
    text = texts[kind]
    (ids,) = tok.encode([text], NONE)
    full = _full(hf, text)
    expected = full if len(full) <= 512 else full[:511] + full[-1:]
    assert ids.tolist() == expected
    if kind != "short":
        assert len(text) > tok.window  # the bound was in play
