"""moe-embed benchmarks against the peers, in one run. Not part of the test suite.

    .venv/bin/python benchmarks/bench.py [--quick] [--only W1,W3,torch,...] [--out DIR]

Builds (or reuses) the `full` synthetic checkpoint and its routed and all-experts bundles,
measures this machine's sgemm peak and read bandwidth, then times W1-W5 for the in-process
routed runtime, the all-experts ONNX graph, the PyTorch eager reference and the gRPC service,
on the same token ids with the same thread count. Writes bench.json, RESULTS.md and
ratios.png. Run it on a quiet machine: other work halves every figure.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"
WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "RSS")
PEER_NAMES = ("routed", "all-experts", "torch", "llama.cpp", "service")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2-3 minute smoke run (smaller inputs, "
                   "fewer repetitions; writes under OUT/quick unless --out is given)")
    p.add_argument("--only", default="", help="comma list of workloads (W1..W5, RSS) and/or "
                   "peers (routed, all-experts, torch, llama.cpp, service); default everything "
                   "(llama.cpp only where `make llama-peer` has installed it)")
    p.add_argument("--out", type=Path, default=None, help=f"results folder (default {DEFAULT_OUT})")
    p.add_argument("--cache", type=Path, default=None, help="checkpoint/bundle cache (default "
                   "$MOE_EMBED_BENCH_CACHE or ~/.cache/moe-embed/bench)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="threads for every peer (default: all usable cores)")
    args = p.parse_args(argv)
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    unknown = only - set(WORKLOADS) - set(PEER_NAMES)
    if unknown:
        p.error(f"--only: unknown {sorted(unknown)}; choose from {WORKLOADS + PEER_NAMES}")
    args.workloads = [w for w in WORKLOADS if w in only] or list(WORKLOADS)
    args.peers = [x for x in PEER_NAMES if x in only] or list(PEER_NAMES)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # numpy's BLAS gets the same thread count
    from runner import run  # heavy imports only after the thread variables are set

    return run(args, DEFAULT_OUT)


if __name__ == "__main__":
    sys.exit(main())
