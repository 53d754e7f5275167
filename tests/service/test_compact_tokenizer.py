"""The compact tokenizer gives HF tokenizers' ids, id for id, in a fraction of its memory.

The oracle is HF's own tokenizer of the same tokenizer.json: the real XLM-R one on texts of
many scripts, added tokens inside the text, runs of whitespace and characters no piece covers;
and small made-up Unigram vocabularies whose scores tie on purpose, where only the same
tie-breaking as HF's gives the same ids.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers

from moe_embed.service import compact_tokenizer
from moe_embed.service.compact_tokenizer import CompactTokenizer
from moe_embed.service.tokenizer import Tokenizer

ADDED = ["<mask>", "<s>", "</s>", "<unk>", "<pad>"]


@pytest.fixture(scope="module")
def xlmr_path(tiny_bundle: Path) -> Path:
    return tiny_bundle / "tokenizer.json"


@pytest.fixture(scope="module")
def hf(xlmr_path: Path) -> HFTokenizer:
    return HFTokenizer.from_file(str(xlmr_path))


@pytest.fixture(scope="module")
def compact(xlmr_path: Path) -> CompactTokenizer:
    tok = compact_tokenizer.load(xlmr_path)
    assert isinstance(tok, CompactTokenizer)
    return tok


def _scripts() -> list[str]:
    """Characters of many scripts, combining marks, emoji with joiners and modifiers, controls,
    odd spaces, and unassigned or private-use code points (no piece covers them)."""
    ranges = [(0x20, 0x7F), (0xA0, 0x250), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
              (0x900, 0x97F), (0xE00, 0xE7F), (0x1100, 0x1120), (0x3040, 0x30FF),
              (0x4E00, 0x4F80), (0xAC00, 0xAC80), (0xFF00, 0xFF60)]
    chars = [chr(c) for a, b in ranges for c in range(a, b)]
    return chars + [chr(c) for c in (0x0, 0x9, 0xA, 0xD, 0x200B, 0x200D, 0xFE0F, 0x1F600,
                                     0x1F44D, 0x1F3FB, 0x300, 0x301, 0x302, 0x3000, 0xFEFF,
                                     0xE123, 0x10FFFD, 0x2581)]


def _corpus(multilingual: list[str], n_random: int, n_words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    chars = _scripts()
    extra = [*ADDED, "  ", "\n\n", "\t", "▁", " <mask> ", "<s><s>"]
    out = list(multilingual)
    for _ in range(n_random):
        out.append("".join(rng.choice(chars) if rng.random() > 0.06 else rng.choice(extra)
                           for _ in range(rng.randint(1, 120))))
    words = " ".join(multilingual).split()
    for _ in range(n_words):
        sep = rng.choice([" ", "  ", "", "\u3000", " \n "])
        out.append(sep.join(rng.choice(words) for _ in range(rng.randint(1, 80))))
    out += ["", " ", "▁", "\x00" * 40, "☃" * 300, "嵌入" * 400, "a" * 3000, "<unk>☃☃<unk>"]
    return out


def test_same_ids_as_hf_on_many_scripts_and_added_tokens(compact, hf, multilingual_texts):
    corpus = _corpus(multilingual_texts, n_random=3000, n_words=1500, seed=1)
    expected = [e.ids for e in hf.encode_batch(corpus)]
    wrong = [t for t, e in zip(corpus, expected, strict=True) if compact.encode(t) != e]
    assert not wrong, f"{len(wrong)} of {len(corpus)} texts differ, e.g. {wrong[0]!r:.120}"
    assert sum(map(len, expected)) > 100_000  # a real amount of text was compared


def test_the_longest_xlmr_pieces_and_unknown_characters_as_hf(compact, hf, xlmr_path):
    """Texts that need XLM-R's longest pieces (16 characters: alone, several in a row, glued
    inside a longer word) with characters no piece covers around them: the same ids as HF.
    A segmentation that looks one character less far, or fuses unknowns otherwise, differs.
    (The unknown candidate's score cannot show here: every character of every XLM-R piece is
    also a piece, so an unknown never competes with a piece; the made-up vocabularies below
    check it.)"""
    vocab = json.loads(xlmr_path.read_text())["model"]["vocab"]
    longest = max(len(p) for p, _ in vocab)
    singles = {p for p, _ in vocab if len(p) == 1}
    assert {c for p, _ in vocab for c in p} <= singles
    words = [p.replace("▁", " ") for p, _ in vocab if len(p) == longest]
    rng = random.Random(3)
    unknown = ["\ue123", "\U0010fffd", "\u0fff", "\ue123\U0010fffd"]
    texts = list(words)
    for _ in range(300):
        texts.append("".join(rng.sample(words, 4)))
        texts.append("x" + rng.choice(words).strip() + "q")
        texts.append(rng.choice(unknown) + rng.choice(words) + rng.choice(unknown) * 2
                     + rng.choice(words).strip() + rng.choice(unknown))
    expected = [e.ids for e in hf.encode_batch(texts)]
    wrong = [t for t, e in zip(texts, expected, strict=True) if compact.encode(t) != e]
    assert not wrong, f"{len(wrong)} of {len(texts)} texts differ, e.g. {wrong[0]!r}"
    long_ids = {i for i, (p, _) in enumerate(vocab) if len(p) == longest}
    unk = hf.token_to_id("<unk>")
    # every text but the glued ones takes a longest piece (those start with the word mark)
    assert sum(any(i in long_ids for i in e) for e in expected) >= len(words) + 2 * 300
    assert sum(unk in e for e in expected) >= 300  # unknowns were segmented too


def test_pieces_are_hfs_for_every_id(compact, hf):
    for i in range(0, hf.get_vocab_size(), 7):
        assert compact.id_to_token(i) == hf.id_to_token(i), i
    assert compact.id_to_token(250001) == "<mask>"


def test_encoding_from_many_threads_at_once(compact, hf, multilingual_texts):
    """Each word's ids are recorded per thread: concurrent encodes never mix them (the GIL is
    made to switch threads every few microseconds, in the middle of encodes)."""
    corpus = _corpus(multilingual_texts, n_random=300, n_words=300, seed=2)
    expected = [e.ids for e in hf.encode_batch(corpus)]
    failures: list[str] = []

    def run(offset: int) -> None:
        for k in range(len(corpus)):
            i = (k + offset * 97) % len(corpus)
            try:
                if compact.encode(corpus[i]) != expected[i]:
                    failures.append(corpus[i])
            except Exception as exc:  # a thread's exception would not fail the test
                failures.append(f"{corpus[i]!r}: {exc!r}")

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not failures


def _made_up(tmp: Path, name: str, pieces: list[tuple[str, float]], *, byte_fallback=False,
             normalizer=None, added=(), pre_tokenizer=None) -> Path:
    """A Unigram tokenizer.json of our own pieces, written by HF itself."""
    tok = HFTokenizer(models.Unigram(pieces, 0, byte_fallback))
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.Metaspace()
    if normalizer is not None:
        tok.normalizer = normalizer
    if added:
        tok.add_special_tokens(list(added))
    path = tmp / f"{name}.json"
    tok.save(str(path))
    return path


def _random_pieces(rng: random.Random, alphabet: str, n: int) -> list[tuple[str, float]]:
    """Pieces whose scores come from four values only, so that many paths tie exactly."""
    pieces = {"<unk>": 0.0}
    for c in alphabet[:-2]:  # the last two characters have no piece: unknown, fused
        pieces.setdefault(c, rng.choice([-1.0, -2.0]))
    while len(pieces) < n:
        word = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 5)))
        pieces.setdefault(rng.choice(["", "▁"]) + word, rng.choice([-1.0, -2.0, -3.0, -4.0]))
    pieces.setdefault("▁", -1.0)
    return list(pieces.items())


@pytest.mark.parametrize("seed", range(6))
def test_ties_break_as_hfs_do(tmp_path, seed):
    """Equal-scoring paths, unknown runs and the `<unk>` piece itself: any other tie rule
    (>= instead of >, longest first, unknown runs not fused) gives other ids somewhere here."""
    rng = random.Random(seed)
    alphabet = "abcdexy"
    path = _made_up(tmp_path, f"ties{seed}", _random_pieces(rng, alphabet, 60))
    hf, tok = HFTokenizer.from_file(str(path)), compact_tokenizer.load(path)
    assert isinstance(tok, CompactTokenizer)
    texts = ["".join(rng.choice(alphabet + " ") for _ in range(rng.randint(1, 40)))
             for _ in range(1500)] + ["<unk>xy<unk>", "xyxy a <unk>", "yx<unk>x"]
    wrong = [t for t in texts if tok.encode(t) != hf.encode(t).ids]
    assert not wrong, f"{len(wrong)} of {len(texts)} differ, e.g. {wrong[0]!r}"


def test_a_repeated_piece_takes_its_last_id_and_score(tmp_path):
    pieces = [("<unk>", 0.0), ("▁", -1.0), ("a", -1.0), ("b", -1.0), ("ab", -9.0),
              ("ab", -0.5)]
    path = _made_up(tmp_path, "repeated", pieces)
    hf, tok = HFTokenizer.from_file(str(path)), compact_tokenizer.load(path)
    assert tok.encode("ab") == hf.encode("ab").ids == [1, 5]


def test_a_word_that_normalizes_into_an_added_token_is_still_segmented(tmp_path):
    """An added token is matched in the raw text; a normalizer can still make its string into
    a whole word (no "▁" before it with this pre-tokenizer), which then must be segmented, not
    taken for the added token."""
    pieces = [("<unk>", 0.0), ("<", -3.0), ("x", -3.0), (">", -3.0), ("<x>", -1.0), ("q", -2.0)]
    path = _made_up(tmp_path, "normalized-added", pieces, added=["<x>"],
                    normalizer=normalizers.Replace("Q", "<x>"),
                    pre_tokenizer=pre_tokenizers.WhitespaceSplit())
    hf, tok = HFTokenizer.from_file(str(path)), compact_tokenizer.load(path)
    for text in ["Q", "qQ <x> Q", "<x>Q", "Q Q"]:
        assert tok.encode(text) == hf.encode(text).ids, text


@pytest.mark.parametrize("kind", ["byte_fallback", "bpe"])
def test_other_models_run_as_hfs_own_tokenizer(tmp_path, kind):
    if kind == "byte_fallback":
        path = _made_up(tmp_path, kind, [("<unk>", 0.0), ("▁", -1.0), ("a", -1.0)],
                        byte_fallback=True)
    else:
        bpe = HFTokenizer(models.BPE({"<unk>": 0, "a": 1, "b": 2, "ab": 3}, [("a", "b")],
                                     unk_token="<unk>"))
        path = tmp_path / "bpe.json"
        bpe.save(str(path))
    assert not isinstance(compact_tokenizer.load(path), CompactTokenizer)
    tok = Tokenizer(path)
    assert not tok.compact
    assert tok.full_ids("abab ba") == HFTokenizer.from_file(str(path)).encode("abab ba").ids


_RSS_PROBE = """
import gc, json, sys
from moe_embed.testing import procfs
def rss_mb():
    gc.collect()
    return procfs.rss_mb("self")
