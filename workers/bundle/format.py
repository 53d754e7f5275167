"""The bundle format: one module writes and reads `manifest.json`, nobody else parses it.

A bundle is a directory: manifest.json, tokenizer.json, and the graphs/weights it lists, each
with its sha256. The manifest is typed (`Manifest` and the dataclasses it holds); readers use
its fields, never raw JSON keys. Loading verifies the format version and every hash, so a
tampered or truncated file is refused before any session is created.

Precision: `precision` names the recipe (fp32, int8, int4), `recipe` records it in full (the
storage format of every weight role) and `tensors` how each initializer of each graph is stored
(name, original shape, format, bytes, role, layer, file). Bundles written before quantized
bundles existed (format 2, fp32 only) have neither `recipe` nor `tensors`; they load as they are
(fp32, no tensor records) and round-trip unchanged. A quantized graph runs with ONNX Runtime's
contrib ops, which any build that reads format 2 already has, so the format version stays 2.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .recipes import PRECISIONS, Recipe, RecipeError, TensorStorage

FORMAT = "moe-embed-bundle"
FORMAT_VERSION = 2  # 2: routed segments take packed [N, H] hidden states
MANIFEST = "manifest.json"
MOE_MODES = ("routed", "all-experts")


class BundleError(RuntimeError):
    """A bundle on disk is missing, tampered with, or of an unsupported format."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class SegmentEntry:
    """A dense segment graph: closes MoE layer `moe_residual` (if any), runs `full_layers`,
    then the attention half of `attn_layer` (if any)."""

    file: str
    moe_residual: int | None
    full_layers: tuple[int, ...]
    attn_layer: int | None
    needs_mask: bool


@dataclass(frozen=True)
class Graphs:
    """What the runtime loads: `routed` bundles have segments, experts and router weights;
    `all-experts` bundles one `model` graph."""

    segments: tuple[SegmentEntry, ...] = ()
    experts: dict[int, tuple[str, ...]] = field(default_factory=dict)  # MoE layer -> files
    router: str | None = None
    model: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.model is not None:
            return {"model": self.model}
        return {"segments": [{**asdict(s), "full_layers": list(s.full_layers)}
                             for s in self.segments],
                "experts": {str(k): list(v) for k, v in self.experts.items()},
                "router": self.router}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Graphs:
        if "model" in d:
            return cls(model=d["model"])
        segments = tuple(SegmentEntry(s["file"], s["moe_residual"], tuple(s["full_layers"]),
                                      s["attn_layer"], s["needs_mask"]) for s in d["segments"])
        experts = {int(k): tuple(v) for k, v in d["experts"].items()}
        return cls(segments, experts, d["router"])


@dataclass(frozen=True)
class DimensionRange:
    """The Matryoshka output sizes the model supports."""

    min: int
    max: int


