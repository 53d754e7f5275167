"""Pieces to Results through any backend: length-sorted calls, one bad input isolated.

Pieces are sorted by length and cut into calls of at most `max_inputs` texts and about
CALL_CHARS characters, so each batch the model runs has little padding (as W3 and
sentence-transformers sort). fp32 vectors do not depend on the batch a text shares (measured:
bit-identical alone and in any batch), so the order of calls never changes the output. If a
backend refuses one input of a call (InvalidInput naming its index), that piece gets the error
and the rest of the call is sent again: one bad row never fails the job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from moe_embed.service.errors import InvalidInput

from .pieces import Piece, Result

CALL_CHARS = 24_000  # ~6k tokens of typical text per call: a full batch for one worker


@dataclass(frozen=True)
class Embedded:
    """A backend's answer to one call, in the call's order."""

    vectors: Sequence[np.ndarray]
    tokens: Sequence[int]
    truncated: Sequence[bool]  # as the model reports it: cut to its max tokens


Call = Callable[[list[str]], Embedded]
AsyncCall = Callable[[list[str]], Awaitable[Embedded]]


def calls(texts: Sequence[str], max_inputs: int, max_chars: int = CALL_CHARS) -> list[list[int]]:
    """Indices of `texts`, sorted by length, cut into calls."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[list[int]] = []
    current: list[int] = []
    chars = 0
    for i in order:
        if current and (len(current) >= max_inputs or chars + len(texts[i]) > max_chars):
            out.append(current)
            current, chars = [], 0
        current.append(i)
        chars += len(texts[i])
    if current:
        out.append(current)
    return out


def _refused(exc: InvalidInput, pending: list[int]) -> int:
    """The position in `pending` of the input a call refused (or re-raise: not one input)."""
    index = getattr(exc, "index", None)
    if index is None or not 0 <= index < len(pending):
        raise exc
    return index


def _message(exc: InvalidInput) -> str:
    return f"refused by the model: {exc.detail}"


class _Outcomes:
    """Per-text answers as they arrive: (vector, tokens, truncated) or an error message."""

    def __init__(self, n: int) -> None:
        self.items: list[tuple[np.ndarray, int, bool] | str | None] = [None] * n

    def put(self, pending: list[int], got: Embedded) -> None:
        for i, v, t, cut in zip(pending, got.vectors, got.tokens, got.truncated, strict=True):
            self.items[i] = (v, int(t), bool(cut))


def embed_sync(call: Call, texts: Sequence[str], max_inputs: int) -> list:
    out = _Outcomes(len(texts))
    for pending in calls(texts, max_inputs):
        while pending:
            try:
                out.put(pending, call([texts[i] for i in pending]))
                pending = []
            except InvalidInput as exc:
                k = _refused(exc, pending)
                out.items[pending.pop(k)] = _message(exc)
    return out.items


async def embed_async(call: AsyncCall, texts: Sequence[str], max_inputs: int,
                      concurrency: int, max_chars: int = CALL_CHARS) -> list:
    out = _Outcomes(len(texts))
    room = asyncio.Semaphore(concurrency)

    async def one(pending: list[int]) -> None:
        async with room:
            while pending:
                try:
                    out.put(pending, await call([texts[i] for i in pending]))
                    pending = []
                except InvalidInput as exc:
                    k = _refused(exc, pending)
                    out.items[pending.pop(k)] = _message(exc)

    tasks = [asyncio.ensure_future(one(p)) for p in calls(texts, max_inputs, max_chars)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
    return out.items


def results(pieces: Sequence[Piece], todo: Sequence[int], outcomes: Sequence) -> list[Result]:
    """A Result per piece: the record's error, the backend's refusal, or its vector."""
    out = [Result(error=p.record.error) for p in pieces]
    for i, got in zip(todo, outcomes, strict=True):
        if isinstance(got, str):
            out[i] = Result(error=got)
        else:
            vector, tokens, truncated = got
            out[i] = Result(vector, tokens, truncated)
    return out


def texts_of(pieces: Sequence[Piece]) -> tuple[list[int], list[str]]:
    """The indices and texts of the pieces that have something to embed."""
    todo = [i for i, p in enumerate(pieces) if p.text is not None]
    return todo, [pieces[i].text for i in todo]  # type: ignore[misc]
