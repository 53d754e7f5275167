"""Quantization recipes for bundle graphs: pure functions from an fp32 graph to a quantized one.

A bundle's graphs hold three kinds of weights that matter for size: the word-embedding table read
by a `Gather` (192M of the model's 475M parameters), the dense linear layers of the segments
(`MatMul(x, W^T) + bias`, W stored pre-transposed [K, N]) and the experts' two GEMMs. A `Recipe`
gives each *role* (below) a storage format; `quantize_graph` rewrites one graph with ONNX Runtime's
own tools and returns, for every initializer of the input graph, how it ended up stored.

Storage formats (the strings recorded per tensor in the manifest):

- ``fp32``: unchanged.
- ``int8-per-channel`` / ``int8-per-tensor`` (MatMul weights only): ONNX Runtime's dynamic
  quantization (`quantize_dynamic`, QInt8 symmetric weights, uint8 activations quantized at run
  time). The file holds standard `DynamicQuantizeLinear` + `MatMulInteger` + `Cast` + `Mul` nodes;
  ONNX Runtime's graph optimizer fuses each (with a following bias Add) into one
  `com.microsoft.DynamicQuantizeMatMul` at session creation: ORT_ENABLE_EXTENDED or above
  (ORT_ENABLE_BASIC runs the unfused nodes).
- ``int8-rowwise`` (MatMul weights only): int8 weights, symmetric, one fp32 scale per output
  column; at run time each *row* of the activations gets its own scale (its max-abs / 127) and is
  quantized to uint8 around 128 (per-axis `QuantizeLinear`), the product is accumulated in int32
  (`com.microsoft.MatMulIntegerToFloat`, which also applies the column scales), then multiplied by
  the row scales. Integer sums are exact in any order and every other step is per element or per
  row, so a row's output depends on that row alone: not on its batch-mates, the number of rows,
  the GEMM's blocking or the thread count. (Dynamic int8 quantizes a whole call's activations
  with one scale: a row's result then moves with whatever else is in the call.)
- ``nbits{4,8}-block{16..256}[-sym]``: block quantization along the input (K) dimension, one fp32
  scale (and, unless ``-sym``, one zero point of the same width) per block. A MatMul weight becomes
  `com.microsoft.MatMulNBits` (via `onnxruntime.quantization.matmul_nbits_quantizer`), the word-
  embedding table `com.microsoft.GatherBlockQuantized` with uint8 data (bits 8 or 4, two values per
  byte; quantized by the same ORT kernel MatMulNBits uses, applied to the table's rows).

Roles: segments have ``word_embeddings`` (segment 0 only) and ``attn.qkv``, ``attn.out_proj``,
``mlp.fc1``, ``mlp.fc2`` per layer; experts have ``expert.w1`` and ``expert.w2``. Attention's own
MatMuls multiply two activations and are never quantized; LayerNorm parameters, biases, the rotary
tables, the token-type row and the router (not an ONNX graph) stay fp32. A weight whose role is
unknown is refused rather than silently left in fp32.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..workers.bundle.recipes import (
    DYNAMIC_FORMATS,
    EXPERT_ROLES,
    GATHER_ROLES,
    PRECISIONS,
    RECIPES,
    ROLES,
    ROWWISE_FORMAT,
    SEGMENT_ROLES,
    TABLE_FP16_SCALES_MAX_BITS,
    Kind,
    NBits,
    Recipe,
    RecipeError,
    TensorStorage,
    expected_bytes,
    get_recipe,
    parse_format,
)

__all__ = ["EXPERT_ROLES", "GATHER_ROLES", "PRECISIONS", "RECIPES", "ROLES", "SEGMENT_ROLES",
           "Kind", "NBits", "Recipe", "RecipeError", "TensorStorage", "expected_bytes",
           "get_recipe", "parse_format", "quantize_graph", "quantize_table",
           "storage_records", "storage_summary"]

MS_DOMAIN = "com.microsoft"

_SEGMENT_WEIGHT = re.compile(
    r"^encoder\.layers\.(?P<layer>[0-9]+)\.(?P<role>attn\.Wqkv|attn\.out_proj|mlp\.fc1|mlp\.fc2)"
    r"\.weight\.T$")
_SEGMENT_ROLE = {"attn.Wqkv": "attn.qkv", "attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.fc1",
                 "mlp.fc2": "mlp.fc2"}
_EXPERT_WEIGHT = {"w1.T": "expert.w1", "w2": "expert.w2"}



@dataclass
class _Weight:
    name: str
    node: str  # consuming node's name
    op: str  # MatMul or Gather
    role: str
    layer: int | None
    fmt: str
    shape: tuple[int, ...]


@contextlib.contextmanager
def _quiet_ort_logging() -> Iterator[None]:
    """ORT's quantization modules call logging.basicConfig(level=INFO) on import and log per node;
    keep the root logger (ours, structlog's) as it was and silence them while they run."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quiet = [logging.getLogger(n) for n in ("onnxruntime.quantization", "root")]
    old = [lg.level for lg in quiet]
    root.setLevel(logging.ERROR)
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for lg, lv in zip(quiet, old, strict=True):
            lg.setLevel(lv)


def _classify(model: onnx.ModelProto, node_names: list[str], kind: Kind, recipe: Recipe,
              layer: int | None) -> list[_Weight]:
    """Every MatMul/Gather reading a float initializer, with its role; unknown ones are refused."""
    inits = {i.name: i for i in model.graph.initializer}
    weights = []
    for node, node_name in zip(model.graph.node, node_names, strict=True):
        if node.domain not in ("", "ai.onnx"):
            raise RecipeError(f"{model.graph.name}: node {node_name} ({node.domain}."
                              f"{node.op_type}) is already quantized; quantize_graph takes fp32 "
                              "graphs")
        if node.op_type == "MatMul" and node.input[1] in inits:
            name = node.input[1]
        elif node.op_type == "Gather" and node.input[0] in inits:
            name = node.input[0]
        else:
            continue
        init = inits[name]
        if init.data_type != TensorProto.FLOAT:
            continue  # integer lookups (shape bookkeeping), not weights
        role, wlayer = None, layer
        if kind == "expert":
            role = _EXPERT_WEIGHT.get(name) if node.op_type == "MatMul" else None
        elif node.op_type == "Gather":
            role = "word_embeddings" if name == "word_embeddings" else None
        else:
            m = _SEGMENT_WEIGHT.match(name)
            if m:
                role, wlayer = _SEGMENT_ROLE[m["role"]], int(m["layer"])
        if role is None:
            raise RecipeError(f"{model.graph.name}: {node.op_type} weight {name!r} has no role "
                              f"in a {kind} graph; refusing to guess how to store it")
        if node.op_type == "Gather" and (len(init.dims) != 2 or _attr(node, "axis", 0) != 0):
            raise RecipeError(f"{model.graph.name}: table {name!r} must be 2-D and gathered on "
                              "axis 0")
        if node.op_type == "MatMul" and len(init.dims) != 2:
            raise RecipeError(f"{model.graph.name}: MatMul weight {name!r} must be 2-D")
        weights.append(_Weight(name, node_name, node.op_type, role, wlayer,
                               recipe.format_for(role, wlayer), tuple(init.dims)))
    names = [w.name for w in weights]
    if len(set(names)) != len(names):
        raise RecipeError(f"{model.graph.name}: a weight is read by more than one node")
    if kind == "expert" and sorted(w.role for w in weights) != sorted(EXPERT_ROLES):
        raise RecipeError(f"{model.graph.name}: an expert graph must have exactly the weights "
                          f"w1.T and w2, found {names}")
    return weights


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _node_names(model: onnx.ModelProto) -> list[str]:
    """Every node's name, inventing unique ones for the unnamed (the exporter names none)."""
    seen = {n.name for n in model.graph.node if n.name}
    names = []
    for i, node in enumerate(model.graph.node):
        name = node.name
        if not name:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            seen.add(name)
        names.append(name)
    return names


def _dynamic_int8(model: onnx.ModelProto, nodes: list[str], per_channel: bool) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="moe-embed-quant.") as tmp:
        out = Path(tmp) / "q.onnx"
        quantize_dynamic(model, out, op_types_to_quantize=["MatMul"], per_channel=per_channel,
                         reduce_range=False, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                         extra_options={"MatMulConstBOnly": True})
        return onnx.load(str(out))  # loads external data, if any, before tmp goes


