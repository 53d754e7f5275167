"""Typed failures raised by the runtime; the service maps them to gRPC status codes in one place."""

from __future__ import annotations

from ..export.bundle import BundleError

__all__ = ["BundleError", "InvalidInput"]


class InvalidInput(ValueError):
    """A caller-supplied value is wrong: names the field and, for lists, the index."""

    def __init__(self, field: str, message: str, index: int | None = None) -> None:
        self.field = field
        self.index = index
        self.detail = message
        where = field if index is None else f"{field}[{index}]"
        super().__init__(f"{where}: {message}")
