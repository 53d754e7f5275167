"""The bundle format: one module writes and reads `manifest.json`, nobody else parses it.

A bundle is a directory: manifest.json, tokenizer.json, and the graphs/weights it lists, each
with its sha256. Loading verifies the format version and every hash, so a tampered or truncated
file is refused before any session is created.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ModelConfig

FORMAT = "moe-embed-bundle"
FORMAT_VERSION = 2  # 2: routed segments take packed [N, H] hidden states
MANIFEST = "manifest.json"


class BundleError(RuntimeError):
    """A bundle on disk is missing, tampered with, or of an unsupported format."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, fields: dict[str, Any], files: list[str]) -> Path:
    """Hash every listed file (relative paths) and write manifest.json last."""
    entries = {}
    for rel in sorted(files):
        p = directory / rel
        entries[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **fields, "files": entries}
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


@dataclass
class Bundle:
    """A verified bundle directory and the facts the runtime and service need from it."""

    path: Path
    manifest: dict[str, Any]
    digest: str

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> Bundle:
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{path}: not a bundle ({MANIFEST} not found)")
        raw = mpath.read_bytes()
        try:
            manifest = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise BundleError(f"{mpath}: not valid JSON: {exc}") from exc
        if manifest.get("format") != FORMAT:
            raise BundleError(f"{mpath}: 'format' is {manifest.get('format')!r}, not {FORMAT!r}")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{mpath}: format_version {manifest.get('format_version')!r} is not supported "
                f"(this build reads version {FORMAT_VERSION}); re-export the bundle"
            )
        bundle = cls(path, manifest, hashlib.sha256(raw).hexdigest())
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Check every file's size and sha256 against the manifest."""
        for rel, entry in self.manifest["files"].items():
            p = self.path / rel
            if not p.is_file():
                raise BundleError(f"{self.path}: file '{rel}' listed in the manifest is missing")
            if p.stat().st_size != entry["bytes"] or sha256_file(p) != entry["sha256"]:
                raise BundleError(
                    f"{self.path}: file '{rel}' does not match its sha256 in the manifest "
                    "(modified or corrupted); re-export the bundle"
                )

    def file(self, rel: str) -> Path:
        if rel not in self.manifest["files"]:
            raise BundleError(f"{self.path}: '{rel}' is not listed in the manifest")
        return self.path / rel

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.manifest["config"])

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def moe_mode(self) -> str:
        return self.manifest["moe_mode"]

    @property
    def dims_min(self) -> int:
        return self.manifest["dimensions"]["min"]

    @property
    def dims_max(self) -> int:
        return self.manifest["dimensions"]["max"]

    @property
    def max_tokens(self) -> int:
        return self.manifest["max_tokens"]

    @property
    def graphs(self) -> dict[str, Any]:
        return self.manifest["graphs"]
