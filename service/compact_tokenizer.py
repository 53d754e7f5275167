"""HF's tokenizer pipeline with its Unigram model swapped for a compact one (unigram.py).

The frontend's memory was mostly HF's Unigram trie (~255 MB for XLM-R). Here HF still does all
it did but the segmentation: added tokens (`<mask>`, `<s>` in the text), the normalizer, the
pre-tokenizer, the post-processor's `<s>` and `</s>`. Its model becomes a WordLevel that knows
only the added tokens (HF takes their ids from the model's vocabulary) and turns every
pre-token (word, marked so that it is none of them) into one placeholder id; a custom
pre-tokenizer, last in the chain, segments each word with UnigramVocab and records its ids in
call order; `encode` then puts each word's ids where its placeholder stands. Calls happen in
the encoding thread, so the records are per thread.

Only a plain Unigram model is taken (no byte fallback, an unknown id); anything else stays
HF's own tokenizer (`load` returns it as HF loaded it).
"""

from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys
import threading
from pathlib import Path

from tokenizers import NormalizedString, PreTokenizedString, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.normalizers import Normalizer

from .unigram import UnigramVocab

WORD = 0xFFFFFFFF  # the placeholder id of a word (u32 max: no added token has it)
MARK = "\ue000"  # put before every word, so that no word is an added token's string
WORD_TOKEN = MARK + "moe-embed-word"  # the placeholder's string (never looked up)
UNIGRAM_KEYS = {"type", "unk_id", "vocab", "byte_fallback"}


def _release_freed_memory() -> None:
    """Hand the pages of HF's freed trie back to the kernel (glibc keeps them otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory stays mapped, nothing breaks
        pass


class _Segmenter:
    """The custom pre-tokenizer: each word stays whole (one placeholder), its ids recorded."""

    def __init__(self, vocab: UnigramVocab) -> None:
        self.vocab = vocab
        self.local = threading.local()

    def _word(self, _: int, word: NormalizedString) -> list[NormalizedString]:
        text = str(word)
        if not text:
            return []
        self.local.words.append(self.vocab.segment(text))
        word.prepend(MARK)
        return [word]

    def pre_tokenize(self, pretok: PreTokenizedString) -> None:
        pretok.split(self._word)


class CompactTokenizer:
    """`encode(text)` -> ids, as HF's tokenizer of the same tokenizer.json gives them."""

    def __init__(self, spec: dict) -> None:
        model = spec["model"]
        self.vocab = UnigramVocab([(p, s) for p, s in model["vocab"]], model["unk_id"])
        added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        if any(a.startswith(MARK) for a in added) or WORD in added.values():
            raise ValueError("an added token collides with the word placeholder")
        spec = {**spec, "model": {"type": "WordLevel", "vocab": {**added, WORD_TOKEN: WORD},
                                  "unk_token": WORD_TOKEN}}
        self._tok = HFTokenizer.from_str(json.dumps(spec))
        self._tok.no_truncation()
        self._tok.no_padding()
        self._segmenter = _Segmenter(self.vocab)
        custom = pre_tokenizers.PreTokenizer.custom(self._segmenter)
        first = self._tok.pre_tokenizer
        self._tok.pre_tokenizer = custom if first is None else pre_tokenizers.Sequence(
            [first, custom])
        self._added = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}
        if self._added != {i: a for a, i in added.items()}:
            raise ValueError("the added tokens did not keep their ids")
        self.longest = max([self.vocab.longest, *map(len, self._added.values())])

    @property
    def normalizer(self) -> Normalizer | None:
        return self._tok.normalizer

    def encode(self, text: str) -> list[int]:
        local = self._segmenter.local
        local.words = []
        try:
            ids = self._tok.encode(text).ids
            words = iter(local.words)
            out: list[int] = []
            for i in ids:
                if i == WORD:
                    out.extend(next(words))
                else:
                    out.append(i)
            if next(words, None) is not None:
                raise RuntimeError("a segmented word has no placeholder in the encoding")
            return out
        finally:
            local.words = []

    def id_to_token(self, token_id: int) -> str | None:
        return self._added.get(token_id) or self.vocab.piece(token_id)


def canonical(path: str | Path) -> str:
    """The tokenizer.json as HF reads and writes it back (`to_str`): every value, the float64
    scores included, is then the one HF would use, whatever the file's spelling. Made in a
    child process: HF's parse of a 250k-piece vocabulary holds the GIL for over a second (five
    on a busy machine), which would stall the frontend's event loop (health included) while
    it loads, and builds a ~255 MB trie the frontend would only free again."""
    done = subprocess.run([sys.executable, "-c", _CANONICAL, str(path)], capture_output=True,
                          check=False, timeout=600)
    if done.returncode != 0:
        raise ValueError(f"the tokenizer {path} cannot be read: "
                         f"{done.stderr.decode(errors='replace').strip()[-500:]}")
    return done.stdout.decode()


_CANONICAL = ("import sys; from tokenizers import Tokenizer; "
              "sys.stdout.write(Tokenizer.from_file(sys.argv[1]).to_str())")


def load(path: str | Path) -> CompactTokenizer | HFTokenizer:
    """The compact tokenizer of a tokenizer.json, or HF's own where its model is not a plain
    Unigram; both from the file's `canonical` text."""
    text = canonical(path)
    spec = json.loads(text)
    model = spec.get("model") or {}
    if model.get("type") != "Unigram" or model.get("byte_fallback") \
            or not set(model) <= UNIGRAM_KEYS or model.get("unk_id") is None:
        return HFTokenizer.from_str(text)
    del text
    tok = CompactTokenizer(spec)
    del spec
    _release_freed_memory()
    return tok
