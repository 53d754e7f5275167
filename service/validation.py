"""The one request validator, shared by the engine (before anything is queued) and the
in-process API: inputs, task, Matryoshka dimensions. Nothing downstream checks again: the
tokenizer and the workers trust a `ValidRequest` (the tokenizer alone still refuses a text too
long with truncate=false, the one fact only tokenizing reveals).

An input is a text or, for callers that tokenize themselves, a list of token ids (used as
given: no task prefix, no special tokens added). Every error names the field and the index in
the caller's request. Free of torch and ONNX Runtime: the frontend imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..workers.bundle.format import Bundle
from .errors import InvalidInput
from .tasks import Task, task_named

Input = str | Sequence[int]


@dataclass(frozen=True)
class Limits:
    """What a request may ask of one bundle (and, in the service, of one server)."""

    dims_min: int
    dims_max: int
    max_tokens: int
    vocab_size: int
    max_inputs: int | None = None  # per request; None = no limit (in-process)

    @classmethod
    def of(cls, bundle: Bundle, max_inputs: int | None = None) -> Limits:
        m = bundle.manifest
        return cls(m.dimensions.min, m.dimensions.max, m.max_tokens, m.config.vocab_size,
                   max_inputs)


@dataclass(frozen=True)
class ValidRequest:
    """A request that passed `validate_embed`: task and dimensions resolved."""

    inputs: Sequence[Input]
    task: Task
    dimensions: int  # resolved: never 0
    truncate: bool
    normalize: bool


def resolve_dimensions(dimensions: int, limits: Limits) -> int:
    """The output size for `dimensions` (0 = full); outside the bundle's range is an error."""
    lo, hi = limits.dims_min, limits.dims_max
    if dimensions == 0:
        return hi
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) \
            or not lo <= dimensions <= hi:
        raise InvalidInput("dimensions", f"{dimensions} is outside the supported range "
                           f"{lo}..{hi} (0 = full {hi})")
    return dimensions


def _check_ids(ids: Sequence[int], index: int, limits: Limits) -> None:
    if len(ids) == 0:
        raise InvalidInput("inputs", "empty list of token ids", index=index)
    # the common case at C speed (a type set, min and max); the loop below names the first
    # bad id. Exactly int: bool, float, str and None are not token ids.
    valid = set(map(type, ids)) == {int} and min(ids) >= 0 and max(ids) < limits.vocab_size
    for t in () if valid else ids:
        if isinstance(t, bool) or not isinstance(t, int):
            shown = repr(t[:40] if isinstance(t, str | bytes) else t)[:40]
            raise InvalidInput("inputs", f"token id {shown} is not an integer", index=index)
        if not 0 <= t < limits.vocab_size:
            raise InvalidInput("inputs", f"token id {t} is outside the vocabulary "
                               f"0..{limits.vocab_size - 1}", index=index)
    if len(ids) > limits.max_tokens:
        raise InvalidInput("inputs", ids_too_long(str(len(ids)), limits.max_tokens), index=index)


def ids_too_long(length: str, max_tokens: int) -> str:
    """Token ids are the caller's own tokenization: over the model's length they are refused,
    whatever `truncate` says (as OpenAI's API does), so a list's cost is bounded by 512 ids."""
    return (f"is {length} token ids long, more than the model's {max_tokens}: token ids are "
            f"used as given, never truncated; send at most {max_tokens} per input")


def check_inputs(inputs: Sequence[Input], limits: Limits) -> None:
    """Every input is a non-blank text or a non-empty list of in-vocabulary token ids."""
    if isinstance(inputs, str | bytes) or len(inputs) == 0:
        raise InvalidInput("inputs", "at least one input is required")
    if limits.max_inputs is not None and len(inputs) > limits.max_inputs:
        raise InvalidInput("inputs", f"{len(inputs)} inputs exceed the limit of "
                           f"{limits.max_inputs} per request (max_inputs); split the request")
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            if not item:
                raise InvalidInput("inputs", "empty string", index=i)
            if item.isspace():
                raise InvalidInput("inputs", "blank string (only whitespace)", index=i)
        elif isinstance(item, Sequence) and not isinstance(item, bytes):
            _check_ids(item, i, limits)
        else:
            raise InvalidInput("inputs", f"must be a string or a list of token ids, "
                               f"not {type(item).__name__}", index=i)


def validate_embed(inputs: Sequence[Input], task: str | int | None, dimensions: int, limits: Limits,
                   truncate: bool = True, normalize: bool = True) -> ValidRequest:
    """Check a whole embed request (the task by its name; None = not given); raises
    InvalidInput naming the first bad field."""
    resolved = task_named(task)
    check_inputs(inputs, limits)
    return ValidRequest(inputs, resolved, resolve_dimensions(dimensions, limits), truncate,
                        normalize)
