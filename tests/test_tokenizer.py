"""The real XLM-R tokenizer: specials, task prefixes, truncation to 512 ids."""

from __future__ import annotations

import pytest

from moe_embed.export.bundle import Bundle
from moe_embed.workers.runtime.errors import InvalidInput
from moe_embed.workers.runtime.tasks import TASKS, task_named
from moe_embed.workers.runtime.tokenizer import Tokenizer

NONE = task_named("none")


@pytest.fixture(scope="module")
def tok(tiny_bundle) -> Tokenizer:
    return Tokenizer.from_bundle(Bundle.load(tiny_bundle))


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
