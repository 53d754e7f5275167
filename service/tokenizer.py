"""Tokenization with the bundle's own tokenizer.json: task prefixes, truncation to max_tokens,
and work bounded by what max_tokens can need, whatever the input's size.

Tokenizing a 4 MB string whole costs seconds and hundreds of MB, only to keep its first 512
ids. So a long text is normalized (with the tokenizer's own normalizer) in pieces until the
normalized prefix is surely long enough for max_tokens + MARGIN tokens (no piece of the
vocabulary is longer than `max_piece` characters), and only that prefix is tokenized: the ids
kept after truncation are the ones the whole text would give, because normalization is local to
each grapheme and idempotent, pieces end between graphemes, and the cut lies MARGIN tokens past
the last id kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from ..workers.bundle.format import Bundle
from ..workers.runtime.errors import BundleError
from . import compact_tokenizer
from .compact_tokenizer import CompactTokenizer
from .errors import InvalidInput
from .tasks import Task
from .validation import Input

MARGIN = 64  # tokens tokenized past the truncation point
PIECE_CHARS = 1 << 14  # raw characters normalized at a time when cutting a long text
CUT_SEARCH = 1 << 12  # characters searched past PIECE_CHARS for a grapheme-safe cut
T = TypeVar("T")


def pair(ids: list[int], pieces: list[str]) -> tuple[list[int], list[str]]:
    """`Tokenizer.tokenize`'s default: an input's ids and pieces as they are."""
    return ids, pieces


def _grapheme_cut(text: str, pos: int) -> int:
    """Where to end a piece that should end near `pos`: the first place at or after it between
    two printable ASCII characters, which Unicode never joins into one grapheme (the normalizer
    maps whole graphemes: a combining accent cut from its letter would normalize otherwise).
    Text with no such pair within CUT_SEARCH characters (no spaces, no ASCII) is cut at `pos`."""
    if pos >= len(text):
        return len(text)
    for p in range(max(pos, 1), min(len(text), pos + CUT_SEARCH)):
        if " " <= text[p - 1] <= "~" and " " <= text[p] <= "~":
            return p
    return pos


class Tokenizer:
    """XLM-R sentencepiece tokenizer: `<s> pieces </s>`, at most `max_tokens` ids.

    A Unigram tokenizer.json (XLM-R's) is run by CompactTokenizer: HF's pipeline with a
    compact segmentation, the same ids in ~15 MB instead of ~290. Any other model runs as HF's
    own tokenizer."""

    def __init__(self, path: str | Path, max_tokens: int = 512) -> None:
        try:
            self._tok: CompactTokenizer | HFTokenizer = compact_tokenizer.load(path)
            self.compact = isinstance(self._tok, CompactTokenizer)
            if not self.compact:
                self._tok.no_truncation()
                self._tok.no_padding()
            # no piece is longer than this many characters (bounds characters per token)
            longest = self._tok.longest if self.compact else max(
                map(len, self._tok.get_vocab(with_added_tokens=True)), default=1)
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise BundleError(f"{path}: cannot load the tokenizer: {exc}") from exc
        self.max_tokens = max_tokens
        self.window = (max_tokens + MARGIN) * longest  # normalized characters always enough
        self._normalizer = self._tok.normalizer

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> Tokenizer:
        return cls(bundle.file(bundle.manifest.tokenizer), bundle.manifest.max_tokens)

    def _bounded(self, text: str) -> tuple[str, bool]:
        """`text`, or a normalized prefix of it long enough for every id kept; and whether it
        was cut."""
        if len(text) <= self.window:
            return text, False
        parts, size, start = [], 0, 0
        while start < len(text):
            end = _grapheme_cut(text, start + PIECE_CHARS)
            piece = text[start:end]
            if self._normalizer is not None:
                piece = self._normalizer.normalize_str(piece)
            parts.append(piece)
            size += len(piece)
            start = end
            if size > self.window:
                return "".join(parts), start < len(text)
        return "".join(parts), False

    def _truncate(self, ids: list[int], i: int, cut: bool, truncate: bool) -> list[int]:
        if len(ids) <= self.max_tokens:
            return ids
        if not truncate:
            size = f"at least {len(ids)}" if cut else f"{len(ids)}"
            raise InvalidInput("inputs", f"is {size} tokens long, more than the model's "
                               f"{self.max_tokens} (set truncate=true to cut it)", index=i)
        return ids[: self.max_tokens - 1] + ids[-1:]  # keep </s>

    def encode(self, inputs: Sequence[Input], task: Task,
               truncate: bool = True) -> list[np.ndarray]:
        """int32 ids per input (see `encode_marked`)."""
        return self.encode_marked(inputs, task, truncate)[0]

    def encode_marked(self, inputs: Sequence[Input], task: Task, truncate: bool = True,
                      first: int = 0) -> tuple[list[np.ndarray], list[bool]]:
        """int32 ids per input, and whether each was cut. A text gets the task prefix, `<s>`
        and `</s>`; token ids are used as given (validation refused longer ones). A text longer
        than max_tokens: truncated (keeping its `</s>`), or InvalidInput naming the input
        (`first`: the index of inputs[0] in the caller's request, for a part of one)."""
        texts = [(i, x) for i, x in enumerate(inputs) if isinstance(x, str)]
        bounded = [self._bounded(task.apply(t)) for _, t in texts]
        encodings = self._encode_all([b for b, _ in bounded]) if texts else []
        out: list[np.ndarray | None] = [None] * len(inputs)
        cut_off = [False] * len(inputs)
        for (i, _), (_, cut), enc in zip(texts, bounded, encodings, strict=True):
            out[i] = np.asarray(self._truncate(enc, first + i, cut, truncate),
                                dtype=np.int32)
            cut_off[i] = cut or len(enc) > self.max_tokens
        for i, x in enumerate(inputs):
            if out[i] is None:  # token ids: validated, at most max_tokens and never cut
                out[i] = np.asarray(x, dtype=np.int32)
        return out, cut_off  # type: ignore[return-value]

    def _encode_all(self, texts: list[str]) -> list[list[int]]:
        if self.compact:
            return [self._tok.encode(t) for t in texts]
        return [e.ids for e in self._tok.encode_batch(texts)]

    def full_ids(self, text: str) -> list[int]:
        """The ids of the whole text, without any bound or truncation."""
        return self._encode_all([text])[0]

    def tokenize(self, inputs: Sequence[Input], task: Task, truncate: bool = True,
                 each: Callable[[list[int], list[str]], T] = pair, first: int = 0) -> list[T]:
        """Ids and their pieces, as the model will see them, given input by input to `each`
        (which may copy them into a response: 256 inputs' lists of ids and pieces, ~130k
        Python objects, then never exist at once). `first` as in `encode_marked`."""
        return [each(ids.tolist(), [self._tok.id_to_token(t) or "" for t in ids.tolist()])
                for ids in self.encode_marked(inputs, task, truncate, first)[0]]

    def job_parts(self, inputs: Sequence[Input], chars: int) -> list[tuple[int, int]]:
        """`inputs` cut into consecutive ranges [start, end) of about `chars` characters of
        work each (a text counts at most the window tokenizing it can need; token ids count
        nothing), each at least one input."""
        parts, start, size = [], 0, 0
        for i, x in enumerate(inputs):
            work = min(len(x), self.window) if isinstance(x, str) else 0
            if i > start and size + work > chars:
                parts.append((start, i))
                start, size = i, 0
            size += work
        parts.append((start, len(inputs)))
        return parts