# the constants a row-wise MatMul adds beside its weight (suffixes of the weight's name)
_ROWWISE_AUX = ("_act_zero_point", "_act_unit", "_act_step", "_act_floor", "_act_axes")
_GELU_AUX = ("_act_offset", "_act_correction")
ACT_LEVELS = 127.0  # symmetric int8 activations: q = round(x / scale) in -127..127
ACT_FLOOR = 1e-30  # a row of zeros gets this max-abs, not a division by zero
# GELU's output is >= -0.16997: shifted by this it is >= 0 and takes all 256 uint8 levels
# (q = round((x + offset) / scale) in 0..255, one scale per row, zero point 0), and the shift's
# product with the weights, a constant per column, is subtracted after the GEMM
GELU_OFFSET = 0.17


OUTLIER_RATIO = 4.0  # an input channel whose LayerNorm |gain| + |bias| is over 4x the median
_OUTLIER_AUX = ("_outlier_index", "_outlier_mask", "_outlier_weight")


def outlier_channels(gain: np.ndarray, bias: np.ndarray) -> list[int]:
    """Input channels to keep in fp32, for a MatMul reading LayerNorm(gain, bias)'s output: the
    channels the LayerNorm makes much larger than the rest (trained models' "massive activation"
    dimensions). A row's one int8 scale is set by its largest value: with such a channel in the
    row, every other channel would lose most of its levels."""
    a = np.abs(gain.astype(np.float64)) + np.abs(bias.astype(np.float64))
    ratio = a / max(float(np.median(a)), 1e-30)
    return [int(c) for c in np.flatnonzero(ratio > OUTLIER_RATIO)]


