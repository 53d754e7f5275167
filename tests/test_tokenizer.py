"""The real XLM-R tokenizer: specials, task prefixes, truncation to 512 ids."""

from __future__ import annotations

import pytest

from moe_embed.export.bundle import Bundle
from moe_embed.workers.errors import InvalidInput
from moe_embed.workers.tokenizer import TASK_PREFIXES, Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_bundle) -> Tokenizer:
    return Tokenizer.from_bundle(Bundle.load(tiny_bundle))


def test_specials_and_known_ids(tok):
    (ids,) = tok.encode(["Hello world"], "none")
    assert ids[0] == 0 and ids[-1] == 2  # <s> ... </s>
    (pairs,) = tok.tokenize(["Hello world"], "none")
    assert pairs[1] == ["<s>", "▁Hello", "▁world", "</s>"]


@pytest.mark.parametrize("task", [t for t in TASK_PREFIXES if t != "none"])
def test_task_prefix_is_joined_by_one_space(tok, task):
    (with_task,) = tok.encode(["embeddings"], task)
    (manual,) = tok.encode([f"{task}: embeddings"], "none")
    assert with_task == manual


def test_unknown_task(tok):
    with pytest.raises(InvalidInput, match="task"):
        tok.encode(["x"], "search")


def test_truncates_to_512_keeping_end_token(tok):
    (ids,) = tok.encode(["word " * 2000], "search_document")
    assert len(ids) == 512 and ids[0] == 0 and ids[-1] == 2


def test_truncate_false_names_the_input_index(tok):
    with pytest.raises(InvalidInput, match=r"inputs\[1\].*more than the model's 512"):
        tok.encode(["short", "word " * 600], "none", truncate=False)
