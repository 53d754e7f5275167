"""int8 GEMMs rewritten, at load time, where this CPU's kernel would saturate.

ONNX Runtime multiplies uint8 activations by int8 weights, on x86 without VNNI (AVX2, or
AVX-512 without VNNI), with `vpmaddubsw`: it adds each pair of products in int16 with
saturation, and 255 x 127 x 2 does not fit. A bundle's int8-rowwise GEMMs
(`MatMulIntegerToFloat`: activations uint8 around 128, weights int8 up to +-127) then lose
accuracy on such a CPU (a test expert went from within its recipe's 4% to 5.9% max error). The
same weights stored as uint8 with zero point 128 give exactly the same integer sums, through
ORT's uint8 x uint8 kernel, which widens to int16 before it multiplies and cannot saturate. So
on such a CPU each of those GEMMs gets its weights rewritten so when its graph is loaded (the
vectors are then the ones a VNNI CPU computes); elsewhere the file is loaded as it is.
"""

from __future__ import annotations

import mmap
import os
import platform
from pathlib import Path

import numpy as np

VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}  # exact int8 dot products (vpdpbusd, AMX)
OP = "MatMulIntegerToFloat"
B_ZERO_POINT = 5  # MatMulIntegerToFloat's inputs: A, B, a_scale, b_scale, a_zp, b_zp, bias


def cpu_flags() -> set[str]:
    """The first CPU's flags in /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def saturates(flags: set[str] | None = None, machine: str | None = None) -> bool:
    """Whether ORT's uint8 x int8 kernel may saturate here: an x86 CPU without VNNI (where the
    flags cannot be read, assume it may: the rewrite is exact either way)."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    return not (VNNI_FLAGS & (cpu_flags() if flags is None else flags))


def widen_int8_weights(model) -> int:
    """Rewrite `model` (an onnx.ModelProto) in place: every MatMulIntegerToFloat whose weights
    are an int8 initializer with no zero point gets them as uint8 + 128, zero point 128.
    Returns how many GEMMs were rewritten."""
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    done = 0
    for node in model.graph.node:
        if node.op_type != OP or len(node.input) < 2 or node.input[1] not in inits:
            continue
        weights = inits[node.input[1]]
        has_zp = len(node.input) > B_ZERO_POINT and node.input[B_ZERO_POINT]
        if weights.data_type != TensorProto.INT8 or has_zp:
            continue
        widened = (numpy_helper.to_array(weights).astype(np.int16) + 128).astype(np.uint8)
        weights.CopyFrom(numpy_helper.from_array(widened, weights.name))
        zp_name = f"{weights.name}_zero_point_u8"
        if zp_name not in inits:
            zp = numpy_helper.from_array(np.asarray(128, dtype=np.uint8), zp_name)
            model.graph.initializer.append(zp)
            inits[zp_name] = zp
        while len(node.input) <= B_ZERO_POINT:
            node.input.append("")
        node.input[B_ZERO_POINT] = zp_name
        done += 1
    return done


def _names_the_op(path: Path) -> bool:
    """Whether the file holds the op's name at all: a byte search of the mapped file, so that a
    graph without int8 GEMMs (every graph of an fp32 bundle) is never parsed here."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return False
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return m.find(OP.encode()) >= 0


def graph_source(path: Path, saturating: bool | None = None) -> str | bytes:
    """What to hand ORT for the graph at `path`: the path itself, or, where the CPU saturates
    and the graph holds int8 GEMMs, the rewritten graph's bytes."""
    if not (saturates() if saturating is None else saturating) or not _names_the_op(path):
        return str(path)
    import onnx

    model = onnx.load(str(path))
    if not widen_int8_weights(model):
        return str(path)
    return model.SerializeToString()
