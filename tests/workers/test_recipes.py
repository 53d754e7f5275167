"""Quantization recipes and storage records as a manifest holds them (workers/bundle/recipes.py):
pure data, so these run without ONNX. Each limit at its value and one past it; the sizes of
each storage format worked out by hand from the layout export/quantize.py documents."""

from __future__ import annotations

import dataclasses
import json

import pytest

from moe_embed.workers.bundle.recipes import (
    EXPERT_ROLES,
    PRECISIONS,
    RECIPES,
    ROLES,
    SEGMENT_ROLES,
    NBits,
    Recipe,
    RecipeError,
    TensorStorage,
    expected_bytes,
    get_recipe,
    parse_format,
)

FP32 = {role: "fp32" for role in ROLES}


@pytest.mark.parametrize(("fmt", "parsed"), [
    ("fp32", None), ("int8-rowwise", "int8-rowwise"), ("int8-per-channel", True),
    ("int8-per-tensor", False), ("nbits4-block16", NBits(4, 16, False)),
    ("nbits8-block256", NBits(8, 256, False)), ("nbits4-block32-sym", NBits(4, 32, True)),
    ("nbits8-block64", NBits(8, 64, False)),
])
def test_each_storage_format_parses(fmt: str, parsed: object) -> None:
    got = parse_format(fmt)
    assert got == parsed and type(got) is type(parsed)


