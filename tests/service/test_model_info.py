"""The served model's names (service/model_info.py): each name, and each name's last part."""

from __future__ import annotations

import pytest

from moe_embed.service.model_info import ModelInfo


def info(*names: str) -> ModelInfo:
    return ModelInfo(names, 0, "test")


def test_a_hub_id_by_its_full_name_and_its_last_part_only() -> None:
    m = info("nomic-ai/nomic-embed-text-v2-moe")
    assert m.name == "nomic-ai/nomic-embed-text-v2-moe"
    assert m.serves("nomic-ai/nomic-embed-text-v2-moe")
    assert m.serves("nomic-embed-text-v2-moe")
    for other in ("nomic-ai", "nomic-ai/", "/nomic-embed-text-v2-moe", "nomic-embed-text-v2",
                  "NOMIC-EMBED-TEXT-V2-MOE", ""):
        assert not m.serves(other), other


def test_every_name_counts_and_the_first_is_reported() -> None:
    m = info("a/b/c", "alias", "x/y")
    assert m.name == "a/b/c"
    assert [m.serves(n) for n in ("a/b/c", "c", "alias", "x/y", "y", "b", "a/b", "x")] == \
        [True, True, True, True, True, False, False, False]


def test_the_bundles_model_id_is_the_default(tiny_bundle) -> None:
    from datetime import datetime

    from moe_embed.workers.bundle.format import Bundle

    bundle = Bundle.load(tiny_bundle, verify=False)
    m = ModelInfo.of(bundle)
    assert m.names == ("synthetic-tiny",)
    assert m.created == int(datetime.fromisoformat(bundle.manifest.created).timestamp())
    assert ModelInfo.of(bundle, ("served", "other")).names == ("served", "other")


def _bundle(tmp_path, created) -> object:
    """A bundle directory whose manifest records `created` (no graph is needed for names)."""
    from moe_embed.workers.bundle.config import ModelConfig
    from moe_embed.workers.bundle.format import Bundle, DimensionRange, Graphs, Manifest

    config = ModelConfig(vocab_size=10, n_embd=4, n_head=1, n_inner=8, n_layer=2,
                         num_experts=2, moe_top_k=1, moe_every_n_layers=2)
    manifest = Manifest("org/name", {"kind": "local", "path": "/x"}, created, "fp32", "routed",
                        config, 512, DimensionRange(2, 4), "tokenizer.json",
                        Graphs(model="model.onnx"), {})
    return Bundle(tmp_path, manifest, "0" * 64)


def test_created_is_the_export_time_or_else_the_folders_mtime(tmp_path) -> None:
    """An export time that is not an ISO date (or none at all) falls back to the bundle
    directory's mtime instead of failing the server's start."""
    import os

    from moe_embed.service.model_info import ModelInfo

    os.utime(tmp_path, (1_000_000_000, 1_234_567_890))
    assert ModelInfo.of(_bundle(tmp_path, "2026-01-02T03:04:05+00:00")).created == 1767323045
    assert ModelInfo.of(_bundle(tmp_path, "yesterday")).created == 1_234_567_890  # ValueError
    assert ModelInfo.of(_bundle(tmp_path, None)).created == 1_234_567_890  # TypeError
    m = ModelInfo.of(_bundle(tmp_path, None))
    assert m.names == ("org/name",) and m.serves("name") and not m.serves("org")


def test_the_version_is_the_installed_packages_or_unknown(monkeypatch) -> None:
    import dataclasses
    import importlib.metadata

    from moe_embed.service import model_info

    def clear() -> None:
        getattr(model_info.package_version, "cache_clear", lambda: None)()

    clear()
    assert model_info.package_version() == importlib.metadata.version("moe-embed")

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    clear()
    try:
        assert model_info.package_version() == "unknown"
    finally:
        monkeypatch.undo()
        clear()
    m = info("a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.names = ("b",)  # type: ignore[misc]
