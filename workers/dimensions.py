"""Matryoshka output size: one rule for the frontend (before queuing) and the runtime.

Kept free of torch and ONNX Runtime so the frontend process can import it cheaply.
"""

from __future__ import annotations

from ..export.bundle import Bundle
from .errors import InvalidInput


def resolve_dimensions(bundle: Bundle, dimensions: int) -> int:
    """The output size for `dimensions` (0 = full); outside the bundle's range is an error."""
    lo, hi = bundle.dims_min, bundle.dims_max
    if dimensions == 0:
        return hi
    if not lo <= dimensions <= hi:
        raise InvalidInput("dimensions", f"{dimensions} is outside the supported range "
                           f"{lo}..{hi} (0 = full {hi})")
    return dimensions
