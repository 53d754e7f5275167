"""Tokenization with the bundle's own tokenizer.json: task prefixes, truncation to max_tokens."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from ..export.bundle import Bundle
from .errors import InvalidInput

# The model requires a task prefix joined to the text by one space; "none" = text used as given.
TASK_PREFIXES: dict[str, str] = {
    "none": "",
    "search_query": "search_query: ",
    "search_document": "search_document: ",
    "classification": "classification: ",
    "clustering": "clustering: ",
}
TASKS = tuple(TASK_PREFIXES)


class Tokenizer:
    """XLM-R sentencepiece tokenizer: `<s> pieces </s>`, at most `max_tokens` ids."""

    def __init__(self, path: str | Path, max_tokens: int = 512) -> None:
        self._tok = HFTokenizer.from_file(str(path))
        self._tok.no_truncation()
        self._tok.no_padding()
        self.max_tokens = max_tokens

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> Tokenizer:
        return cls(bundle.file(bundle.manifest["tokenizer"]), bundle.max_tokens)

    @staticmethod
    def prefix(task: str) -> str:
        if task not in TASK_PREFIXES:
            raise InvalidInput("task", f"unknown task {task!r}; expected one of {list(TASKS)}")
        return TASK_PREFIXES[task]

    def encode(self, texts: Sequence[str], task: str, truncate: bool = True) -> list[list[int]]:
        """Token ids per text. Too long: truncated (keeping `</s>`), or InvalidInput naming it."""
        prefix = self.prefix(task)
        encodings = self._tok.encode_batch([prefix + t for t in texts])
        out = []
        for i, enc in enumerate(encodings):
            ids = enc.ids
            if len(ids) > self.max_tokens:
                if not truncate:
                    raise InvalidInput(
                        "inputs", f"is {len(ids)} tokens long, more than the model's "
                        f"{self.max_tokens} (set truncate=true to cut it)", index=i)
                ids = ids[: self.max_tokens - 1] + ids[-1:]
            out.append(ids)
        return out

    def tokenize(self, texts: Sequence[str], task: str,
                 truncate: bool = True) -> list[tuple[list[int], list[str]]]:
        """Ids and their pieces, as the model will see them."""
        ids = self.encode(texts, task, truncate)
        return [(x, [self._tok.id_to_token(i) or "" for i in x]) for x in ids]
