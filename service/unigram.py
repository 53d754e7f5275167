"""A Unigram vocabulary that segments a word exactly as HF tokenizers does, in ~10 MB.

Why: HF's Unigram model keeps XLM-R's 250k pieces in a trie of hash maps (~255 MB of the
frontend's ~380); marisa-trie holds the same keys in a few MB. Only the segmentation moves
here: normalizer, added tokens, pre-tokenizer and post-processor stay HF's own (see
compact_tokenizer.py), so this file is a port of one function, tokenizers'
`Unigram::encode_optimized`, that keeps each of its choices:

- char positions left to right; at each, every vocabulary piece that starts there; a
  candidate replaces the best path ending where it ends only if there is none yet or it
  scores strictly higher (float64 sums: of equal paths, the one whose last piece starts
  first is kept);
- a position where no one-character piece starts also gets an unknown candidate of
  (lowest piece score - 10);
- walking back, consecutive unknown nodes (and a matched piece whose id is the unknown id)
  fuse into one token, which is the id of the fused string if it is a piece, else unknown.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import marisa_trie
import numpy as np

UNK_PENALTY = 10.0  # tokenizers' K_UNK_PENALTY
CACHE_WORDS = 10_000  # HF's Unigram caches as many words (speed only, never the result)
CACHE_CHARS = 64  # longer words are not cached


class UnigramVocab:
    """Pieces with their scores and ids; `segment(word)` -> ids."""

    def __init__(self, pieces: Sequence[tuple[str, float]], unk_id: int) -> None:
        if not 0 <= unk_id < len(pieces):
            raise ValueError(f"unk_id {unk_id} is outside the vocabulary of {len(pieces)}")
        strings = [p for p, _ in pieces]
        self._trie = marisa_trie.Trie(strings)
        key_of = np.fromiter(map(self._trie.key_id, strings), np.int32, len(pieces))
        # HF maps a repeated piece to its last id, and uses that id's score
        ids = np.full(len(self._trie), -1, np.int32)
        np.maximum.at(ids, key_of, np.arange(len(pieces), dtype=np.int32))
        scores = np.fromiter((s for _, s in pieces), np.float64, len(pieces))
        # array.array, not numpy, for the per-character loop: plain ints and floats come out
        self._ids = array("i", ids.tobytes())  # trie key -> vocabulary id
        self._scores = array("d", scores[ids].tobytes())  # trie key -> score
        self._key_of = array("i", key_of.tobytes())  # vocabulary id -> trie key
        self.unk_id = unk_id
        self.unk_score = float(scores.min()) - UNK_PENALTY
        self.longest = max(map(len, strings), default=1)  # characters
        self._cache: dict[str, list[int]] = {}

    def piece(self, token_id: int) -> str | None:
        """The piece of a vocabulary id (None outside the vocabulary)."""
        if not 0 <= token_id < len(self._key_of):
            return None
        return self._trie.restore_key(self._key_of[token_id])

    def segment(self, word: str) -> list[int]:
        """The ids HF's Unigram gives `word` (one pre-token, already normalized)."""
        if not word:
            return []
        hit = self._cache.get(word)
        if hit is not None:
            return hit
        ids = self._best_path(word)
        if len(word) <= CACHE_CHARS:
            if len(self._cache) >= CACHE_WORDS:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def _best_path(self, s: str) -> list[int]:
        n = len(s)
        score = [0.0] * (n + 1)  # best path score ending at each position
        start = [-1] * (n + 1)  # where its last token starts (-1: no path yet)
        token = [0] * (n + 1)  # its last token's id, -1 for an unknown candidate
        prefixes, ids, scores = self._trie.iter_prefixes_with_ids, self._ids, self._scores
        unk_score, longest = self.unk_score, self.longest
        for i in range(n):
            here = score[i]
            single = False
            for piece, k in prefixes(s[i:i + longest]):
                j = i + len(piece)
                candidate = scores[k] + here
                if start[j] < 0 or candidate > score[j]:
                    score[j], start[j], token[j] = candidate, i, ids[k]
                single = single or j == i + 1
            if not single:
                j = i + 1
                candidate = unk_score + here
                if start[j] < 0 or candidate > score[j]:
                    score[j], start[j], token[j] = candidate, i, -1
        out: list[int] = []
        end, fused_end = n, -1
        while end > 0:
            begin = start[end]
            if token[end] < 0 or token[end] == self.unk_id:
                if fused_end < 0:
                    fused_end = end
            else:
                if fused_end >= 0:
                    out.append(self._fused(s[end:fused_end]))
                    fused_end = -1
                out.append(token[end])
            end = begin
        if fused_end >= 0:
            out.append(self._fused(s[:fused_end]))
        out.reverse()
        return out

    def _fused(self, text: str) -> int:
        k = self._trie.get(text)
        return self.unk_id if k is None else self._ids[k]
