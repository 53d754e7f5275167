"""Read an upstream HF checkpoint (hub id or local dir): config, safetensors weights, tokenizer.

Safetensors only: a checkpoint that ships only pickled weights is refused, never unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..workers.bundle.config import CheckpointError, ModelConfig, expected_shapes, parse_config

__all__ = ["Checkpoint", "CheckpointError", "load_checkpoint"]

_HUB_FILES = ["config.json", "tokenizer.json", "model.safetensors", "model.safetensors.index.json",
              "*.safetensors"]


@dataclass
class Checkpoint:
    """A resolved checkpoint: where it came from, its config and its weights by upstream name."""

    directory: Path
    source: dict[str, str | None]
    raw_config: dict
    config: ModelConfig
    tensors: dict[str, torch.Tensor]

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / "tokenizer.json"


def resolve(source: str, revision: str | None = None) -> tuple[Path, dict[str, str | None]]:
    """A local directory is used as is; anything else is a hub id fetched with huggingface_hub."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve(), {"kind": "local", "path": str(path.resolve()), "revision": None}
    if path.exists() or source.startswith((".", "/", "~")):
        raise CheckpointError(f"checkpoint '{source}': not a directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = snapshot_download(repo_id=source, revision=revision, allow_patterns=_HUB_FILES)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise CheckpointError(
            f"checkpoint '{source}': could not download from the Hugging Face hub "
            f"(offline, unknown repo, or missing HF_TOKEN for a gated repo): {exc}"
        ) from exc
    resolved_rev = Path(local).name  # snapshot dirs are named by commit hash
    return Path(local), {"kind": "hub", "id": source, "revision": resolved_rev}


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise CheckpointError(
            f"{directory}: only pickled weights (*.bin/*.pt) found; safetensors are required "
            "(pickles are never loaded)"
        )
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def load_tensors(directory: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Load every expected tensor as fp32, failing on a missing or mis-shaped one by name."""
    want = expected_shapes(cfg)
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(directory):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                key = name.removeprefix("model.") if name.removeprefix("model.") in want else name
                if key in want:
                    tensors[key] = f.get_tensor(name).to(torch.float32)
    missing = [n for n in want if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint is missing tensor '{missing[0]}'{more}")
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(
                f"tensor '{name}' has shape {list(tensors[name].shape)}, expected {list(shape)}"
            )
    return tensors


def load_checkpoint(source: str, revision: str | None = None) -> Checkpoint:
    """Resolve, validate the config, check the tokenizer is there and load the weights."""
    directory, src = resolve(source, revision)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory}: config.json not found")
    raw = json.loads(cfg_path.read_text())
    cfg = parse_config(raw)
    if not (directory / "tokenizer.json").is_file():
        raise CheckpointError(f"{directory}: tokenizer.json not found")
    return Checkpoint(directory, src, raw, cfg, load_tensors(directory, cfg))
