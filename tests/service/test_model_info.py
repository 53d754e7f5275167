"""The served model's names (service/model_info.py): each name, and each name's last part."""

from __future__ import annotations

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
