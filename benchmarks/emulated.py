"""Run a benchmark script on an emulated AVX2-only CPU, for figures that depend on the
instruction set (quality, bit patterns), never for speed.

    .venv/bin/python benchmarks/emulated.py SCRIPT [ARGS...]
    .venv/bin/python benchmarks/emulated.py quant_recipes.py --checkpoint full:seed=1 \\
        --recipes shipped-int8,shipped-int4 --out FILE.json

Why: ONNX Runtime picks its GEMM kernels from CPUID, and the int8 ones round differently on
each kind of x86 (AVX2, AVX-512 with VNNI, AMX), so a quality target has to hold on each kind,
but a session runs on whatever machine it is given. qemu-user (Debian's `qemu-user`) runs
this same Python and ONNX Runtime under its TCG emulator with `-cpu max`, which offers
AVX/AVX2/FMA and no AVX-512 or VNNI (QEMU 7.2): MLAS then takes the kernels an AVX2-only server
runs, bit for bit (integer arithmetic is exact and floats are IEEE in the emulator too), about
10-30x slower.

One thing is set right inside the emulator: qemu-user shows the host's /proc/cpuinfo, where the
worker reads whether int8 dot products are exact (workers/runtime/int8_gemm.py, `cpu_flags`),
so there the flags come from CPUID instead, as numpy's dispatcher reads them (the same CPUID
and XCR0 bits MLAS reads). The script then runs as `__main__` with its own arguments.
"""

from __future__ import annotations

import os
import runpy
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MARK = "MOE_EMBED_EMULATED_CPU"
QEMU_CPU = "max"
# numpy's CPUID feature names -> /proc/cpuinfo's flag names, for the flags int8_gemm reads
FLAGS = {"AVX2": "avx2", "FMA3": "fma", "F16C": "f16c", "AVX512F": "avx512f",
         "AVX512BW": "avx512bw", "AVX512VL": "avx512vl", "AVX512VNNI": "avx512_vnni",
         "AVX512BF16": "avx512_bf16"}


def cpuid_flags() -> set[str]:
    """This process's CPU flags as CPUID reports them (inside qemu: the emulated CPU's)."""
    from numpy._core._multiarray_umath import __cpu_features__

    return {flag for name, flag in FLAGS.items() if __cpu_features__.get(name)}


def _inside(script: str, args: list[str]) -> None:
    from moe_embed.workers.runtime import int8_gemm

    flags = cpuid_flags()
    if "avx512f" in flags:
        raise SystemExit(f"the emulated CPU offers AVX-512 ({sorted(flags)}): not an AVX2 run")
    int8_gemm.cpu_flags = lambda: set(flags)
    print(f"[emulated] qemu -cpu {QEMU_CPU}: CPUID flags {' '.join(sorted(flags))}; int8 "
          f"dot products saturate: {int8_gemm.saturates()}", flush=True)
    path = Path(script) if Path(script).is_file() else HERE / script
    sys.argv = [str(path), *args]
    sys.path.insert(0, str(path.parent))
    runpy.run_path(str(path), run_name="__main__")


def main() -> int:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    if os.environ.get(MARK):
        _inside(sys.argv[1], sys.argv[2:])
        return 0
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        raise SystemExit("qemu-x86_64 not found: apt-get install qemu-user")
    os.execve(qemu, [qemu, "-cpu", QEMU_CPU, sys.executable, __file__, *sys.argv[1:]],
              {**os.environ, MARK: "1"})
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