@pytest.mark.parametrize(("fmt", "message"), [
    ("nbits4-block8", "power of two in 16..256"),  # one power of two below the range
    ("nbits4-block15", "power of two"), ("nbits4-block17", "power of two"),
    ("nbits4-block48", "power of two"), ("nbits8-block512", "power of two"),
    ("nbits8-block257", "power of two"), ("nbits8-block255", "power of two"),
    ("nbits3-block32", "unknown storage format"), ("int8", "unknown storage format"),
    ("nbits4-block32-asym", "unknown storage format"), ("", "unknown storage format"),
])
def test_formats_out_of_range_are_refused(fmt: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        parse_format(fmt)


def test_the_roles_of_a_recipe() -> None:
    assert SEGMENT_ROLES == ("word_embeddings", "attn.qkv", "attn.out_proj", "mlp.fc1",
                             "mlp.fc2")
    assert EXPERT_ROLES == ("expert.w1", "expert.w2")
    assert ROLES == SEGMENT_ROLES + EXPERT_ROLES


def test_the_shipped_recipes_are_the_documented_ones() -> None:
    """The formats each precision is documented (and measured, benchmarks/QUANT.md) with."""
    assert PRECISIONS == ("fp32", "int8", "int4")
    assert RECIPES["fp32"] == Recipe("fp32", FP32) and RECIPES["fp32"].is_identity
    assert dict(RECIPES["int8"].formats) == {
        "word_embeddings": "nbits8-block256", "attn.qkv": "nbits8-block32",
        "attn.out_proj": "nbits8-block32", "mlp.fc1": "nbits8-block32-sym",
        "mlp.fc2": "nbits8-block32-sym", "expert.w1": "int8-rowwise",
        "expert.w2": "int8-rowwise"}
    assert dict(RECIPES["int4"].formats) == {
        "word_embeddings": "nbits4-block32", "attn.qkv": "int8-rowwise",
        "attn.out_proj": "int8-rowwise", "mlp.fc1": "int8-rowwise", "mlp.fc2": "int8-rowwise",
        "expert.w1": "nbits4-block32", "expert.w2": "nbits4-block32"}
    assert dict(RECIPES["int8"].overrides) == {"layers.1.expert.w2": "nbits8-block64-sym"}
    assert dict(RECIPES["int4"].overrides) == {"layers.11.expert.w2": "nbits8-block32-sym"}
    assert RECIPES["int8"].format_for("expert.w2", 1) == "nbits8-block64-sym"
    assert RECIPES["int8"].format_for("expert.w2", 3) == "int8-rowwise"
    for name in PRECISIONS:
        r = RECIPES[name]
        assert r.name == name and r.accuracy_level == 4
        assert (dict(r.overrides) == {}) == (name == "fp32")
        assert get_recipe(name) is r
    with pytest.raises(RecipeError, match=r"precision must be one of \['fp32', 'int8', 'int4'\], "
                                          r"got 'int2'"):
        get_recipe("int2")


@pytest.mark.parametrize("level", [0, 1, 2, 3, 4])
def test_every_accuracy_level_of_matmulnbits_is_taken(level: int) -> None:
    r = Recipe("r", FP32, accuracy_level=level)
    assert r.validate() is r


@pytest.mark.parametrize("level", [-1, 5, True, False, 4.5, "4"])
def test_accuracy_levels_outside_0_to_4_are_refused(level: object) -> None:
    with pytest.raises(RecipeError, match="accuracy_level must be 0..4"):
        Recipe("r", FP32, accuracy_level=level).validate()  # type: ignore[arg-type]


@pytest.mark.parametrize(("recipe", "message"), [
    (Recipe("", FP32), "non-empty string"),
    (Recipe(7, FP32), "non-empty string"),  # type: ignore[arg-type]
    (Recipe("r", list(FP32.items())), "must be mappings"),  # type: ignore[arg-type]
    (Recipe("r", FP32, [("layers.1.mlp.fc1", "fp32")]), "must be mappings"),  # type: ignore
    (Recipe("r", {**FP32, "mlp.fc3": "fp32"}), r"roles missing \[\], unknown \['mlp.fc3'\]"),
    (Recipe("r", {k: v for k, v in FP32.items() if k != "expert.w2"}),
     r"roles missing \['expert.w2'\], unknown \[\]"),
    (Recipe("r", {**FP32, "mlp.fc1": 8}), "'r': mlp.fc1: format must be a string"),
    (Recipe("r", {**FP32, "attn.qkv": "nbits4-block48"}), "'r': attn.qkv: format 'nbits4-b"),
    (Recipe("r", FP32, {"layers.x.mlp.fc1": "fp32"}), "override 'layers.x.mlp.fc1' is not"),
    (Recipe("r", FP32, {"layers.1.mlp.fc9": "fp32"}), "with a known role"),
    (Recipe("r", FP32, {"layer.1.mlp.fc1": "fp32"}), "is not 'layers"),
    (Recipe("r", FP32, {"layers.1.mlp.fc1": "int4"}), "layers.1.mlp.fc1: unknown storage"),
    (Recipe("r", FP32, {"layers.1.mlp.fc1": None}), "layers.1.mlp.fc1: format must be a str"),
    (Recipe("r", {**FP32, "word_embeddings": "int8-rowwise"}), "the embedding table takes"),
    (Recipe("r", {**FP32, "word_embeddings": "int8-per-tensor"}), "the embedding table takes"),
    (Recipe("r", FP32, {"layers.0.word_embeddings": "int8-per-channel"}),
     "layers.0.word_embeddings: 'int8-per-channel' is for MatMul weights"),
])
def test_a_malformed_recipe_is_refused_naming_what(recipe: Recipe, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        recipe.validate()


def test_the_table_takes_fp32_or_nbits_and_matmuls_take_every_format() -> None:
    for table in ("fp32", "nbits4-block32", "nbits8-block128-sym"):
        Recipe("r", {**FP32, "word_embeddings": table}).validate()
    for fmt in ("int8-rowwise", "int8-per-channel", "int8-per-tensor", "nbits4-block16"):
        Recipe("r", {**FP32, "mlp.fc1": fmt}, {"layers.3.expert.w2": fmt}).validate()


def test_an_override_wins_for_its_layer_only() -> None:
    r = Recipe("r", {**FP32, "mlp.fc2": "int8-rowwise"},
               {"layers.3.mlp.fc2": "nbits4-block32", "layers.1.expert.w1": "fp32"}).validate()
    assert r.format_for("mlp.fc2", 3) == "nbits4-block32"
    assert r.format_for("mlp.fc2", 0) == "int8-rowwise"  # layer 0 is not None
    assert r.format_for("mlp.fc2", 2) == "int8-rowwise"
    assert r.format_for("mlp.fc2", None) == "int8-rowwise"
    assert r.format_for("expert.w1", 1) == "fp32"
    r0 = Recipe("r", FP32, {"layers.0.attn.qkv": "nbits8-block32"}).validate()
    assert r0.format_for("attn.qkv", 0) == "nbits8-block32"


def test_identity_means_fp32_everywhere_overrides_included() -> None:
    assert Recipe("r", FP32, {"layers.2.mlp.fc1": "fp32"}).is_identity
    # as read back from a manifest: strings made by the JSON parser, not the source's literals
    loaded = json.loads(json.dumps(Recipe("r", FP32, {"layers.2.mlp.fc1": "fp32"}).to_dict()))
    assert Recipe.from_dict(loaded).is_identity
    assert not Recipe("r", FP32, {"layers.2.mlp.fc1": "nbits4-block32"}).is_identity
    assert not Recipe("r", {**FP32, "expert.w2": "int8-rowwise"}).is_identity


def test_a_recipe_round_trips_through_a_manifest_dict() -> None:
    r = Recipe("custom", {**FP32, "expert.w1": "nbits4-block32"},
               {"layers.1.expert.w2": "int8-rowwise"}, accuracy_level=0).validate()
    d = r.to_dict()
    assert d == {"name": "custom", "formats": {**FP32, "expert.w1": "nbits4-block32"},
                 "overrides": {"layers.1.expert.w2": "int8-rowwise"}, "accuracy_level": 0}
    assert Recipe.from_dict(d) == r
    # optional keys: no overrides (or null) and the default accuracy level
    assert Recipe.from_dict({"name": "n", "formats": FP32}) == Recipe("n", FP32, {}, 4)
    assert Recipe.from_dict({"name": "n", "formats": FP32, "overrides": None}).overrides == {}


@pytest.mark.parametrize(("raw", "message"), [
    ("int8", "a recipe must be a mapping, got str"),
    ({"formats": FP32}, "needs 'name' and 'formats'"),
    ({"name": "n"}, "needs 'name' and 'formats'"),
    ({"name": "n", "formats": FP32, "level": 4}, r"unexpected \['level'\]"),
    ({"name": "n", "formats": "fp32"}, "must be mappings"),
    ({"name": "n", "formats": {**FP32, "mlp.fc1": "x"}}, "unknown storage format"),
])
def test_a_malformed_recipe_dict_is_refused(raw: object, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(raw)


def test_a_tensor_record_round_trips_and_its_optional_fields_default_to_none() -> None:
    t = TensorStorage("w", (3, 4), "int8-rowwise", 99, "mlp.fc1", 2, "segment_1.onnx")
    d = t.to_dict()
    assert d == {"name": "w", "shape": [3, 4], "format": "int8-rowwise", "bytes": 99,
                 "role": "mlp.fc1", "layer": 2, "file": "segment_1.onnx"}
    assert TensorStorage.from_dict(d) == t
    bare = TensorStorage.from_dict({"name": "b", "shape": [5], "format": "fp32", "bytes": 20})
    assert bare == TensorStorage("b", (5,), "fp32", 20, None, None, None)
    for bad in ({"name": "b", "shape": (5,), "format": "fp32", "bytes": 20}, ["b"], None):
        with pytest.raises(TypeError, match="not a tensor storage record"):
            TensorStorage.from_dict(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("fmt", "shape", "role", "size"), [
    # fp32: 4 bytes a value, whatever the role
    ("fp32", (3, 5), "attn.qkv", 60), ("fp32", (5, 40), "word_embeddings", 800),
    ("fp32", (2, 3, 4), None, 96),
    # dynamic int8 [K=3, N=5]: 15 bytes of data, + per channel 5 x (4-byte scale + zero point)
    ("int8-per-channel", (3, 5), "mlp.fc1", 15 + 25), ("int8-per-tensor", (3, 5), "mlp.fc1", 20),
    # row-wise: data + a 4-byte scale per column + 21 bytes of constants; after a GELU, also a
    # 4-byte offset and a 4-byte correction per column
    ("int8-rowwise", (3, 5), "attn.qkv", 15 + 20 + 21),
    ("int8-rowwise", (3, 5), "mlp.fc2", 15 + 20 + 21 + 4 + 20),
    ("int8-rowwise", (3, 5), "expert.w2", 15 + 20 + 21 + 4 + 20),
    ("int8-rowwise", (3, 5), "expert.w1", 15 + 20 + 21),
    # MatMulNBits [K=40, N=3], block 32: K padded to 2 blocks = 64; a 4-byte scale a block;
    # zero points (asymmetric) packed per column, rounded up to whole bytes
    ("nbits8-block32", (40, 3), "mlp.fc1", 3 * 64 + 24 + 3 * 2),
    ("nbits8-block32-sym", (40, 3), "mlp.fc1", 3 * 64 + 24),
    ("nbits4-block32", (40, 3), "mlp.fc1", 3 * 32 + 24 + 3 * 1),
    ("nbits4-block32", (32, 3), "mlp.fc1", 3 * 16 + 12 + 3 * 1),  # K exactly one block
    ("nbits4-block32", (33, 3), "mlp.fc1", 3 * 32 + 24 + 3 * 1),  # one past: two blocks
    ("nbits4-block32", (70, 3), "mlp.fc1", 3 * 48 + 36 + 3 * 2),  # 3 blocks: 12 bits of zp
    ("nbits4-block16-sym", (70, 3), "expert.w1", 3 * 40 + 60),
    # the real model's shapes (H=768: 24 blocks of 32 per column): zero points of 24 blocks
    # take 24 bytes at 8 bits, 12 at 4 bits
    ("nbits8-block32", (768, 2304), "attn.qkv", 2304 * 768 + 4 * 2304 * 24 + 2304 * 24),
    ("nbits4-block32", (768, 3072), "expert.w1", 3072 * 384 + 4 * 3072 * 24 + 3072 * 12),
    # the table [V=5, H=40]: blocks along H, rows stored unpadded; a 4-bit table's scales fp16
    ("nbits4-block32", (5, 40), "word_embeddings", 5 * 20 + 2 * 5 * 2 + 5 * 1),
    ("nbits8-block32-sym", (5, 40), "word_embeddings", 5 * 40 + 4 * 5 * 2),
])
def test_expected_bytes_of_each_format(fmt: str, shape: tuple[int, ...], role: str | None,
                                       size: int) -> None:
    got = expected_bytes(fmt, shape, role)
    assert got == size and type(got) is int  # bytes, compared with a manifest's integers


def test_recipes_formats_and_records_cannot_be_changed_in_place() -> None:
    """RECIPES is shared by every export in the process, and a manifest's records by its
    readers: no caller can alter them."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        RECIPES["int8"].accuracy_level = 0  # type: ignore[misc]
    nbits = parse_format("nbits4-block32")
    with pytest.raises(dataclasses.FrozenInstanceError):
        nbits.bits = 8  # type: ignore[misc]
    assert hash(nbits) == hash(NBits(4, 32, False))
    record = TensorStorage("w", (3, 4), "fp32", 48)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.bytes = 0  # type: ignore[misc]
