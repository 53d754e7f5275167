"""Quantization recipes (export/quantize.py) on small real graphs built by the exporter.

Every recipe's graphs must load in ONNX Runtime, stay within a measured tolerance of fp32, and
report exactly how each tensor is stored; a malformed recipe, or a graph with a weight the recipes
do not know, is refused with an error that names the problem.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from moe_embed.export.onnx_graphs import (
    expert_graph,
    expert_weights,
    plan_segments,
    segment_graph,
)
from moe_embed.export.quantize import (
    PRECISIONS,
    RECIPES,
    TABLE_FP16_SCALES_MAX_BITS,
    NBits,
    Recipe,
    RecipeError,
    TensorStorage,
    expected_bytes,
    get_recipe,
    parse_format,
    quantize_graph,
    quantize_table,
    storage_records,
)
from moe_embed.export.synthetic import upstream_config
from moe_embed.workers.bundle.config import expected_shapes, parse_config
from moe_embed.workers.runtime.int8_gemm import saturates, widen_int8_weights

# Small but every role present: 4 layers (MoE 1 and 3), H=128 so 32/64-blocks are whole and a
# 128-block table is one block per row; a 1000-row vocabulary keeps the table quick.
H, F, VOCAB = 128, 256, 1000
CFG = parse_config({**upstream_config("tiny"), "n_embd": H, "n_head": 4, "n_inner": F,
                    "vocab_size": VOCAB}, max_tokens=64)

# Per recipe: worst max-abs error relative to the fp32 output's max-abs, and worst cosine, over
# these graphs. Measured (seed 0, ORT 1.32, AVX-512 VNNI): int8 0.015 / 0.999914 (segment 0),
# int4 0.143 / 0.99355 (4-bit expert). Bounds: ~2.5x the error, 1-cos x5.
TOLERANCE = {"fp32": (1e-6, 1.0 - 1e-12), "int8": (0.04, 0.9995), "int4": (0.35, 0.968)}


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(CFG).items():
        t = torch.randn(shape, generator=g)
        if name.endswith(("norm1.weight", "norm2.weight")) or name == "emb_ln.weight":
            t = 1.0 + 0.1 * t
        elif name.endswith("bias"):
            t = 0.1 * t
        elif "embeddings" not in name:
            t = t / (shape[0] // CFG.num_experts if name.endswith("w2") else shape[-1]) ** 0.5
        out[name] = t
    return out


TENSORS = _tensors()
SEGMENTS = plan_segments(CFG)


def _layout(lengths: list[int]) -> dict[str, np.ndarray]:
    b, s = len(lengths), max(lengths)
    mask = np.zeros((b, s), dtype=np.int64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    real = np.flatnonzero(mask.reshape(-1))
    pad_index = np.zeros(b * s, dtype=np.int64)
    pad_index[real] = np.arange(real.size)
    return {"attention_mask": mask, "pad_index": pad_index, "unpad_index": real}


def _graphs() -> dict[str, tuple[onnx.ModelProto, str, int | None, dict]]:
    rng = np.random.default_rng(1)
    lay = _layout([9, 4])
    n = int(lay["unpad_index"].size)
    out = {}
    for seg in SEGMENTS:
        feeds = dict(lay) if seg.needs_mask else {}
        if seg.moe_residual is None:
            feeds["input_ids"] = rng.integers(0, VOCAB, n).astype(np.int64)
        else:
            feeds["hidden"] = rng.standard_normal((n, H)).astype(np.float32)
            feeds["moe_out"] = rng.standard_normal((n, H)).astype(np.float32)
        out[f"segment_{seg.index}"] = (segment_graph(CFG, seg, TENSORS), "segment", None, feeds)
    w1, w2 = expert_weights(CFG, TENSORS, 1)
    out["expert_l1_e0"] = (expert_graph(w1[0], w2[0], "l1_e0"), "expert", 1,
                           {"x": rng.standard_normal((7, H)).astype(np.float32)})
    return out


GRAPHS = _graphs()


_SHARED_POOL = [False]  # set once an earlier test has created ORT's process-wide pool (workers/)


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    """`model` run as a worker runs it: on a CPU whose uint8 x int8 kernel saturates, its int8
    GEMMs get the exact uint8 form first (workers/runtime/int8_gemm.py)."""
    if saturates():
        model = copy.deepcopy(model)
        widen_int8_weights(model)

    def session() -> ort.InferenceSession:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.use_per_session_threads = not _SHARED_POOL[0]
        return ort.InferenceSession(model.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])

    try:
        sess = session()
    except RuntimeError as exc:
        if _SHARED_POOL[0] or "global thread pool" not in str(exc):
            raise
        _SHARED_POOL[0] = True
        sess = session()
    return sess.run(None, feeds)[0]


def _init_bytes(model: onnx.ModelProto) -> int:
    return sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


@pytest.fixture(scope="module")
def quantized() -> dict:
    return {(r, g): quantize_graph(GRAPHS[g][0], RECIPES[r], GRAPHS[g][1], GRAPHS[g][2])
            for r in PRECISIONS for g in GRAPHS}


@pytest.mark.parametrize("graph", list(GRAPHS))
@pytest.mark.parametrize("precision", PRECISIONS)
def test_outputs_within_recipe_tolerance(quantized, precision: str, graph: str) -> None:
    model, _, _, feeds = GRAPHS[graph]
    q, _ = quantized[(precision, graph)]
    ref, y = _run(model, feeds), _run(q, feeds)
    assert y.shape == ref.shape and np.isfinite(y).all()
    rel = float(np.abs(y - ref).max() / np.abs(ref).max())
    a, b = y.ravel().astype(np.float64), ref.ravel().astype(np.float64)
    cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    max_rel, min_cos = TOLERANCE[precision]
    assert rel <= max_rel and cos >= min_cos, f"{precision} {graph}: rel {rel:.4f}, cos {cos:.6f}"


@pytest.mark.parametrize("graph", list(GRAPHS))
@pytest.mark.parametrize("precision", PRECISIONS)
def test_storage_records(quantized, precision: str, graph: str) -> None:
    model, kind, _, _ = GRAPHS[graph]
    q, records = quantized[(precision, graph)]
    recipe = RECIPES[precision]
    assert [r.name for r in records] == [t.name for t in model.graph.initializer]
    assert sum(r.bytes for r in records) == _init_bytes(q)  # every stored byte is accounted for
    for r, t in zip(records, model.graph.initializer, strict=True):
        assert isinstance(r, TensorStorage) and r.shape == tuple(t.dims)
        if r.role is None:
            assert r.format in ("fp32", "int64") and r.bytes == onnx.numpy_helper.to_array(t).nbytes
            continue
        assert r.format == recipe.format_for(r.role, r.layer)
        assert r.bytes == expected_bytes(r.format, r.shape, r.role), r
        assert r.to_dict()["shape"] == list(r.shape)
    roles = {r.role for r in records if r.role}
    if kind == "expert":
        assert roles == {"expert.w1", "expert.w2"}
    elif graph == "segment_0":
        assert roles == {"word_embeddings", "attn.qkv", "attn.out_proj", "mlp.fc1", "mlp.fc2"}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_graph_ops_match_records(quantized, precision: str) -> None:
    """The stored formats are what the graph really runs: op types and their attributes."""
    q, records = quantized[(precision, "segment_0")]
    by_format = {r.format for r in records if r.role}
    ops = {n.op_type: n for n in q.graph.node}
    attrs = {n.op_type: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in q.graph.node}
    table = next(r for r in records if r.role == "word_embeddings")
    if table.format == "fp32":
        assert "GatherBlockQuantized" not in ops
    else:
        spec = parse_format(table.format)
        a = attrs["GatherBlockQuantized"]
        assert ops["GatherBlockQuantized"].domain == "com.microsoft"
        assert (a["bits"], a["block_size"], a["quantize_axis"]) == (spec.bits, spec.block_size, 1)
    if any(f.startswith("int8-per-") for f in by_format):
        assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops
    if "int8-rowwise" in by_format:  # per-row activation scales, integer accumulation
        assert ops["MatMulIntegerToFloat"].domain == "com.microsoft"
        assert ops["QuantizeLinear"].input[1] != "" and "DynamicQuantizeLinear" not in ops
    for node in q.graph.node:
        if node.op_type == "MatMulNBits":
            a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
            assert f"nbits{a['bits']}-block{a['block_size']}" in {f.removesuffix("-sym")
                                                                   for f in by_format}
            assert a.get("accuracy_level", 0) == RECIPES[precision].accuracy_level
    rowwise = [n for n in q.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(rowwise) == sum(1 for r in records if r.format == "int8-rowwise")
    weight_matmuls = [n for n in q.graph.node if n.op_type == "MatMul"
                      and n.input[1] in {t.name for t in q.graph.initializer}]
    n_fp32 = sum(1 for r in records if r.role and r.role != "word_embeddings"
                 and r.format == "fp32")
    assert len(weight_matmuls) == n_fp32  # no weight MatMul skipped or quantized behind our back


def test_fp32_recipe_is_identity() -> None:
    model = GRAPHS["segment_1"][0]
    q, _ = quantize_graph(model, RECIPES["fp32"], "segment")
    assert [n.op_type for n in q.graph.node] == [n.op_type for n in model.graph.node]
    assert _init_bytes(q) == _init_bytes(model)


@pytest.mark.parametrize("graph", list(GRAPHS))
def test_storage_records_of_an_fp32_graph_match_the_fp32_recipe(quantized, graph: str) -> None:
    """What an fp32 bundle's manifest records (without rewriting its graphs) is what the
    identity recipe reports."""
    model, kind, layer, _ = GRAPHS[graph]
    assert storage_records(model, kind, layer) == quantized[("fp32", graph)][1]
    generic = storage_records(model, None)  # the all-experts graph: no roles
    assert [(r.name, r.bytes, r.role) for r in generic] == [
        (r.name, r.bytes, None) for r in quantized[("fp32", graph)][1]]


def test_input_graph_untouched_and_root_logger_kept() -> None:
    model = GRAPHS["segment_0"][0]
    before = model.SerializeToString()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quantize_graph(model, RECIPES["int4"], "segment")
    assert model.SerializeToString() == before
    assert root.handlers == handlers and root.level == level


def test_per_layer_override() -> None:
    recipe = Recipe("mixed", dict(RECIPES["int4"].formats),
                    {"layers.2.mlp.fc2": "fp32", "layers.1.expert.w2": "nbits8-block32"})
    _, records = quantize_graph(GRAPHS["segment_1"][0], recipe.validate(), "segment")
    fmt = {(r.role, r.layer): r.format for r in records if r.role}
    assert fmt[("mlp.fc2", 2)] == "fp32" and fmt[("mlp.fc1", 2)] == "int8-rowwise"
    _, records = quantize_graph(GRAPHS["expert_l1_e0"][0], recipe, "expert", layer=1)
    assert {r.role: r.format for r in records} == {"expert.w1": "nbits4-block32",
                                                   "expert.w2": "nbits8-block32"}


@pytest.mark.parametrize("spec", [NBits(8, 32, False), NBits(4, 32, False), NBits(4, 128, False),
                                  NBits(8, 64, True), NBits(4, 16, True)])
def test_table_layout_matches_gather_block_quantized(spec: NBits) -> None:
    """Dequantize the stored table by the op's documented layout (numpy, independent of ORT) and
    compare with what GatherBlockQuantized returns, and with the fp32 rows."""
    table = torch.randn(300, 96, generator=torch.Generator().manual_seed(3)).numpy()
    data, scales, zps = quantize_table(table, spec, rows_per_chunk=128)
    v, h = table.shape
    blocks = -(-h // spec.block_size)
    if spec.bits == 8:
        q = data.astype(np.float32)
        z = (zps.astype(np.float32) if zps is not None else np.full((v, blocks), 128.0))
    else:
        q = np.stack([data & 15, data >> 4], -1).reshape(v, h).astype(np.float32)
        z = (np.stack([zps & 15, zps >> 4], -1).reshape(v, -1)[:, :blocks].astype(np.float32)
             if zps is not None else np.full((v, blocks), 8.0))
    col_block = np.arange(h) // spec.block_size
    deq = (q - z[:, col_block]) * scales[:, col_block]
    # asymmetric: half a step of (max - min) / (2^bits - 1); symmetric: the far end of the range
    # may clip by up to one step of absmax / 2^(bits-1). Bounded here by each row's absmax.
    absmax = np.abs(table).max(axis=1, keepdims=True)
    bound = absmax / 2 ** (spec.bits - 1) if spec.symmetric else absmax / (2 ** spec.bits - 1)
    assert (np.abs(deq - table) <= bound * 1.001 + 1e-6).all()

    g = onnx.helper.make_graph(
        [onnx.helper.make_node("Gather", ["word_embeddings", "ids"], ["y"], axis=0)], "t",
        [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["n"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", h])],
        [onnx.numpy_helper.from_array(table, "word_embeddings")])
    model = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 20)])
    fmt = f"nbits{spec.bits}-block{spec.block_size}" + ("-sym" if spec.symmetric else "")
    recipe = Recipe("t", {**RECIPES["fp32"].formats, "word_embeddings": fmt}).validate()
    qm, records = quantize_graph(model, recipe, "segment")
    ids = np.array([0, 299, 17, 17, 150], dtype=np.int64)
    stored = next(t for t in qm.graph.initializer if t.name == "word_embeddings_scales")
    if spec.bits <= TABLE_FP16_SCALES_MAX_BITS:  # fp16 scales, the rows come out as fp16
        assert stored.data_type == onnx.TensorProto.FLOAT16
        s16 = scales.astype(np.float16).astype(np.float32)
        deq = ((q - z[:, col_block]) * s16[:, col_block]).astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(_run(qm, {"ids": ids}), deq[ids])
    else:
        assert stored.data_type == onnx.TensorProto.FLOAT
        np.testing.assert_allclose(_run(qm, {"ids": ids}), deq[ids], rtol=0, atol=1e-6)
    assert records[0].bytes == expected_bytes(fmt, (v, h), "word_embeddings")


@pytest.mark.parametrize("change, message", [
    (lambda d: d["formats"].pop("mlp.fc2"), "roles missing \\['mlp.fc2'\\]"),
    (lambda d: d["formats"].update({"mlp.fc3": "fp32"}), "unknown \\['mlp.fc3'\\]"),
    (lambda d: d["formats"].update({"mlp.fc1": "nbits3-block32"}), "unknown storage format"),
    (lambda d: d["formats"].update({"mlp.fc1": "nbits4-block48"}), "power of two"),
    (lambda d: d["formats"].update({"mlp.fc1": "int8-per-row"}), "unknown storage format"),
    (lambda d: d["formats"].update({"mlp.fc1": 8}), "must be a string"),
    (lambda d: d["formats"].update({"word_embeddings": "int8-per-channel"}),
     "embedding table takes"),
    (lambda d: d["overrides"].update({"layer.1.mlp.fc1": "fp32"}), "override 'layer.1.mlp.fc1'"),
    (lambda d: d["overrides"].update({"layers.1.mlp.fc9": "fp32"}), "known role"),
    (lambda d: d["overrides"].update({"layers.1.mlp.fc1": "nbits2-block32"}),
     "layers.1.mlp.fc1: unknown storage format"),
    (lambda d: d.update({"accuracy_level": 7}), "accuracy_level"),
    (lambda d: d.update({"bits": 4}), "unexpected \\['bits'\\]"),
    (lambda d: d.update({"formats": ["int8"]}), "mappings"),
])
def test_invalid_recipe_is_refused(change, message: str) -> None:
    raw = copy.deepcopy(RECIPES["int4"].to_dict())
    change(raw)
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(raw)


def test_recipe_round_trips_and_unknown_precision() -> None:
    for name in PRECISIONS:
        assert Recipe.from_dict(RECIPES[name].to_dict()) == RECIPES[name]
    with pytest.raises(RecipeError, match="precision must be one of"):
        get_recipe("int3")
    with pytest.raises(RecipeError, match="must be a mapping"):
        Recipe.from_dict("int8")


def test_graph_with_unknown_weight_is_refused() -> None:
    model = copy.deepcopy(GRAPHS["segment_1"][0])
    old = "encoder.layers.2.mlp.fc1.weight.T"
    for t in model.graph.initializer:
        if t.name == old:
            t.name = "encoder.layers.2.mlp.gate.weight.T"
    for n in model.graph.node:
        for i, x in enumerate(n.input):
            if x == old:
                n.input[i] = "encoder.layers.2.mlp.gate.weight.T"
    with pytest.raises(RecipeError, match="'encoder.layers.2.mlp.gate.weight.T' has no role"):
        quantize_graph(model, RECIPES["int8"], "segment")
    with pytest.raises(RecipeError, match="has no role in a segment graph"):
        quantize_graph(GRAPHS["expert_l1_e0"][0], RECIPES["int8"], "segment")
    with pytest.raises(RecipeError, match="kind must be"):
        quantize_graph(GRAPHS["expert_l1_e0"][0], RECIPES["int8"], "experts")  # type: ignore[arg-type]


def test_quantized_graph_is_refused_as_input(quantized) -> None:
    q, _ = quantized[("int4", "expert_l1_e0")]
    with pytest.raises(RecipeError, match="already quantized"):
        quantize_graph(q, RECIPES["int4"], "expert")


def test_rowwise_int8_is_the_documented_arithmetic() -> None:
    """int8-rowwise computes, per row r and column n, with q, c a weight's int8 columns and their
    scales (numpy, independent of ORT): on a LayerNorm-side input round(x[r] / s_r) . q[:, n] *
    c_n * s_r, s_r = max|x[r]| / 127; on a Gelu's output (expert.w2) round((x[r] + 0.17) / t_r)
    . q[:, n] * c_n * t_r - 0.17 * sum_k q[k, n] c_n, t_r = max(x[r] + 0.17) / 255. A zero row
    stays finite."""
    model, kind, layer, feeds = GRAPHS["expert_l1_e0"]
    recipe = Recipe("rw", {**RECIPES["int8"].formats, "expert.w1": "int8-rowwise",
                           "expert.w2": "int8-rowwise"}).validate()
    q, _ = quantize_graph(model, recipe, kind, layer)
    w1t = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "w1.T")
    w2 = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "w2")
    x = np.concatenate([feeds["x"], np.zeros((1, H), np.float32), 40 * feeds["x"][:2]])

    def columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = np.abs(w).max(axis=0) / 127
        return np.clip(np.rint(w / c), -127, 127), c

    qw1, c1 = columns(w1t)
    s = np.abs(x).max(axis=1, keepdims=True) / 127
    h = (np.rint(x / np.maximum(s, 1e-30)) @ qw1) * c1 * s
    g = 0.5 * h * (1 + torch.erf(torch.from_numpy(h / 2**0.5)).numpy())
    qw2, c2 = columns(w2)
    t = np.maximum((g + 0.17).max(axis=1, keepdims=True), 1e-30) / 255
    expected = (np.rint((g + 0.17) / t) @ qw2) * c2 * t - 0.17 * (qw2 * c2).sum(axis=0)
    got = _run(q, {"x": x})
    assert np.isfinite(got).all()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    assert np.abs(got[len(feeds["x"])]).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("fmt", ["int8-rowwise", "nbits4-block32", "nbits8-block32-sym"])
def test_outlier_channels_of_the_input_layer_norm_are_multiplied_in_fp32(fmt: str) -> None:
    """An expert whose input LayerNorm has 3 gains 30x the rest: int8-rowwise and MatMulNBits
    (whose accuracy level 4 quantizes activations per row or per block of a row) multiply those
    3 input channels in fp32 and zero them in the quantized product, so the row's or block's
    scale is no longer set by them; the error on inputs with such channels falls well below the
    plain graph's, every stored byte is still accounted for, and rows stay independent of their
    batch-mates."""
    model, kind, layer, feeds = GRAPHS["expert_l1_e0"]
    rng = np.random.default_rng(4)
    gain, bias = 1 + 0.1 * rng.standard_normal(H), 0.1 * rng.standard_normal(H)
    gain[[3, 50, 101]] *= 30
    x = (rng.standard_normal((40, H)) * gain + bias).astype(np.float32)
    recipe = Recipe("rw", {**RECIPES["int8"].formats, "expert.w1": fmt,
                           "expert.w2": "fp32"}).validate()
    kept, records = quantize_graph(model, recipe, kind, layer, (gain, bias))
    plain, _ = quantize_graph(model, recipe, kind, layer)
    assert sum(r.bytes for r in records) == _init_bytes(kept)
    index = next(onnx.numpy_helper.to_array(t) for t in kept.graph.initializer
                 if t.name == "w1.T_outlier_index")
    assert index.tolist() == [3, 50, 101]
    ref = _run(model, {"x": x})

    def err(q: onnx.ModelProto) -> float:
        return float(np.abs(_run(q, {"x": x}) - ref).max() / np.abs(ref).max())

    assert err(kept) < 0.5 * err(plain), (err(kept), err(plain))
    together = _run(kept, {"x": x})  # pairs of rows: a lone row is padded by the runtime
    assert all(np.array_equal(_run(kept, {"x": x[i:i + 2]}), together[i:i + 2])
               for i in (0, 17, 38))


@pytest.mark.parametrize("fmt", ["nbits4-block32", "nbits4-block16-sym", "nbits8-block32"])
def test_a_4bit_table_keeps_the_columns_its_layer_norm_makes_outliers_in_fp16(fmt: str) -> None:
    """Segment 0's shape: Gather(table) + token-type row -> LayerNorm whose gains are 30x on 2
    channels. At 4 bits those 2 columns come from an fp16 side table, exactly (one-hot MatMul
    and an Add of zeros), the blocks hold them as zeros, every stored byte is accounted for and
    a row is the same alone or among others; 8-bit tables and plain LayerNorms are left whole."""
    v, h, outliers = 300, 64, [5, 40]
    rng = np.random.default_rng(7)
    table = rng.standard_normal((v, h)).astype(np.float32)
    type0 = rng.standard_normal(h).astype(np.float32)
    gain, bias = (1 + 0.1 * rng.standard_normal(h)).astype(np.float32), np.zeros(h, np.float32)
    ids = np.array([3, 299, 17, 17, 0, 150], dtype=np.int64)
    for gains, expect_split in ((gain * np.where(np.isin(np.arange(h), outliers), 30, 1)
                                 .astype(np.float32), fmt.startswith("nbits4")), (gain, False)):
        nodes = [onnx.helper.make_node("Gather", ["word_embeddings", "ids"], ["g"], axis=0),
                 onnx.helper.make_node("Add", ["g", "type0"], ["x"]),
                 onnx.helper.make_node("LayerNormalization", ["x", "gain", "bias"], ["y"],
                                       axis=-1, epsilon=1e-5)]
        g = onnx.helper.make_graph(
            nodes, "t", [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["n"])],
            [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["n", h])
             for n in ("x", "y")],
            [onnx.numpy_helper.from_array(a, n) for a, n in (
                (table, "word_embeddings"), (type0, "type0"), (gains, "gain"), (bias, "bias"))])
        model = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 20)])
        recipe = Recipe("t", {**RECIPES["fp32"].formats, "word_embeddings": fmt}).validate()
        qm, records = quantize_graph(model, recipe, "segment")
        assert sum(r.bytes for r in records) == _init_bytes(qm)
        stored = {t.name: onnx.numpy_helper.to_array(t) for t in qm.graph.initializer}
        assert ("word_embeddings_outlier_columns" in stored) == expect_split
        x = _run(qm, {"ids": ids})  # the first output: the LayerNorm's input
        if expect_split:
            assert stored["word_embeddings_outlier_columns"].dtype == np.float16
            assert records[0].bytes == expected_bytes(fmt, (v, h), "word_embeddings") + 2 * v * 2 \
                + 4 * 2 * h
            exact = table[ids][:, outliers].astype(np.float16).astype(np.float32) + type0[outliers]
            assert np.array_equal(x[:, outliers], exact)
            rest = np.setdiff1d(np.arange(h), outliers)
            assert np.abs(x[:, rest] - (table[ids] + type0)[:, rest]).max() < 0.5
        else:
            assert records[0].bytes == expected_bytes(fmt, (v, h), "word_embeddings")
        assert all(np.array_equal(_run(qm, {"ids": ids[i:i + 1]}), x[i:i + 1])
                   for i in range(len(ids)))
