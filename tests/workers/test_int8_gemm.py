"""int8 GEMMs exact on every CPU (workers/runtime/int8_gemm.py): a bundle's MatMulIntegerToFloat
(uint8 activations, int8 weights) must give the exact integer sums, also where ORT's uint8 x
int8 kernel adds pairs of products in int16 with saturation (x86 without VNNI)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from moe_embed.workers.runtime import int8_gemm
from moe_embed.workers.runtime.sessions import create_session, init_thread_pool, session_options

K, N, ROWS = 64, 16, 8


def _gemm(weights: np.ndarray) -> onnx.ModelProto:
    """y = (a - 128) @ weights, as a bundle's int8-rowwise GEMM holds it (scales of 1)."""
    inits = [numpy_helper.from_array(weights, "w"),
             numpy_helper.from_array(np.ones(N, np.float32), "w_scale"),
             numpy_helper.from_array(np.asarray(1.0, np.float32), "a_scale"),
             numpy_helper.from_array(np.asarray(128, np.uint8), "a_zp")]
    node = helper.make_node("MatMulIntegerToFloat", ["a", "w", "a_scale", "w_scale", "a_zp"],
                            ["y"], domain="com.microsoft")
    graph = helper.make_graph([node], "gemm",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [ROWS, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, N])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


def _worst_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activations at 0 and 255 and weights at +-127, where every pair of products overflows
    int16; and their exact product."""
    rng = np.random.default_rng(0)
    a = rng.choice(np.asarray([0, 255], np.uint8), size=(ROWS, K))
    w = rng.choice(np.asarray([-127, 127], np.int8), size=(K, N))
    exact = (a.astype(np.int64) - 128) @ w.astype(np.int64)
    return a, w, exact.astype(np.float32)  # |sums| < 2^24: exact in float32


def _run(model: onnx.ModelProto | str, a: np.ndarray) -> np.ndarray:
    """`model` as it is (no rewrite), with the worker's session options."""
    source = model if isinstance(model, str) else model.SerializeToString()
    init_thread_pool()
    sess = ort.InferenceSession(source, session_options(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"a": a})[0]


def test_widened_weights_give_the_exact_sums() -> None:
    a, w, exact = _worst_case()
    model = _gemm(w)
    assert int8_gemm.widen_int8_weights(model) == 1
    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert stored["w"].dtype == np.uint8 and stored["w_zero_point_u8"] == 128
    np.testing.assert_array_equal(_run(model, a), exact)
    assert int8_gemm.widen_int8_weights(model) == 0  # weights with a zero point: left alone


def test_a_worker_session_is_exact_on_this_cpu(tmp_path) -> None:
    """Through the worker's own session loader, whatever this CPU's int8 kernel: where it
    saturates (here: AMD EPYC, AVX2 only, the file as it is gives sums off by thousands) the
    loader rewrites the weights; elsewhere the file is exact as it is."""
    a, w, exact = _worst_case()
    path = tmp_path / "gemm.onnx"
    onnx.save(_gemm(w), str(path))
    got = create_session(path).run(None, {"a": a})[0]
    np.testing.assert_array_equal(got, exact)
    if int8_gemm.saturates():
        assert not np.array_equal(_run(str(path), a), exact)  # the kernel really saturates


def test_which_cpus_saturate() -> None:
    assert int8_gemm.saturates({"avx2", "fma"}, "x86_64")
    assert int8_gemm.saturates({"avx512f", "avx512bw"}, "x86_64")  # AVX-512 without VNNI
    assert not int8_gemm.saturates({"avx2", "avx512_vnni"}, "x86_64")
    assert not int8_gemm.saturates({"avx2", "avx_vnni"}, "AMD64")
    assert not int8_gemm.saturates({"amx_int8"}, "x86_64")
    assert not int8_gemm.saturates(set(), "aarch64")  # sdot/udot: no int16 pairs
    assert int8_gemm.saturates(set(), "x86_64")  # flags unknown: rewrite (exact either way)


def test_graphs_without_int8_gemms_are_loaded_from_their_file(tmp_path) -> None:
    """A graph that does not even name the op (every fp32 graph) is never parsed; one that
    does is rewritten only where the CPU saturates."""
    path = tmp_path / "plain.onnx"
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "plain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert int8_gemm.graph_source(path, saturating=True) == str(path)
    assert int8_gemm.graph_source(path, saturating=False) == str(path)
    a, w, _ = _worst_case()
    onnx.save(_gemm(w), str(tmp_path / "gemm.onnx"))
    assert isinstance(int8_gemm.graph_source(tmp_path / "gemm.onnx", saturating=True), bytes)
    assert int8_gemm.graph_source(tmp_path / "gemm.onnx", saturating=False) == \
        str(tmp_path / "gemm.onnx")
