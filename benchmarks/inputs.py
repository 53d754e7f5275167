"""The benchmark inputs, built once so every peer sees exactly the same token ids.

W1 and the short requests of W4/W5 are texts of tests/data/multilingual.json; W2 is random ids
in the XLM-R range; W3 is a corpus of real-tokenizer texts whose lengths spread log-uniformly
over 8..512 tokens, built from the multilingual words so the service (which takes texts) and
the in-process peers (which take ids) compute the same tokens. The retrieval corpus of
benchmarks/quant_table.py (queries searching documents) is made the same way.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_embed.service.tasks import task_named
from moe_embed.service.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "multilingual.json"
BOS, EOS, FIRST_PIECE, LAST_PIECE = 0, 2, 4, 250001  # XLM-R: 0..3 are specials, 250002 real ids
SHORT_MAX_TOKENS = 32


@dataclass
class TextSet:
    """Texts, the task they are embedded with, and their token ids under that task."""

    texts: list[str]
    task: str
    ids: list[list[int]]

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids]

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def batches(self, budget: int) -> list[list[int]]:
        return token_budget_batches(self.ids, budget)


def encode(tok: Tokenizer, texts: list[str], task: str) -> list[list[int]]:
    """Token id lists, as the service's tokenizer makes them."""
    return [x.tolist() for x in tok.encode(texts, task_named(task))]


def multilingual_texts() -> list[str]:
    return json.loads(DATA.read_text())


def w1_set(tok: Tokenizer, limit: int | None = None) -> TextSet:
    """W1: the fixed multilingual set, one text at a time, task search_query."""
    texts = multilingual_texts()[:limit]
    return TextSet(texts, "search_query", encode(tok, texts, "search_query"))


def short_set(tok: Tokenizer) -> TextSet:
    """The short requests of W4/W5: multilingual texts of at most 32 tokens as queries."""
    texts = multilingual_texts()
    ids = encode(tok, texts, "search_query")
    keep = [i for i, x in enumerate(ids) if len(x) <= SHORT_MAX_TOKENS]
    return TextSet([texts[i] for i in keep], "search_query", [ids[i] for i in keep])


def w2_batch(batch: int = 32, length: int = 128, seed: int = 0) -> list[list[int]]:
    """W2: `batch` rows of `<s>` + random piece ids + `</s>`, `length` ids each."""
    rng = np.random.default_rng(seed)
    body = rng.integers(FIRST_PIECE, LAST_PIECE + 1, size=(batch, length - 2))
    return [[BOS, *map(int, row), EOS] for row in body]


def w3_corpus(tok: Tokenizer, n: int = 256, lo: int = 8, hi: int = 512, seed: int = 0) -> TextSet:
    """W3: `n` texts with log-uniform target lengths in [lo, hi] tokens (task none).

    Words are drawn from the multilingual set; XLM-R's pre-tokenizer splits on spaces, so a
    text's length is close to the sum of its words' lengths. The ids are the real encoding
    of the finished text (truncated to the model's 512 like the service does).
    """
    rng = np.random.default_rng(seed)
    words = sorted({w for t in multilingual_texts() for w in t.split()})
    word_len = [len(x) - 2 for x in encode(tok, words, "none")]
    targets = np.exp(rng.uniform(math.log(lo), math.log(hi), size=n)).round().astype(int)
    texts = []
    for target in targets:
        parts, count = [], 2
        while count < target:
            j = int(rng.integers(len(words)))
            parts.append(words[j])
            count += word_len[j]
        texts.append(" ".join(parts))
    return TextSet(texts, "none", encode(tok, texts, "none"))


def token_budget_batches(ids: list[list[int]], budget: int) -> list[list[int]]:
    """Indices of `ids` sorted by length and cut into batches of <= `budget` padded tokens."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and len(ids[i]) * (len(current) + 1) > budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def retrieval_corpus(tok: Tokenizer, queries: int = 200, docs: int = 2000, lo: int = 12,
                     hi: int = 64, seed: int = 0) -> tuple[TextSet, TextSet]:
    """A deterministic search corpus from the multilingual words: (queries, documents).

    Each document has a topic (one multilingual text): about 70% of its words come from that
    text, the rest from all texts, until it reaches a log-uniform target length in [lo, hi]
    tokens; so documents of a topic are near each other and a query has real neighbours. A
    query is a span of 2-8 consecutive words of a distinct random document. Tasks:
    search_query and search_document (their prefixes are part of the ids).
    """
    rng = np.random.default_rng(seed)
    texts = multilingual_texts()
    topics = [t.split() for t in texts]
    words = sorted({w for t in topics for w in t})
    lengths = dict(zip(words, (len(x) - 2 for x in encode(tok, words, "none")), strict=True))
    targets = np.exp(rng.uniform(math.log(lo), math.log(hi), size=docs)).round().astype(int)
    doc_words = []
    for target in targets:
        topic = topics[int(rng.integers(len(topics)))]
        parts, count = [], 8  # <s>, </s> and the task prefix
        while count < target:
            pool = topic if rng.random() < 0.7 else words
            w = pool[int(rng.integers(len(pool)))]
            parts.append(w)
            count += lengths[w]
        doc_words.append(parts)
    query_texts = []
    for d in rng.choice(docs, size=queries, replace=False):
        parts = doc_words[int(d)]
        n = int(rng.integers(2, 9))
        start = int(rng.integers(max(1, len(parts) - n + 1)))
        query_texts.append(" ".join(parts[start:start + n]))
    doc_texts = [" ".join(p) for p in doc_words]
    return (TextSet(query_texts, "search_query", encode(tok, query_texts, "search_query")),
            TextSet(doc_texts, "search_document", encode(tok, doc_texts, "search_document")))
