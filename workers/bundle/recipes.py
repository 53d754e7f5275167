"""Recipes and storage formats of quantized bundles: pure data, no ONNX import.

The frontend reads manifests (workers/bundle/format.py) without importing onnx or torch, and a
manifest records the recipe a bundle was made with and how each tensor is stored; so the recipe
types, the shipped recipes and the storage record live here, and export/quantize.py (which rewrites
graphs with ONNX Runtime's tools) imports them. See export/quantize.py for what each format means.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Kind = Literal["expert", "segment"]

SEGMENT_ROLES = ("word_embeddings", "attn.qkv", "attn.out_proj", "mlp.fc1", "mlp.fc2")
EXPERT_ROLES = ("expert.w1", "expert.w2")
ROLES = SEGMENT_ROLES + EXPERT_ROLES
GATHER_ROLES = ("word_embeddings",)
GELU_INPUT_ROLES = ("mlp.fc2", "expert.w2")  # their MatMul reads a Gelu's output

DYNAMIC_FORMATS = {"int8-per-channel": True, "int8-per-tensor": False}  # format -> per_channel
ROWWISE_FORMAT = "int8-rowwise"  # int8 weights per column, activations quantized per row
# bytes of the small constants a row-wise MatMul adds (quantize.py's _ROWWISE_AUX): the activation
# zero point (uint8), the unit A scale, 1/127 and the scale floor (fp32), the reduce axes (int64)
ROWWISE_AUX_BYTES = 1 + 4 + 4 + 4 + 8
_NBITS = re.compile(r"^nbits(?P<bits>[48])-block(?P<block>[0-9]+)(?P<sym>-sym)?$")
_OVERRIDE = re.compile(r"^layers\.(?P<layer>[0-9]+)\.(?P<role>.+)$")


class RecipeError(ValueError):
    """A recipe is malformed, or does not fit the graph it is applied to."""


@dataclass(frozen=True)
class NBits:
    bits: int
    block_size: int
    symmetric: bool


def parse_format(fmt: str) -> NBits | bool | str | None:
    """``fp32`` -> None; ``int8-per-*`` -> per_channel (bool); ``int8-rowwise`` -> itself (str);
    ``nbits*`` -> NBits. Else raise."""
    if fmt == "fp32":
        return None
    if fmt == ROWWISE_FORMAT:
        return fmt
    if fmt in DYNAMIC_FORMATS:
        return DYNAMIC_FORMATS[fmt]
    m = _NBITS.match(fmt)
    if m:
        block = int(m["block"])
        if block < 16 or block > 256 or block & (block - 1):
            raise RecipeError(f"format {fmt!r}: block size must be a power of two in 16..256")
        return NBits(int(m["bits"]), block, bool(m["sym"]))
    raise RecipeError(
        f"unknown storage format {fmt!r}: expected 'fp32', 'int8-rowwise', 'int8-per-channel', "
        "'int8-per-tensor' or 'nbits{4|8}-block{16..256}[-sym]'")


@dataclass(frozen=True)
class Recipe:
    """A storage format per role, optional per-layer overrides, and MatMulNBits' compute level.

    `overrides` keys are ``layers.{i}.{role}`` (e.g. ``layers.11.mlp.fc2``, ``layers.3.expert.w2``).
    `accuracy_level` is MatMulNBits' attribute: 4 quantizes activations to int8 per block at run
    time (int8 dot products), 0 dequantizes weights and computes in fp32.
    """

    name: str
    formats: Mapping[str, str]
    overrides: Mapping[str, str] = field(default_factory=dict)
    accuracy_level: int = 4

    def validate(self) -> Recipe:
        if not isinstance(self.name, str) or not self.name:
            raise RecipeError("recipe name must be a non-empty string")
        if not isinstance(self.formats, Mapping) or not isinstance(self.overrides, Mapping):
            raise RecipeError(f"recipe {self.name!r}: 'formats' and 'overrides' must be mappings")
        missing = [r for r in ROLES if r not in self.formats]
        unknown = [r for r in self.formats if r not in ROLES]
        if missing or unknown:
            raise RecipeError(f"recipe {self.name!r}: roles missing {missing}, unknown {unknown}; "
                              f"every one of {list(ROLES)} needs a format")
        entries = [(role, fmt, role) for role, fmt in self.formats.items()]
        for key, fmt in self.overrides.items():
            m = _OVERRIDE.match(str(key))
            if not m or m["role"] not in ROLES:
                raise RecipeError(f"recipe {self.name!r}: override {key!r} is not "
                                  "'layers.{i}.{role}' with a known role")
            entries.append((m["role"], fmt, key))
        for role, fmt, where in entries:
            if not isinstance(fmt, str):
                raise RecipeError(f"recipe {self.name!r}: {where}: format must be a string")
            try:
                parsed = parse_format(fmt)
            except RecipeError as exc:
                raise RecipeError(f"recipe {self.name!r}: {where}: {exc}") from None
            if role in GATHER_ROLES and isinstance(parsed, bool | str):
                raise RecipeError(f"recipe {self.name!r}: {where}: {fmt!r} is for MatMul weights; "
                                  "the embedding table takes 'fp32' or 'nbits*'")
        if self.accuracy_level not in (0, 1, 2, 3, 4) or isinstance(self.accuracy_level, bool):
            raise RecipeError(f"recipe {self.name!r}: accuracy_level must be 0..4, "
                              f"got {self.accuracy_level!r}")
        return self

    def format_for(self, role: str, layer: int | None) -> str:
        if layer is not None:
            fmt = self.overrides.get(f"layers.{layer}.{role}")
            if fmt is not None:
                return fmt
        return self.formats[role]

    @property
    def is_identity(self) -> bool:
        return all(f == "fp32" for f in (*self.formats.values(), *self.overrides.values()))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "formats": dict(self.formats),
                "overrides": dict(self.overrides), "accuracy_level": self.accuracy_level}

    @classmethod
    def from_dict(cls, raw: Any) -> Recipe:
        if not isinstance(raw, Mapping):
            raise RecipeError(f"a recipe must be a mapping, got {type(raw).__name__}")
        extra = set(raw) - {"name", "formats", "overrides", "accuracy_level"}
        if extra or "name" not in raw or "formats" not in raw:
            raise RecipeError(f"recipe needs 'name' and 'formats' (optional 'overrides', "
                              f"'accuracy_level'); unexpected {sorted(extra)}")
        return cls(raw["name"], dict(raw["formats"]) if isinstance(raw["formats"], Mapping)
                   else raw["formats"], dict(raw.get("overrides") or {}),
                   raw.get("accuracy_level", 4)).validate()


def _recipe(name: str, experts: str, dense: str, table: str, **roles: str) -> Recipe:
    formats = {"word_embeddings": table, "expert.w1": experts, "expert.w2": experts}
    formats.update({r: dense for r in ("attn.qkv", "attn.out_proj", "mlp.fc1", "mlp.fc2")})
    formats.update(roles)
    return Recipe(name, formats).validate()


# nomic-embed-text-v2-moe's last MoE layer (12 layers, MoE on the odd ones): recipes name layers
# by index, so on a smaller model this override names no layer.
LAST_MOE_LAYER = 11

# The shipped recipes. Every format they use gives each row of a GEMM a result that depends on
# that row alone (int8-rowwise: per-row activation scales and int32 sums; MatMulNBits at
# accuracy_level 4: per-block-of-a-row scales), so a text's vector is bit-identical whatever it is
# batched with (tests/workers/test_batch_invariance.py). Chosen on several full-size synthetic
# checkpoints, one with outlier channels, side by side with llama.cpp's GGUFs of each
# (benchmarks/QUANT.md, benchmarks/quant_recipes.py); per-kernel speed and row invariance:
# benchmarks/quant_kernels.py.
#
# - int8: the experts as int8-rowwise, the fast integer path (VNNI); attention's two projections
#   as MatMulNBits 8-bit block 32 (per-block activation scales, like llama.cpp's Q8_0: the
#   softmax amplifies q/k errors, and out_proj's error does not average out in the mean
#   pooling); the dense MLP (fc1, fc2) too, symmetric (no zero points, to stay under Q8_0's
#   size): with fc1/fc2 int8-rowwise (per-column weight scales over all of K) the seed-1
#   checkpoint fell below Q8_0 (0.99898 / 0.99951 vs 0.99914 / 0.99971), with 32-blocks it reached
#   0.99952 / 0.99970. Table 8-bit block 256: 3.6 MiB under block 128, which put the outlier
#   checkpoint's bundle (its fp32 outlier weights) over Q8_0's size (489.4 vs 488.5 MiB), at no
#   loss that holds across checkpoints (block 32: +21 MiB, over Q8_0's size). The first MoE
#   layer's expert.w2 (a Gelu's 3072-wide output, where one row scale spans the row's few large
#   values) on 8-bit blocks of 64, symmetric: seed 1's mean cosine 0.999687 -> 0.999718 (Q8_0
#   0.999711) for 1.1 MiB; in more layers it gains little more (all six: 0.999725) and the outlier
#   checkpoint's bundle passes Q8_0's size from two layers on; blocks >= 128 would be smaller but
#   are not batch-invariant (benchmarks/quant_kernels.py). 485.0 MiB.
#   Dynamic int8 (one activation scale per call) was faster still but made vectors depend on
#   their batch-mates; it is no longer used.
# - int4: 4-bit block-32 experts (MatMulNBits, accuracy level 4), dense linears int8-rowwise
#   (4-bit dense flips routers), table 4-bit block 32 (block 64 is 13 MiB smaller but fell below
#   Q4_K_M's min cosine on seed 1, 0.97115 vs 0.97210), the columns its LayerNorm makes outliers
#   kept in fp16 beside it (export/quantize.py, TABLE_OUTLIER_MAX_BITS), its block scales in fp16
#   (TABLE_FP16_SCALES_MAX_BITS). The last MoE layer's expert.w2 on 8-bit blocks of 32: the
#   outlier checkpoint's mean cosine 0.999940 -> 0.999963 (Q4_K_M 0.999957) for 8.7 MiB. The
#   last layer, because no router reads what it changes: the first MoE layer's experts on 8-bit
#   blocks closed that mean too but flipped a later router's choice for a seed-1 text (min
#   0.924 vs Q4_K_M's 0.9718). 326.0 MiB.
RECIPES: dict[str, Recipe] = {
    "fp32": _recipe("fp32", "fp32", "fp32", "fp32"),
    "int8": Recipe("int8", dict(_recipe(
        "int8", "int8-rowwise", "nbits8-block32", "nbits8-block256",
        **{"mlp.fc1": "nbits8-block32-sym", "mlp.fc2": "nbits8-block32-sym"}).formats),
        {"layers.1.expert.w2": "nbits8-block64-sym"}).validate(),
    "int4": Recipe("int4", dict(_recipe("int4", "nbits4-block32", "int8-rowwise",
                                        "nbits4-block32").formats),
                   {f"layers.{LAST_MOE_LAYER}.expert.w2": "nbits8-block32-sym"}).validate(),
}
PRECISIONS = tuple(RECIPES)


def get_recipe(precision: str) -> Recipe:
    try:
        return RECIPES[precision]
    except KeyError:
        raise RecipeError(f"precision must be one of {list(RECIPES)}, got {precision!r}") from None


@dataclass(frozen=True)
class TensorStorage:
    """How one initializer of the fp32 graph is stored in the quantized graph."""

    name: str  # initializer name in the fp32 graph
    shape: tuple[int, ...]  # its original shape
    format: str  # "fp32", "int64", ... (unchanged) or a storage format above
    bytes: int  # bytes of every initializer now holding it: data + scales + zero points
    role: str | None = None  # "attn.qkv", "expert.w1", "word_embeddings", ...; None = not a weight
    layer: int | None = None
    file: str | None = None  # the bundle file (graph) holding it; set by the exporter

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorStorage:
        if not isinstance(d, Mapping) or not isinstance(d.get("shape"), list):
            raise TypeError(f"not a tensor storage record: {d!r}")
        return cls(d["name"], tuple(d["shape"]), d["format"], d["bytes"], d.get("role"),
                   d.get("layer"), d.get("file"))


# A 4-bit table's block scales are stored in fp16 (GatherBlockQuantized then yields fp16 rows,
# cast to fp32): half a bit a value less than fp32 scales at block 32 (11.4 MiB of the full
# model's 250k x 768 table), at no measurable cost (the fp16 rounding of a scale, 2^-11 of it,
# against a 4-bit step of 1/15 of the block's range). 8-bit tables keep fp32 scales: at block
# 256 they weigh 1/64 bit a value.
TABLE_FP16_SCALES_MAX_BITS = 4


def expected_bytes(fmt: str, shape: tuple[int, ...], role: str | None = None) -> int:
    """Bytes a weight of `shape` occupies in `fmt` (fp32 MatMul weight [K, N], table [V, H])."""
    parsed = parse_format(fmt)
    if parsed is None:
        return 4 * math.prod(shape)
    if role in GATHER_ROLES:  # blocks along H of each of the V rows
        v, k = shape
        n = v
    else:
        k, n = shape
    if isinstance(parsed, bool):  # dynamic int8: int8 data, fp32 scale + int8 zero point
        return k * n + (5 * n if parsed else 5)
    if isinstance(parsed, str):  # row-wise int8: int8 data, an fp32 scale per column
        gelu = 4 + 4 * n if role in GELU_INPUT_ROLES else 0  # offset, correction per column
        return k * n + 4 * n + ROWWISE_AUX_BYTES + gelu
    blocks = -(-k // parsed.block_size)
    # MatMulNBits pads K to whole blocks; the table's rows are stored unpadded
    data = n * (k if role in GATHER_ROLES else blocks * parsed.block_size) * parsed.bits // 8
    zp = 0 if parsed.symmetric else n * -(-blocks * parsed.bits // 8)
    fp16 = role in GATHER_ROLES and parsed.bits <= TABLE_FP16_SCALES_MAX_BITS
    return data + (2 if fp16 else 4) * n * blocks + zp


# --------------------------------------------------------------------------------------------
# The rewrite