from moe_embed.service.tokenizer import Tokenizer
from tokenizers import Tokenizer as HFTokenizer
before = rss_mb()
tok = HFTokenizer.from_file(sys.argv[2]) if sys.argv[1] == "hf" else Tokenizer(sys.argv[2])
tok.encode("search_query: warm it up") if sys.argv[1] == "hf" else tok.full_ids("warm it up")
print(json.dumps(rss_mb() - before))
"""


def test_the_compact_tokenizer_holds_a_small_fraction_of_hfs_memory(xlmr_path):
    """Each measured in a fresh process: resident memory the tokenizer added once loaded."""
    held = {kind: json.loads(subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, kind, str(xlmr_path)], capture_output=True,
        text=True, check=True).stdout) for kind in ("hf", "compact")}
    assert held["hf"] > 150, held  # HF's trie of hash maps: the cost this module removes
    assert held["compact"] < 40, held


_PEAK_PROBE = """
import json, re, sys
def peak_mb():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
from moe_embed.service.tokenizer import Tokenizer
from tokenizers import Tokenizer as HFTokenizer
before = peak_mb()
HFTokenizer.from_file(sys.argv[2]) if sys.argv[1] == "hf" else Tokenizer(sys.argv[2])
print(json.dumps(peak_mb() - before))
"""


def test_loading_never_parses_hfs_whole_model_in_the_frontend(xlmr_path):
    """HF's parse of the 250k-piece model (its ~255 MB trie, and over a second of the GIL: the
    event loop and health stall meanwhile) happens in a child process: the loading process's
    peak grows by what the compact tokenizer needs, a fraction of HF's."""
    peak = {kind: json.loads(subprocess.run(
        [sys.executable, "-c", _PEAK_PROBE, kind, str(xlmr_path)], capture_output=True,
        text=True, check=True).stdout) for kind in ("hf", "compact")}
    assert peak["hf"] > 200, peak  # what an in-process parse costs
    assert peak["compact"] < peak["hf"] / 2, peak


def test_an_unreadable_tokenizer_is_a_clear_error(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": {"type": "Unigram", "vocab": [["a", -1.0]]')  # cut short
    with pytest.raises(ValueError, match="tokenizer.json cannot be read"):
        compact_tokenizer.load(path)
