"""Long documents cut into overlapping token windows, each embedded as its own text span.

The text alone (no task prefix, no specials) is tokenized with the bundle's tokenizer.json,
whose offsets map each token back to characters of the original text. Windows of N tokens
start every N - M tokens; a window's span is the characters of its tokens, less whitespace
at either end.
The span TEXT is what gets embedded (so the in-process and remote paths embed the same
thing), and it must fit the model as it will be seen: task prefix + span + `<s>` `</s>`
re-tokenized by the service's own tokenizer is at most max_tokens, or the window is shrunk
by the excess until it fits. The next window starts M tokens before the end of the last one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from moe_embed.service.tasks import Task
from moe_embed.service.tokenizer import Tokenizer
from moe_embed.workers.bundle.format import Bundle


def check_chunking(tokens: int, overlap: int, max_tokens: int) -> None:
    """ValueError naming the option if the window or its overlap is impossible."""
    if not 1 <= tokens <= max_tokens:
        raise ValueError(f"chunk_tokens (--chunk-tokens) is {tokens}; it must be within "
                         f"1..{max_tokens} (the model's max tokens)")
    if not 0 <= overlap < tokens:
        raise ValueError(f"chunk_overlap (--chunk-overlap) is {overlap}; it must be within "
                         f"0..{tokens - 1} (less than --chunk-tokens {tokens})")


@dataclass(frozen=True)
class Window:
    first: int  # token index (the text alone) of the window's first token
    end: int  # one past its last
    char_start: int
    char_end: int


class Chunker:
    """`spans(text)` -> [(char_start, char_end)], one per window, in order."""

    def __init__(self, tokenizer_json: str | Path, counter: Tokenizer, task: Task,
                 tokens: int, overlap: int) -> None:
        check_chunking(tokens, overlap, counter.max_tokens)
        self._offsets = HFTokenizer.from_file(str(tokenizer_json))
        self._offsets.no_truncation()
        self._offsets.no_padding()
        self.counter = counter
        self.task = task
        self.tokens = tokens
        self.overlap = overlap

    def seen_tokens(self, span: str) -> int:
        """How many ids the model sees for this span (prefix and specials included)."""
        return len(self.counter.full_ids(self.task.apply(span)))

    @staticmethod
    def _span(text: str, offsets: list[tuple[int, int]], s: int, e: int) -> tuple[int, int]:
        """Characters of tokens s..e-1, without whitespace at either end."""
        a, b = offsets[s][0], offsets[e - 1][1]
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        return a, b

    def windows(self, text: str) -> list[Window]:
        """The windows of `text` in order (token indices of the text alone, and their span).
        A window of nothing but whitespace tokens (XLM-R's lone "▁") is left out."""
        offsets = [(a, b) for a, b in self._offsets.encode(text, add_special_tokens=False).offsets
                   if b > a]
        n = len(offsets)
        out: list[Window] = []
        s = 0
        limit = self.counter.max_tokens
        while s < n:
            e = min(s + self.tokens, n)
            a, b = self._span(text, offsets, s, e)
            while e > s + 1 and (excess := self.seen_tokens(text[a:b]) - limit) > 0:
                e = max(s + 1, e - excess)
                a, b = self._span(text, offsets, s, e)
            if b > a:
                out.append(Window(s, e, a, b))
            if e >= n:
                break
            s = max(s + 1, e - self.overlap)
        return out or [Window(0, n, 0, len(text))]

    def spans(self, text: str) -> list[tuple[int, int]]:
        """(char_start, char_end) of each window."""
        return [(w.char_start, w.char_end) for w in self.windows(text)]


def chunker_for(bundle: Bundle, counter: Tokenizer, task: Task, tokens: int,
                overlap: int) -> Chunker | None:
    """The bundle's chunker for these options; None when chunking is off (both 0)."""
    if not tokens and not overlap:
        return None
    return Chunker(bundle.file(bundle.manifest.tokenizer), counter, task, tokens, overlap)
