"""Script, not a test: how long ONNX Runtime's fp32 GEMMs alone take on W1, against the time a
W1 pass may take to meet issue 11's targets. Everything is measured side by side in one run.

    .venv/bin/python benchmarks/gemm_floor.py [--passes 3] [--threads 2] [--out FILE]

1. This machine's read bandwidth and sgemm peak (as `make bench` measures them).
2. W1 in process with the routed runtime (its routing gives each text's bytes and FLOPs, so the
   per-text bound max(bytes / bandwidth, FLOPs / peak)), and llama.cpp F32 on the same ids when
   `make llama-peer` has installed it.
3. The same W1 passes with every session of the runtime profiled by ONNX Runtime: the time
   spent inside its MatMul, Gemm and FusedMatMul kernels per pass. That is the floor of any
   W1 pass built on these kernels: no change to what runs between them (Python, routing,
   copies, small ops, the service hop) can bring a pass below it.
4. Two targets as pass times: llama.cpp's pass / 1.8 and the per-text bound / 0.6. A floor
   above a target means the target cannot be met with ONNX Runtime's fp32 GEMMs here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

GEMM_OPS = ("MatMul", "Gemm", "FusedMatMul")


def profiled_runtime(bundle, threads: int, prefix: str):
    """A routed Runtime whose every session is an ONNX Runtime-profiled copy."""
    import onnxruntime as ort

    from moe_embed.workers.runtime import sessions
    from moe_embed.workers.runtime.runtime import Runtime

    rt = Runtime(bundle, threads=threads)

    def profiled(rel: str):
        so = sessions.session_options()
        so.enable_profiling = True
        so.profile_file_prefix = prefix
        return ort.InferenceSession(str(rt.bundle.file(rel)), so,
                                    providers=["CPUExecutionProvider"])

    g = rt.bundle.manifest.graphs
    rt.segments = [(profiled(s.file), needs) for s, (_, needs) in zip(g.segments, rt.segments,
                                                                      strict=True)]
    rt.experts = {layer: [profiled(f) for f in files] for layer, files in g.experts.items()}
    return rt, [s for s, _ in rt.segments] + [s for ss in rt.experts.values() for s in ss]


def kernel_seconds(session_list) -> dict[str, float]:
    """Seconds inside each op type's kernels, summed over every profiled session."""
    out: dict[str, float] = defaultdict(float)
    for s in session_list:
        with open(s.end_profiling()) as f:
            for e in json.load(f):
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    out[e["args"]["op_name"]] += e["dur"] / 1e6
    return dict(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passes", type=int, default=3, help="timed passes of the profiled runtime")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = ap.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    import artifacts
    import inputs
    import machine
    import peers
    import workloads as wl
    from plan import FULL

    from moe_embed.service.tokenizer import Tokenizer
    from moe_embed.workers.runtime.runtime import pack

    art = artifacts.ensure(artifacts.default_cache())
    tok = Tokenizer.from_bundle(art.routed)
    ctx = wl.Context(cfg=art.routed.config, tok=tok, plan=FULL, w1=inputs.w1_set(tok),
                     short=inputs.short_set(tok), w2=[], w3=inputs.w3_corpus(tok, 8),
                     log=lambda m: None)
    report: dict = {"machine": machine.info(), "load_start": machine.load_average()}
    print(f"load at start: {report['load_start']['uptime']}", flush=True)
    bandwidth = machine.read_bandwidth(args.threads)["gb_per_s"]
    peak = machine.sgemm_peak(args.threads)["peak_gflops"]

    routed = peers.OrtPeer("routed", art.routed, args.threads)
    w1 = wl.w1_inprocess(ctx, routed)  # also records the routing each text took
    routed.close()
    bound_s = wl.w1_roofline(w1, peak, bandwidth)["roofline"]["bound_s"]
    llama_s = None
    if (why := peers.llama_available()) is None:
        llama = peers.LlamaCppPeer(str(art.checkpoint), args.threads)
        llama_s = wl.w1_inprocess(ctx, llama)["median_pass_s"]
        llama.close()
    else:
        print(f"llama.cpp peer skipped: {why}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        rt, session_list = profiled_runtime(art.routed, args.threads, str(Path(tmp) / "p"))
        packed = [pack([x]) for x in ctx.w1.ids]
        for p in packed:  # warm pass (profiled too: counted in the passes below)
            rt.embed(*p)
        t = time.perf_counter()
        for _ in range(args.passes):
            for p in packed:
                rt.embed(*p)
        profiled_pass_s = (time.perf_counter() - t) / args.passes
        kernels = kernel_seconds(session_list)
    per_pass = {op: s / (args.passes + 1) for op, s in kernels.items()}
    floor_s = sum(per_pass.get(op, 0.0) for op in GEMM_OPS)
    tokens = sum(len(x) for x in ctx.w1.ids)
    targets = {"per-text bound / 0.6": bound_s / 0.6}
    if llama_s is not None:
        targets["llama.cpp F32 pass / 1.8"] = llama_s / 1.8
    report.update({
        "texts": len(ctx.w1.ids), "tokens": tokens, "read_gb_per_s": bandwidth,
        "sgemm_peak_gflops": peak, "per_text_bound_s": bound_s,
        "routed_pass_s": w1["median_pass_s"], "llama_cpp_f32_pass_s": llama_s,
        "profiled_pass_s": profiled_pass_s, "gemm_floor_s": floor_s,
        "kernel_s_per_pass": per_pass, "target_pass_s": targets,
        "load_end": machine.load_average()})
    cpu, isa = machine.cpu_isa()
    report["cpu_isa"] = isa
    print(f"CPU: {cpu}; instruction sets: {', '.join(isa)}")
    print(f"read bandwidth {bandwidth:.1f} GB/s, sgemm peak {peak:.0f} GFLOPS; W1: "
          f"{len(ctx.w1.ids)} texts, {tokens} tokens a pass")
    print("| W1 pass | seconds | tokens/s |\n|---|---|---|")
    rows = {"per-text bound (max of bytes, FLOPs per text)": bound_s,
            "moe-embed routed, in process": w1["median_pass_s"],
            "llama.cpp F32": llama_s,
            "ONNX Runtime fp32 GEMM kernels alone (the floor)": floor_s,
            **{f"target: {k}": v for k, v in targets.items()}}
    for name, s in rows.items():
        if s is not None:
            print(f"| {name} | {s:.3f} | {tokens / s:.0f} |")
    for name, s in targets.items():
        verdict = "cannot be met with these kernels" if floor_s > s else "within reach"
        print(f"{name}: the GEMM floor is {floor_s / s:.2f}x the target pass: {verdict}")
    print(f"load at end: {report['load_end']['uptime']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
