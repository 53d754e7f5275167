"""What the server says about the model it serves: the names `model` may take, the export
time (OpenAI's `created`) and the package version; one place for every adapter."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime

from ..workers.bundle.format import Bundle


@functools.cache
def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moe-embed")
    except PackageNotFoundError:
        return "unknown"


def _created(bundle: Bundle) -> int:
    """The bundle's export time in Unix seconds (its directory's mtime if not recorded)."""
    try:
        return int(datetime.fromisoformat(bundle.manifest.created).timestamp())
    except (TypeError, ValueError):
        return int(bundle.path.stat().st_mtime)


@dataclass(frozen=True)
class ModelInfo:
    names: tuple[str, ...]  # the first is the served name, reported everywhere
    created: int
    version: str

    @classmethod
    def of(cls, bundle: Bundle, served_names: tuple[str, ...] = ()) -> ModelInfo:
        """`served_names`, or the bundle's model id (the checkpoint's hub id where export knew
        it, else its folder name)."""
        return cls(served_names or (bundle.manifest.model_id,), _created(bundle),
                   package_version())

    @property
    def name(self) -> str:
        return self.names[0]

    def serves(self, name: str) -> bool:
        """`name` is one of the names, or the last /-part of one (`nomic-embed-text-v2-moe`
        for `nomic-ai/nomic-embed-text-v2-moe`)."""
        return any(name in (n, n.rsplit("/", 1)[-1]) for n in self.names)
