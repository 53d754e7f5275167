"""Quantized kernels on this model's shapes: time, speedup vs fp32, output error, bytes per weight.

    .venv/bin/python benchmarks/quant_kernels.py [--quick] [--sym] [--only gemm] [--json OUT]

Weights go through export/quantize.py (the recipes' own code path), sessions run on ONNX Runtime's
global thread pool with the product's session options (workers/sessions.py: one shared pool,
shared arena, ORT_ENABLE_ALL), 2 threads unless --threads. Prints:

1. per shape (the expert 768->3072->768 with Gelu; the dense linears qkv 768x2304, out_proj
   768x768, fc1 768x3072, fc2 3072x768, each MatMul + bias) and rows M: the median time per call
   of every variant and its speedup over fp32, all variants interleaved in one loop so ratios are
   side by side; output error vs fp32 at M=64 (max-abs error over the fp32 output's max-abs, and
   cosine); whether a row's output is the same alone, in the M=64 call and beside louder rows
   (bit for bit: "row-invariant"); bytes per weight; the ops ORT runs after graph optimization.
2. GatherBlockQuantized on a 250048 x 768 table vs fp32 Gather (16 and 4096 ids): time,
   reconstruction error, bytes per weight.

Inputs are realistic in distribution: N(0,1) (LayerNorm outputs) for every linear but fc2, whose
input is gelu(N(0,1)); weights N(0, 1/fan_in) as in the synthetic checkpoints. Timings are only
meaningful on a quiet machine: the load average and CPU flags are printed first. ~1.5 minutes
on a quiet 2-core machine (3-4 under load).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from moe_embed.export.onnx_graphs import IR_VERSION, OPSET, expert_graph
from moe_embed.export.quantize import RECIPES, Recipe, quantize_graph
from moe_embed.workers.runtime.int8_gemm import widen_int8_weights
from moe_embed.workers.runtime.sessions import init_thread_pool, session_options

H, F, V = 768, 3072, 250048
LINEARS = {  # name: (K, N, role)
    "qkv": (H, 3 * H, "attn.Wqkv"),
    "out_proj": (H, H, "attn.out_proj"),
    "fc1": (H, F, "mlp.fc1"),
    "fc2": (F, H, "mlp.fc2"),
}
ROWS = (1, 4, 16, 64, 512)
ERROR_ROWS = 64


# ---------------------------------------------------------------- machine & session setup

def session(model: onnx.ModelProto, threads: int, optimized: Path | None = None):
    """With the product's session options (workers/runtime/sessions.py): ORT's global pool
    (no per-session spinning threads), a shared arena, every graph optimization on."""
    init_thread_pool(threads)
    so = session_options()
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- graphs and variants

def linear_graph(name: str, w: np.ndarray, b: np.ndarray, role: str) -> onnx.ModelProto:
    """x [M, K] -> MatMul(x, W^T) + b, named as the exporter names a segment's weights."""
    k, n = w.shape
    wn, bn = f"encoder.layers.0.{role}.weight.T", f"encoder.layers.0.{role}.bias"
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", wn], ["mm"]), helper.make_node("Add", ["mm", bn], ["y"])],
        name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", n])],
        [onnx.numpy_helper.from_array(w, wn), onnx.numpy_helper.from_array(b, bn)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = IR_VERSION
    return m


U8U8 = "int8-rowwise u8u8"


def uniform(name: str, fmt: str, accuracy_level: int = 4) -> Recipe:
    """Every role in `fmt` (the table stays fp32 under the MatMul-only dynamic formats)."""
    formats = {r: fmt for r in RECIPES["fp32"].formats}
    if fmt.startswith("int8-"):
        formats["word_embeddings"] = "fp32"
    return Recipe(name, formats, accuracy_level=accuracy_level).validate()


def variants(quick: bool, sym: bool = False) -> list[tuple[str, Recipe]]:
    out = [("fp32", RECIPES["fp32"]),
           ("int8-rowwise", uniform("rw", "int8-rowwise")),
           # as a worker loads it on x86 without VNNI (workers/runtime/int8_gemm.py)
           (U8U8, uniform("rw", "int8-rowwise")),
           ("dyn-int8 per-channel", uniform("dyn-pc", "int8-per-channel")),
           ("dyn-int8 per-tensor", uniform("dyn-pt", "int8-per-tensor"))]
    blocks = (32,) if quick else (32, 64, 128)
    for bits in (8, 4):
        for block in blocks:
            for acc in (0, 4):
                out.append((f"nbits{bits} b{block} acc{acc}",
                            uniform(f"nb{bits}", f"nbits{bits}-block{block}", acc)))
            if sym:  # symmetric (no zero points): the int8 recipe's fc1/fc2 and overrides
                out.append((f"nbits{bits} b{block} sym acc4",
                            uniform(f"nb{bits}s", f"nbits{bits}-block{block}-sym", 4)))
    return out


def fused_ops(model: onnx.ModelProto, threads: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "opt.onnx"
        session(model, threads, path)
        ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    return "+".join(ops)


def timed(sessions: dict, feeds: dict, budget_s: float, rounds: int = 5) -> dict[str, float]:
    """Median ms per call; variants interleaved round by round so they share the machine's
    state (turbo, other load) as evenly as possible."""
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():  # warm: arena growth, prepacked weights
        s.run(None, feeds)
        s.run(None, feeds)
    per_round = budget_s / rounds
    for _ in range(rounds):
        for name, s in sessions.items():
            t_end = time.perf_counter() + per_round
            n = 0
            while n < 3 or (time.perf_counter() < t_end and n < 200):
                t0 = time.perf_counter()
                s.run(None, feeds)
                samples[name].append(time.perf_counter() - t0)
                n += 1
    return {k: 1e3 * statistics.median(v) for k, v in samples.items()}


def errors(y: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    rel = float(np.abs(y - ref).max() / np.abs(ref).max())
    a, b = y.ravel().astype(np.float64), ref.ravel().astype(np.float64)
    return rel, float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------- the two benchmarks

def bench_shape(label: str, model: onnx.ModelProto, kind: str, k_in: int, gelu_input: bool,
                vs: list[tuple[str, Recipe]], threads: int, budget_s: float,
                rng: np.random.Generator) -> list[dict]:
    sessions, info = {}, {}
    for name, recipe in vs:
        q, storage = quantize_graph(model, recipe, kind)
        if name == U8U8:
            widen_int8_weights(q)
        weights = [s for s in storage if s.role]
        numel = sum(int(np.prod(s.shape)) for s in weights)
        sessions[name] = session(q, threads)
        info[name] = {"bytes_per_weight": sum(s.bytes for s in weights) / numel,
                      "ops": fused_ops(q, threads)}
    z = rng.standard_normal((max(ROWS), k_in)).astype(np.float32)
    x_all = torch.nn.functional.gelu(torch.from_numpy(z)).numpy() if gelu_input else z
    ref = sessions["fp32"].run(None, {"x": x_all[:ERROR_ROWS]})[0]
    for name, s in sessions.items():
        y = s.run(None, {"x": x_all[:ERROR_ROWS]})[0]
        info[name]["err"], info[name]["cos"] = errors(y, ref)
        # row-invariant: rows 0..3 alone, and beside 4x louder rows, equal their M=64 result
        loud = np.concatenate([4 * x_all[ERROR_ROWS:ERROR_ROWS + 5], x_all[:4]])
        info[name]["row_invariant"] = bool(
            all(np.array_equal(s.run(None, {"x": x_all[i:i + 1]})[0], y[i:i + 1])
                for i in range(4)) and np.array_equal(s.run(None, {"x": loud})[0][5:], y[:4]))
    rows = []
    for m in ROWS:
        t = timed(sessions, {"x": np.ascontiguousarray(x_all[:m])}, budget_s)
        for name in sessions:
            rows.append({"shape": label, "M": m, "variant": name, "ms": t[name],
                         "speedup": t["fp32"] / t[name], **info[name]})
    return rows


def print_shape(rows: list[dict]) -> None:
    label = rows[0]["shape"]
    names = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["variant"], r["M"]): r for r in rows}
    print(f"\n### {label}")
    head = "| variant | B/weight | " + " | ".join(f"M={m} ms (x)" for m in ROWS) + \
        f" | err@{ERROR_ROWS} | cos@{ERROR_ROWS} | row-invariant | ops after ORT optimization |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for n in names:
        r0 = by[(n, ROWS[0])]
        cells = " | ".join(f"{by[(n, m)]['ms']:.3f} ({by[(n, m)]['speedup']:.2f})" for m in ROWS)
        print(f"| {n} | {r0['bytes_per_weight']:.3f} | {cells} | {r0['err']:.2e} | "
              f"{r0['cos']:.6f} | {'yes' if r0['row_invariant'] else 'NO'} | {r0['ops']} |")
    sys.stdout.flush()


def bench_table(threads: int, budget_s: float, rng: np.random.Generator, quick: bool) -> list[dict]:
    table = rng.standard_normal((V, H), dtype=np.float32)
    g = helper.make_graph(
        [helper.make_node("Gather", ["word_embeddings", "ids"], ["y"], axis=0)], "table",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", H])],
        [onnx.numpy_helper.from_array(table, "word_embeddings")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    del table
    fmts = ["fp32"] + [f"nbits{b}-block{k}" for b in (8, 4) for k in ((32,) if quick
                                                                      else (32, 64, 128))]
    sessions, info = {}, {}
    for fmt in fmts:
        t0 = time.perf_counter()
        q, storage = quantize_graph(model, uniform(fmt, fmt), "segment")
        qs = time.perf_counter() - t0
        sessions[fmt] = session(q, threads)
        info[fmt] = {"bytes_per_weight": storage[0].bytes / (V * H), "quantize_s": qs,
                     "MiB": storage[0].bytes / 2**20}
        del q
    ids = {n: rng.integers(0, V, size=n).astype(np.int64) for n in (16, 4096)}
    ref = sessions["fp32"].run(None, {"ids": ids[4096]})[0]
    for fmt, s in sessions.items():
        info[fmt]["err"], info[fmt]["cos"] = errors(s.run(None, {"ids": ids[4096]})[0], ref)
    out = []
    times = {n: timed(sessions, {"ids": ids[n]}, budget_s) for n in ids}
    print("\n### Word-embedding table 250048 x 768: Gather vs GatherBlockQuantized")
    print("| variant | B/weight | MiB | quantize s | 16 ids ms (x) | 4096 ids ms (x) | err | cos |")
    print("|---|---|---|---|---|---|---|---|")
    for fmt in fmts:
        i = info[fmt]
        cells = " | ".join(f"{times[n][fmt]:.3f} ({times[n]['fp32'] / times[n][fmt]:.2f})"
                           for n in ids)
        print(f"| {fmt} | {i['bytes_per_weight']:.3f} | {i['MiB']:.1f} | {i['quantize_s']:.1f} | "
              f"{cells} | {i['err']:.2e} | {i['cos']:.6f} |")
        out.append({"shape": "table", "variant": fmt, **i,
                    **{f"ms_{n}": times[n][fmt] for n in ids}})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=0.12, help="seconds per (variant, shape, M)")
    ap.add_argument("--quick", action="store_true", help="block 32 only, shorter runs")
    ap.add_argument("--only", choices=("gemm", "table"), default=None)
    ap.add_argument("--sym", action="store_true",
                    help="also each block size symmetric (accuracy level 4)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.quick:
        a.budget = min(a.budget, 0.04)
    from machine import cpu_isa

    model, flags = cpu_isa()
    one, five, _ = os.getloadavg()
    print(f"# Quantized kernels: {model}, {os.cpu_count()} cores, flags {' '.join(flags)}")
    print(f"# onnxruntime {ort.__version__}, onnx {onnx.__version__}, {a.threads} threads "
          f"(global pool), load average before: {one:.2f} / {five:.2f}")
    print("# x = speedup vs fp32 in the same interleaved loop; err = max|y-y32|/max|y32|; "
          "B/weight = stored bytes (data+scales+zero points) per weight")
    t_start = time.perf_counter()
    rng = np.random.default_rng(0)
    vs = variants(a.quick, a.sym)
    results: list[dict] = []
    if a.only in (None, "gemm"):
        w1 = (rng.standard_normal((F, H), dtype=np.float32) / H**0.5)
        w2 = (rng.standard_normal((F, H), dtype=np.float32) / F**0.5)
        rows = bench_shape("expert 768->3072->768 (Gelu)", expert_graph(w1, w2, "expert"),
                           "expert", H, False, vs, a.threads, a.budget, rng)
        print_shape(rows)
        results += rows
        for name, (k, n, role) in LINEARS.items():
            w = (rng.standard_normal((k, n), dtype=np.float32) / k**0.5)
            b = (0.1 * rng.standard_normal(n)).astype(np.float32)
            rows = bench_shape(f"{name} {k}x{n} (+bias)", linear_graph(name, w, b, role),
                               "segment", k, name == "fc2", vs, a.threads, a.budget, rng)
            print_shape(rows)
            results += rows
    if a.only in (None, "table"):
        results += bench_table(a.threads, a.budget, rng, a.quick)
    one, five, _ = os.getloadavg()
    print(f"\n# load average after: {one:.2f} / {five:.2f}; {time.perf_counter() - t_start:.0f} s")
    if a.json:
        a.json.write_text(json.dumps({"cpu": model, "flags": flags, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
