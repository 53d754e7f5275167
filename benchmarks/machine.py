"""This machine, measured in the same run: sgemm peak, streaming read bandwidth, load, versions."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from moe_embed.testing import procfs

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("moe-embed", "torch", "onnxruntime", "onnx", "numpy", "grpcio", "tokenizers",
            "protobuf", "matplotlib", "psutil")


def load_average() -> dict:
    one, five, fifteen = os.getloadavg()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"1m": one, "5m": five, "15m": fifteen, "uptime": uptime,
            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_isa() -> tuple[str, list[str]]:
    """The CPU's model name and which of the instruction sets that matter here it has (every
    report names them: kernels' speed differs between AVX2-only and AVX-512/VNNI machines)."""
    flags = procfs.cpu_flags()
    return procfs.cpu_model(), [f for f in ISA_FLAGS if f in flags]


def info() -> dict:
    """Hardware, software versions and the git commit this run measured."""
    import psutil

    cpu = ""
    with contextlib.suppress(OSError):
        cpu = procfs.cpu_model()
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = version(p)
        except PackageNotFoundError:
            versions[p] = None
    return {
        "cpu": cpu, "cores_logical": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(), "python": platform.python_version(),
        "versions": versions,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def _best(fn, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _ort_matmul_session(m: int, k: int, n: int, threads: int):
    """A one-node ONNX MatMul [m,k] @ const [k,n] on the process's shared ORT pool."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from moe_embed.workers.runtime.sessions import create_session

    b = numpy_helper.from_array(np.random.default_rng(1).standard_normal((k, n), np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])], "sgemm",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [m, n])], [b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "sgemm.onnx"
        onnx.save(model, str(path))
        return create_session(path, threads)


def sgemm_peak(threads: int, n: int = 2048, reps: int = 5) -> dict:
    """Best GFLOPS of an fp32 n^3 matmul in numpy, torch and ONNX Runtime with `threads`."""
    flops = 2.0 * n**3
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), np.float32)
    b = rng.standard_normal((n, n), np.float32)
    out = {}
    out["numpy"] = flops / _best(lambda: a @ b, reps) / 1e9
    torch.set_num_threads(threads)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    out["torch"] = flops / _best(lambda: ta @ tb, reps) / 1e9
    sess = _ort_matmul_session(n, n, n, threads)
    out["onnxruntime"] = flops / _best(lambda: sess.run(None, {"A": a}), reps) / 1e9
    return {"n": n, "threads": threads, "gflops_by_library": out,
            "peak_gflops": max(out.values())}


def ort_linear_gflops(cfg, threads: int, tokens: int = 4096, reps: int = 3) -> dict:
    """GFLOPS of ONNX Runtime's own MatMul on this model's linear-layer shapes at `tokens` rows,
    FLOP-weighted by how often a token meets each shape: the best a runtime built on ORT's CPU
    kernels can reach on W2/W3, whatever it does around them."""
    h, f, k = cfg.n_embd, cfg.n_inner, cfg.moe_top_k
    n_moe, n_dense = len(cfg.moe_layers), cfg.n_layer - len(cfg.moe_layers)
    ffn_per_token = n_dense + k * n_moe  # fc1/fc2 (or expert w1/w2) products per token
    shapes = [("attn.Wqkv", h, 3 * h, cfg.n_layer), ("attn.out_proj", h, h, cfg.n_layer),
              ("fc1 / expert w1", h, f, ffn_per_token), ("fc2 / expert w2", f, h, ffn_per_token)]
    rng = np.random.default_rng(2)
    rows, flops, seconds = [], 0.0, 0.0
    for name, k_in, n_out, count in shapes:
        sess = _ort_matmul_session(tokens, k_in, n_out, threads)
        a = rng.standard_normal((tokens, k_in), np.float32)
        t = _best(lambda sess=sess, a=a: sess.run(None, {"A": a}), reps)
        fl = 2.0 * tokens * k_in * n_out
        rows.append({"name": name, "k": k_in, "n": n_out, "per_token": count,
                     "gflops": fl / t / 1e9})
        flops, seconds = flops + fl * count, seconds + t * count
    return {"tokens": tokens, "threads": threads, "shapes": rows, "gflops": flops / seconds / 1e9}


def read_bandwidth(threads: int, gib: float = 1.0, reps: int = 7) -> dict:
    """Best GB/s of summing a `gib` GiB fp32 array with torch on `threads` threads."""
    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    nbytes = x.numel() * 4
    best = _best(x.sum, reps)
    del x
    return {"bytes": nbytes, "threads": threads, "gb_per_s": nbytes / best / 1e9}
