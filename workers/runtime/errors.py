"""Typed failures of the runtime; the engine maps them to what a client sees
(service/errors.py)."""

from __future__ import annotations

from ..bundle.format import BundleError

__all__ = ["BundleError", "MalformedBatch"]


class MalformedBatch(ValueError):
    """A packed batch broke an invariant the frontend's validator guarantees (a bug upstream,
    not a caller's mistake): the batch fails INTERNAL, the worker lives on."""