def _outlier_split(x: str, name: str, y: str, t: str, weight: np.ndarray, outliers: list[int]
                   ) -> tuple[np.ndarray, dict[str, np.ndarray], list[onnx.NodeProto],
                              list[onnx.NodeProto]]:
    """y = x @ W as (x * mask) @ W' + x[:, outliers] @ W[outliers]: `weight` with the outlier rows
    zeroed (W', for the quantized product, which then reads `{t}_x` and writes `{t}_yi`), the
    constants (suffixes of `name`: _OUTLIER_AUX), the nodes before and after it. The fp32
    product is a [rows, c] x [c, N] MatMul: each row's own, like every fp32 GEMM here."""
    mask = np.ones(weight.shape[0], dtype=np.float32)
    mask[outliers] = 0.0
    consts = {"_outlier_index": np.asarray(outliers, dtype=np.int64), "_outlier_mask": mask,
              "_outlier_weight": weight[outliers].copy()}
    pre = [helper.make_node("Mul", [x, name + "_outlier_mask"], [f"{t}_x"])]
    post = [helper.make_node("Gather", [x, name + "_outlier_index"], [f"{t}_xo"], axis=1),
            helper.make_node("MatMul", [f"{t}_xo", name + "_outlier_weight"], [f"{t}_yo"],
                             name=f"{t}_outlier_matmul"),
            helper.make_node("Add", [f"{t}_yi", f"{t}_yo"], [y])]
    return weight * mask[:, None], consts, pre, post


