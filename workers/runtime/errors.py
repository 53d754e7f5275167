"""Typed failures of the runtime and of request validation; the service maps them to
statuses in one place (service/errors.py)."""

from __future__ import annotations

from ...export.bundle import BundleError

__all__ = ["BundleError", "InvalidInput"]


class InvalidInput(ValueError):
    """A caller-supplied value is wrong: names the field and, for lists, the index in the
    caller's request."""

    def __init__(self, field: str, message: str, index: int | None = None) -> None:
        self.field = field
        self.index = index
        self.detail = message
        super().__init__(f"{self.where}: {message}")

    @property
    def where(self) -> str:
        """The field path, e.g. `inputs[3]`."""
        return self.field if self.index is None else f"{self.field}[{self.index}]"