@dataclass(frozen=True)
class Manifest:
    model_id: str
    source: dict[str, Any]  # {"kind": "hub", "id", "revision"} or {"kind": "local", "path"}
    created: str
    precision: str
    moe_mode: str
    config: ModelConfig
    max_tokens: int
    dimensions: DimensionRange
    tokenizer: str
    graphs: Graphs
    exporter: dict[str, Any]
    files: dict[str, FileEntry] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    recipe: Recipe | None = None  # None only in bundles written before quantization existed
    tensors: tuple[TensorStorage, ...] = ()  # every graph initializer, file by file

    def to_json(self) -> dict[str, Any]:
        d = {
            "format": FORMAT, "format_version": self.format_version,
            "model_id": self.model_id, "source": self.source, "created": self.created,
            "precision": self.precision, "moe_mode": self.moe_mode,
            "config": self.config.to_dict(), "max_tokens": self.max_tokens,
            "dimensions": asdict(self.dimensions), "tokenizer": self.tokenizer,
            "graphs": self.graphs.to_json(), "exporter": self.exporter,
        }
        if self.recipe is not None:
            d["recipe"] = self.recipe.to_dict()
            d["tensors"] = [t.to_dict() for t in self.tensors]
        d["files"] = {k: asdict(v) for k, v in self.files.items()}
        return d

    def stored_bytes(self) -> dict[str, int]:
        """Bytes of the recorded tensors per storage format (empty for an old bundle)."""
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.format] = out.get(t.format, 0) + t.bytes
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any], where: Path) -> Manifest:
        if d.get("format") != FORMAT:
            raise BundleError(f"{where}: 'format' is {d.get('format')!r}, not {FORMAT!r}")
        if d.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{where}: format_version {d.get('format_version')!r} is not supported "
                f"(this build reads version {FORMAT_VERSION}); re-export the bundle")
        try:
            m = cls(
                model_id=d["model_id"], source=d["source"], created=d["created"],
                precision=d["precision"], moe_mode=d["moe_mode"],
                config=ModelConfig.from_dict(d["config"]), max_tokens=d["max_tokens"],
                dimensions=DimensionRange(**d["dimensions"]), tokenizer=d["tokenizer"],
                graphs=Graphs.from_json(d["graphs"]), exporter=d["exporter"],
                files={k: FileEntry(**v) for k, v in d["files"].items()},
                format_version=d["format_version"],
                recipe=Recipe.from_dict(d["recipe"]) if "recipe" in d else None,
                tensors=tuple(TensorStorage.from_dict(t) for t in d["tensors"])
                if "recipe" in d else ())
        except (KeyError, TypeError, RecipeError) as exc:
            raise BundleError(f"{where}: malformed manifest ({exc!r}); re-export the bundle") \
                from exc
        if m.precision not in PRECISIONS:
            raise BundleError(f"{where}: precision {m.precision!r} is not one this build "
                              f"serves ({', '.join(PRECISIONS)}); upgrade moe-embed or re-export")
        if m.recipe is None and m.precision != "fp32":
            raise BundleError(f"{where}: a {m.precision} bundle must record its recipe; "
                              "malformed manifest, re-export the bundle")
        if m.recipe is not None and m.recipe.name != m.precision:
            raise BundleError(f"{where}: precision {m.precision!r} but recipe "
                              f"{m.recipe.name!r}; malformed manifest, re-export the bundle")
        unlisted = sorted({t.file for t in m.tensors} - set(m.files))
        if unlisted:
            raise BundleError(f"{where}: tensor records name files the manifest does not list: "
                              f"{unlisted}; malformed manifest, re-export the bundle")
        return m


def write_manifest(directory: Path, manifest: Manifest, files: list[str]) -> Path:
    """Hash every listed file (relative paths) and write manifest.json last."""
    entries = {}
    for rel in sorted(files):
        p = directory / rel
        entries[rel] = FileEntry(sha256_file(p), p.stat().st_size)
    path = directory / MANIFEST
    body = replace(manifest, files=entries).to_json()
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path


@dataclass
class Bundle:
    """A verified bundle directory: its path, typed manifest and the manifest's sha256."""

    path: Path
    manifest: Manifest
    digest: str

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> Bundle:
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{path}: not a bundle ({MANIFEST} not found)")
        raw = mpath.read_bytes()
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise BundleError(f"{mpath}: not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise BundleError(f"{mpath}: not a JSON object")
        bundle = cls(path, Manifest.from_json(data, mpath), hashlib.sha256(raw).hexdigest())
        if verify:
            bundle.verify()
        return bundle

    def verify(self, threads: int | None = None) -> None:
        """Check every file's size and sha256 against the manifest, hashing files on all
        usable cores (hashlib releases the GIL): ~2 GB of fp32 bundle in about a second when
        the files are in the page cache."""
        files = sorted(self.manifest.files.items(), key=lambda kv: -kv[1].bytes)
        for rel, entry in files:
            p = self.path / rel
            if not p.is_file():
                raise BundleError(f"{self.path}: file '{rel}' listed in the manifest is missing")
            if p.stat().st_size != entry.bytes:
                raise BundleError(self._mismatch(rel))
        workers = threads or len(os.sched_getaffinity(0))
        with ThreadPoolExecutor(max(1, workers)) as pool:
            digests = pool.map(lambda kv: sha256_file(self.path / kv[0]), files)
            for (rel, entry), digest in zip(files, digests, strict=True):
                if digest != entry.sha256:
                    raise BundleError(self._mismatch(rel))

    def _mismatch(self, rel: str) -> str:
        return (f"{self.path}: file '{rel}' does not match its sha256 in the manifest "
                "(modified or corrupted); re-export the bundle")

    def file(self, rel: str) -> Path:
        if rel not in self.manifest.files:
            raise BundleError(f"{self.path}: '{rel}' is not listed in the manifest")
        return self.path / rel

    @property
    def config(self) -> ModelConfig:
        return self.manifest.config