def _nbits_outliers(model: onnx.ModelProto, weights: list[_Weight],
                    norms: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[str]:
    """Before MatMulNBits quantization: each of `weights` whose input is a LayerNorm's output with
    outlier channels gets them split off in fp32 (_outlier_split), as int8-rowwise does. At
    accuracy level 4 MatMulNBits quantizes a row's activations per block of K: an outlier
    channel would set its block's scale and leave the block's other values a few levels each
    (on a checkpoint with 3 such channels, the 4-bit experts' whole loss against Q4_K_M).
    Rewrites `model` in place; returns the names of the fp32 MatMuls added (not to quantize)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    added = []
    for w in weights:
        pos, node = next((i, n) for i, n in enumerate(graph.node) if n.name == w.node)
        x, name, y = node.input[0], node.input[1], node.output[0]
        outliers = outlier_channels(*norms[x]) if x in norms else []
        if not outliers:
            continue
        t = f"{node.name}_ol"
        weight = numpy_helper.to_array(inits[name]).astype(np.float32)
        kept, consts, pre, post = _outlier_split(x, name, y, t, weight, outliers)
        inits[name].CopyFrom(numpy_helper.from_array(kept, name))
        graph.initializer.extend(numpy_helper.from_array(v, name + k) for k, v in consts.items())
        node.input[0], node.output[0] = f"{t}_x", f"{t}_yi"
        for i, n in enumerate(pre):
            n.name = f"{t}_pre{i}"
            graph.node.insert(pos + i, n)
        pos = next(i for i, n in enumerate(graph.node) if n.name == w.node)
        for i, n in enumerate(post):
            n.name = n.name or f"{t}_post{i}"
            graph.node.insert(pos + 1 + i, n)
        added.append(post[1].name)
    return added


def _input_norms(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """LayerNormalization outputs of a graph -> (gain, bias), where both are initializers."""
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "LayerNormalization" and len(n.input) == 3 \
                and n.input[1] in inits and n.input[2] in inits:
            out[n.output[0]] = (numpy_helper.to_array(inits[n.input[1]]),
                                numpy_helper.to_array(inits[n.input[2]]))
    return out


def _norms(model: onnx.ModelProto, input_norm: tuple[np.ndarray, np.ndarray] | None
           ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """_input_norms, plus the graph's first input as the output of `input_norm` (an expert graph
    reads its layer's norm1 output, computed in another graph)."""
    norms = _input_norms(model)
    if input_norm is not None:
        norms[model.graph.input[0].name] = input_norm
    return norms


def _rowwise_int8(model: onnx.ModelProto, weights: list[_Weight],
                  norms: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Rewrite each MatMul(x, W) of `weights` in place to the ``int8-rowwise`` form (module
    docstring). The MatMul's output name is kept, so a following bias Add is untouched. Where x
    is a LayerNorm's output (`norms`: tensor name -> gain, bias) with outlier channels
    (outlier_channels), those few channels are multiplied in fp32 (a [rows, c] x [c, N] MatMul,
    row by row like every fp32 GEMM here) and zeroed in the int8 product.

    A MatMul that reads a Gelu's output (fc2 and expert w2, GELU_INPUT_ROLES, in every graph the
    exporter builds) gets its rows shifted by
    GELU_OFFSET and quantized over 0..255 (twice the levels the symmetric form gives a row whose
    negative side is tiny); the shift's contribution is subtracted per column after the GEMM.

    x must be 2-D [rows, K] (every weight MatMul of a routed graph reads packed rows): the row
    scales are a [rows] vector for QuantizeLinear's axis 0, and ONNX Runtime refuses a call whose
    input has another rank (the flattened scales no longer match axis 0)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    for w in weights:
        pos, node = next((i, n) for i, n in enumerate(graph.node) if n.name == w.node)
        x, name, y = node.input[0], node.input[1], node.output[0]
        weight = numpy_helper.to_array(inits[name]).astype(np.float32)  # [K, N]
        t = f"{node.name}_rw"
        gelu = x in producer and producer[x].op_type == "Gelu"
        outliers = outlier_channels(*norms[x]) if x in norms else []
        consts: dict[str, np.ndarray] = {}
        pre, post = [], []
        if outliers:  # x[:, outliers] @ W[outliers] in fp32, the rest as int8 with them zeroed
            weight, split, pre, post = _outlier_split(x, name, y, t, weight, outliers)
            consts.update(split)
            y = f"{t}_yi"
            x = f"{t}_x"
        col_scale = np.abs(weight).max(axis=0) / np.float32(127.0)
        col_scale = np.where(col_scale > 0, col_scale, np.float32(1.0)).astype(np.float32)
        q = np.clip(np.rint(weight / col_scale), -127, 127).astype(np.int8)
        graph.initializer.remove(inits[name])
        consts.update({
            "_quantized": q, "_scale": col_scale,
            "_act_zero_point": np.asarray(0 if gelu else 128, dtype=np.uint8),
            "_act_unit": np.asarray(1.0, dtype=np.float32),
            "_act_step": np.asarray(1.0 / (255.0 if gelu else ACT_LEVELS), dtype=np.float32),
            "_act_floor": np.asarray(ACT_FLOOR, dtype=np.float32),
            "_act_axes": np.asarray([-1], dtype=np.int64),
        })
        if gelu:
            dequantized = q.astype(np.float64) * col_scale.astype(np.float64)
            consts["_act_offset"] = np.asarray(GELU_OFFSET, dtype=np.float32)
            consts["_act_correction"] = (-GELU_OFFSET * dequantized.sum(axis=0)).astype(
                np.float32)
        graph.initializer.extend(numpy_helper.from_array(v, name + k) for k, v in consts.items())
        c = {k: name + k for k in consts}
        if gelu:  # x + offset >= 0: its row max sets the scale, zero point 0 (the default)
            x0 = x
            x = f"{t}_shifted"
            scale_in = [helper.make_node("Add", [x0, c["_act_offset"]], [x]),
                        helper.make_node("ReduceMax", [x, c["_act_axes"]], [f"{t}_amax"],
                                         keepdims=1)]
        else:  # symmetric around 128: the row's max-abs sets the scale
            scale_in = [
                helper.make_node("ReduceMax", [x, c["_act_axes"]], [f"{t}_hi"], keepdims=1),
                helper.make_node("ReduceMin", [x, c["_act_axes"]], [f"{t}_lo"], keepdims=1),
                helper.make_node("Neg", [f"{t}_lo"], [f"{t}_nlo"]),
                helper.make_node("Max", [f"{t}_hi", f"{t}_nlo"], [f"{t}_amax"])]
        zero_points = [] if gelu else [
            helper.make_node("Shape", [f"{t}_rs_flat"], [f"{t}_rows"]),
            helper.make_node("Expand", [c["_act_zero_point"], f"{t}_rows"], [f"{t}_zps"])]
        nodes = pre + scale_in + [
            helper.make_node("Max", [f"{t}_amax", c["_act_floor"]], [f"{t}_amax_f"]),
            # the row scales [r, 1]
            helper.make_node("Mul", [f"{t}_amax_f", c["_act_step"]], [f"{t}_row_scale"]),
            # [r, 1] -> [r] (the axes constant [-1] doubles as the shape)
            helper.make_node("Reshape", [f"{t}_row_scale", c["_act_axes"]], [f"{t}_rs_flat"]),
            *zero_points,
            helper.make_node("QuantizeLinear",
                             [x, f"{t}_rs_flat"] + ([] if gelu else [f"{t}_zps"]),
                             [f"{t}_xq"], axis=0),
            helper.make_node("MatMulIntegerToFloat",
                             [f"{t}_xq", c["_quantized"], c["_act_unit"], c["_scale"],
                              c["_act_zero_point"]], [f"{t}_acc"], domain=MS_DOMAIN),
        ]
        if gelu:
            nodes += [helper.make_node("Mul", [f"{t}_acc", f"{t}_row_scale"], [f"{t}_y"]),
                      helper.make_node("Add", [f"{t}_y", c["_act_correction"]], [y])]
        else:
            nodes.append(helper.make_node("Mul", [f"{t}_acc", f"{t}_row_scale"], [y]))
        nodes += post
        for i, n in enumerate(nodes):
            n.name = f"{t}_{i}"
        graph.node.remove(node)
        for i, n in enumerate(nodes):
            graph.node.insert(pos + i, n)


def _copy_without(model: onnx.ModelProto, skip: set[str]) -> onnx.ModelProto:
    """A deep copy of `model` in which the initializers named in `skip` are one-row stand-ins of
    the same type and rank: the embedding table (733 MiB) is then neither copied nor sent through
    quantize_dynamic's file round trip and shape inference, and is quantized straight from
    `model`."""
    def copy_fields(dst, src, except_field: str) -> None:
        for fd, value in src.ListFields():
            if fd.name == except_field:
                continue
            if fd.is_repeated:
                getattr(dst, fd.name).extend(value)
            elif fd.type == fd.TYPE_MESSAGE:
                getattr(dst, fd.name).CopyFrom(value)
            else:
                setattr(dst, fd.name, value)

    m = onnx.ModelProto()
    copy_fields(m, model, "graph")
    copy_fields(m.graph, model.graph, "initializer")
    for t in model.graph.initializer:
        if t.name in skip:
            row = np.zeros((1, *t.dims[1:]), helper.tensor_dtype_to_np_dtype(t.data_type))
            m.graph.initializer.append(numpy_helper.from_array(row, t.name))
        else:
            m.graph.initializer.append(t)
    return m


def _matmul_nbits(model: onnx.ModelProto, exclude: list[str], spec: NBits,
                  accuracy_level: int) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    cfg = DefaultWeightOnlyQuantConfig(block_size=spec.block_size, is_symmetric=spec.symmetric,
                                       accuracy_level=accuracy_level, bits=spec.bits,
                                       op_types_to_quantize=("MatMul",))
    q = MatMulNBitsQuantizer(model, nodes_to_exclude=exclude, algo_config=cfg)
    q.process()
    return q.model.model


def quantize_table(table: np.ndarray, spec: NBits,
                   rows_per_chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Block-quantize a [V, H] table along H for GatherBlockQuantized (uint8 data).

    Uses ORT's MatMulNBits quantization kernel on the transposed rows (a [H, V] "weight" whose N
    columns are the table's rows), so the rounding and layout are MatMulNBits': data [V, H*bits/8]
    (two 4-bit values per byte, low nibble first), scales [V, H/block] fp32, zero points
    [V, ceil(blocks*bits/8)] packed the same way (None when symmetric: the op then uses 2^(bits-1)).
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    kernel = quantize_matmul_8bits if spec.bits == 8 else quantize_matmul_4bits
    v, h = table.shape
    if h * spec.bits % 8:
        raise RecipeError(f"table width {h} does not fill whole bytes at {spec.bits} bits")
    blocks = -(-h // spec.block_size)  # the last block may be partial
    data = np.zeros((v, h * spec.bits // 8), dtype=np.uint8)
    scales = np.zeros((v, blocks), dtype=np.float32)
    zps = np.zeros((v, -(-blocks * spec.bits // 8)), dtype=np.uint8)
    for lo in range(0, v, rows_per_chunk):
        hi = min(v, lo + rows_per_chunk)
        # the kernel reads its inputs as C-contiguous and writes into the arrays it is given:
        # every argument must be exactly typed and contiguous (a strided view is misread)
        w = np.ascontiguousarray(table[lo:hi].T, dtype=np.float32)  # [H, rows]
        d = np.zeros((hi - lo, blocks, spec.block_size * spec.bits // 8), dtype=np.uint8)
        s = np.zeros((hi - lo, blocks), dtype=np.float32)
        z = np.zeros((hi - lo, zps.shape[1]), dtype=np.uint8)
        kernel(d, w, s, z, spec.block_size, hi - lo, h, spec.symmetric)
        data[lo:hi] = d.reshape(hi - lo, -1)[:, : data.shape[1]]  # drop the last block's padding
        scales[lo:hi] = s
        zps[lo:hi] = z
    return data, scales, (None if spec.symmetric else zps)


# A 4-bit block gives each value one of 16 levels. A table channel that the next LayerNorm
# multiplies tens of times more than the rest (outlier_channels) carries that much more of the
# hidden state, and its rounding error with it: such columns are kept beside the 4-bit table in
# fp16 (V x 2 bytes each). 8-bit blocks (256 levels) are left whole.
TABLE_OUTLIER_MAX_BITS = 4
_TABLE_OUTLIER_AUX = ("_outlier_columns", "_outlier_onehot")


def _table_norm(model: onnx.ModelProto, gathered: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(gain, bias) of the LayerNorm that reads the table's rows, directly or through one Add of a
    constant (segment 0: word embedding + token-type row), where both are initializers."""
    inits = {t.name: t for t in model.graph.initializer}
    consumers = [n for n in model.graph.node if gathered in n.input]
    if len(consumers) != 1:
        return None
    n = consumers[0]
    if n.op_type == "Add" and any(i in inits for i in n.input if i != gathered):
        return _table_norm(model, n.output[0])
    if n.op_type == "LayerNormalization" and n.input[0] == gathered and len(n.input) == 3 \
            and n.input[1] in inits and n.input[2] in inits:
        return (numpy_helper.to_array(inits[n.input[1]]), numpy_helper.to_array(inits[n.input[2]]))
    return None


def _put_table(model: onnx.ModelProto, w: _Weight, table: TensorProto) -> None:
    """Replace the stand-in of table `w` by the table itself (fp32) or by its quantized form and
    a com.microsoft.GatherBlockQuantized node in place of the Gather. A 4-bit table's outlier
    columns (TABLE_OUTLIER_MAX_BITS) are zeroed in the blocks (a zero dequantizes to exactly 0)
    and gathered from an fp16 side table, then put back in place by a one-hot MatMul (each
    output is one product by 1.0 plus zeros: exact, and per row like every other step). A 4-bit
    table's block scales are fp16 (TABLE_FP16_SCALES_MAX_BITS): its rows come out as fp16 and
    are cast to fp32."""
    graph = model.graph
    idx = next(i for i, n in enumerate(graph.initializer) if n.name == w.name)
    del graph.initializer[idx]
    spec = parse_format(w.fmt)
    if spec is None:
        graph.initializer.append(table)
        return
    pos, node = next((i, n) for i, n in enumerate(graph.node) if n.name == w.node)
    values = numpy_helper.to_array(table)
    norm = _table_norm(model, node.output[0]) if spec.bits <= TABLE_OUTLIER_MAX_BITS else None
    outliers = outlier_channels(*norm) if norm is not None else []
    out = node.output[0]
    extra_nodes = []
    if outliers:
        columns = values[:, outliers].astype(np.float16)
        onehot = np.zeros((len(outliers), values.shape[1]), dtype=np.float32)
        onehot[np.arange(len(outliers)), outliers] = 1.0
        values = values.copy()
        values[:, outliers] = 0.0
        graph.initializer.extend([
            numpy_helper.from_array(columns, w.name + "_outlier_columns"),
            numpy_helper.from_array(onehot, w.name + "_outlier_onehot")])
        t = f"{node.name}_tq"
        extra_nodes = [
            helper.make_node("Gather", [w.name + "_outlier_columns", node.input[1]], [f"{t}_c16"],
                             axis=0),
            helper.make_node("Cast", [f"{t}_c16"], [f"{t}_c"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", [f"{t}_c", w.name + "_outlier_onehot"], [f"{t}_o"]),
            helper.make_node("Add", [f"{t}_q", f"{t}_o"], [out])]
        out = f"{t}_q"
    data, scales, zps = quantize_table(values, spec)
    if spec.bits <= TABLE_FP16_SCALES_MAX_BITS:
        scales = scales.astype(np.float16)
        half = f"{node.name}_t16"
        extra_nodes.insert(0, helper.make_node("Cast", [half], [out], to=TensorProto.FLOAT))
        out = half
    inits = [numpy_helper.from_array(data, f"{w.name}_Q{spec.bits}"),
             numpy_helper.from_array(scales, f"{w.name}_scales")]
    if zps is not None:
        inits.append(numpy_helper.from_array(zps, f"{w.name}_zero_points"))
    graph.initializer.extend(inits)
    inputs = [inits[0].name, node.input[1], inits[1].name] + ([inits[2].name] if zps is not None
                                                            else [])
    new = helper.make_node("GatherBlockQuantized", inputs, [out], name=node.name + "_Q",
                           domain=MS_DOMAIN, gather_axis=0, quantize_axis=1,
                           block_size=spec.block_size, bits=spec.bits)
    graph.node.remove(node)
    for n in reversed([new, *extra_nodes]):
        graph.node.insert(pos, n)


def _ensure_ms_opset(model: onnx.ModelProto) -> None:
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


# names ORT's tools (and _gather_block_quantized) give the tensors that replace weight `w`
def _stored_names(w: str, fmt: str) -> tuple[str, ...]:
    parsed = parse_format(fmt)
    if parsed is None:
        return (w,)
    if isinstance(parsed, bool):
        return (f"{w}_quantized", f"{w}_scale", f"{w}_zero_point")
    if isinstance(parsed, str):
        return (f"{w}_quantized", f"{w}_scale", *(w + a for a in _ROWWISE_AUX))
    names = (f"{w}_Q{parsed.bits}", f"{w}_scales")
    return names if parsed.symmetric else (*names, f"{w}_zero_points")


def _optional_names(w: str, fmt: str) -> tuple[str, ...]:
    """Tensors a weight of `fmt` holds only in some graphs (outlier channels, a Gelu input's
    shift)."""
    if fmt == ROWWISE_FORMAT:
        return tuple(w + a for a in _OUTLIER_AUX + _GELU_AUX)
    return tuple(w + a for a in _TABLE_OUTLIER_AUX + _OUTLIER_AUX) \
        if isinstance(parse_format(fmt), NBits) else ()


def tensor_bytes(t: TensorProto) -> int:
    """Bytes of an initializer's data, from its shape and type (never materialized)."""
    if t.data_location == TensorProto.EXTERNAL:
        return int(next(e.value for e in t.external_data if e.key == "length"))
    return math.prod(t.dims) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def storage_records(model: onnx.ModelProto, kind: Kind | None,
                    layer: int | None = None) -> list[TensorStorage]:
    """How each initializer of an unquantized graph is stored: as it is (what quantize_graph
    reports for the fp32 recipe, without rewriting the graph). `kind` None: no roles (the
    all-experts peer graph, whose weights no recipe knows)."""
    weights: dict[str, _Weight] = {}
    if kind is not None:
        weights = {w.name: w for w in _classify(model, _node_names(model), kind, RECIPES["fp32"],
                                                layer)}
    out = []
    for t in model.graph.initializer:
        w = weights.get(t.name)
        fmt = ("fp32" if t.data_type == TensorProto.FLOAT
               else helper.tensor_dtype_to_np_dtype(t.data_type).name)
        out.append(TensorStorage(t.name, tuple(t.dims), fmt, tensor_bytes(t),
                                 w.role if w else None, w.layer if w else None))
    return out


def quantize_graph(model: onnx.ModelProto, recipe: Recipe, kind: Kind,
                   layer: int | None = None,
                   input_norm: tuple[np.ndarray, np.ndarray] | None = None
                   ) -> tuple[onnx.ModelProto, list[TensorStorage]]:
    """Quantize one bundle graph (an expert's, or a dense segment's) according to `recipe`.

    `model` is not modified. `layer` is the MoE layer of an expert graph (for per-layer
    overrides); segment weights carry their layer in their names. `input_norm` is the (gain,
    bias) of the LayerNorm whose output an expert graph's input is (its layer's norm1, in another
    graph): int8-rowwise keeps the outlier channels it names in fp32; a segment's LayerNorms are
    read from the graph itself. Returns the new graph and one TensorStorage per initializer of
    `model` (their bytes add up to the new graph's initializers).
    """
    if kind not in ("expert", "segment"):
        raise RecipeError(f"kind must be 'expert' or 'segment', got {kind!r}")
    recipe.validate()
    node_names = _node_names(model)
    weights = _classify(model, node_names, kind, recipe, layer)
    by_name = {w.name: w for w in weights}
    originals = [(i.name, tuple(i.dims), i.data_type) for i in model.graph.initializer]
    tables = {w.name: w for w in weights if w.op == "Gather"}
    m = _copy_without(model, set(tables))
    for node, name in zip(m.graph.node, node_names, strict=True):
        node.name = name  # ORT's quantizers select nodes by name; the exporter leaves them unnamed

    with _quiet_ort_logging():
        for fmt, per_channel in DYNAMIC_FORMATS.items():
            nodes = [w.node for w in weights if w.fmt == fmt]
            if nodes:
                m = _dynamic_int8(m, nodes, per_channel)
        nbits = sorted({w.fmt for w in weights if w.op == "MatMul" and
                        isinstance(parse_format(w.fmt), NBits)})
        fp32_added = _nbits_outliers(m, [w for w in weights if w.op == "MatMul" and w.fmt in nbits],
                                     _norms(m, input_norm)) if nbits else []
        for fmt in nbits:
            mine = {w.node for w in weights if w.fmt == fmt and w.op == "MatMul"}
            others = [w.node for w in weights if w.op == "MatMul" and w.node not in mine]
            m = _matmul_nbits(m, others + fp32_added, parse_format(fmt), recipe.accuracy_level)
    rowwise = [w for w in weights if w.fmt == ROWWISE_FORMAT]
    if rowwise:
        _rowwise_int8(m, rowwise, _norms(m, input_norm))
    for t in model.graph.initializer:
        if t.name in tables:
            _put_table(m, tables[t.name], t)
    if any(w.fmt != "fp32" for w in weights):
        _ensure_ms_opset(m)

    stored = {i.name: i for i in m.graph.initializer}
    storage, claimed = [], set()
    for name, shape, dtype in originals:
        w = by_name.get(name)
        fmt = w.fmt if w else ("fp32" if dtype == TensorProto.FLOAT else
                               helper.tensor_dtype_to_np_dtype(dtype).name)
        names = _stored_names(name, fmt if w else "fp32")
        names += tuple(n for n in _optional_names(name, fmt if w else "fp32") if n in stored)
        absent = [n for n in names if n not in stored]
        if absent:
            raise RuntimeError(f"{m.graph.name}: after quantization, {name!r} ({fmt}) is missing "
                               f"{absent}: ONNX Runtime's quantizer output changed")
        claimed.update(names)
        storage.append(TensorStorage(name, shape, fmt, sum(tensor_bytes(stored[n]) for n in names),
                                     w.role if w else None, w.layer if w else None))
    extra = sorted(set(stored) - claimed)
    if extra:
        raise RuntimeError(f"{m.graph.name}: unaccounted initializers after quantization: {extra}")
    return m, storage


def storage_summary(records: list[TensorStorage]) -> dict[str, int]:
    """Bytes per storage format."""
    out: dict[str, int] = {}
    for r in records:
        out[r.format] = out.get(r.format, 0) + r.bytes
    return out
