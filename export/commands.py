"""`moe-embed export` and `moe-embed synthetic`: the command-line face of export/."""

from __future__ import annotations

import argparse
import time

from ..workers.bundle.format import MOE_MODES
from ..workers.bundle.recipes import PRECISIONS
from ..workers.logs import json_logger
from .progress import Progress

SIZES = ("full", "tiny")  # synthetic.SIZES, without importing torch for --help


def _export(args: argparse.Namespace) -> int:
    if args.moe_mode == "all-experts" and args.precision != "fp32":
        args.parser.error(f"--moe-mode all-experts is a benchmark peer exported in fp32 only; "
                          f"drop --precision {args.precision}")
    from .split import export_bundle  # torch and onnx: only when exporting

    log = json_logger("export")
    t0 = time.perf_counter()
    log.info("export.start", source=args.source, out=args.out, moe_mode=args.moe_mode,
             precision=args.precision)
    out = export_bundle(args.source, args.out, moe_mode=args.moe_mode, revision=args.revision,
                        progress=Progress("export", "export.progress"), precision=args.precision)
    log.info("export.done", out=str(out), precision=args.precision,
             mib=round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20, 1),
             seconds=round(time.perf_counter() - t0, 1))
    return 0


def _synthetic(args: argparse.Namespace) -> int:
    from .synthetic import write_synthetic

    log = json_logger("synthetic")
    t0 = time.perf_counter()
    out = write_synthetic(args.out, args.size, args.seed,
                          zero_expert_bias=args.zero_expert_bias,
                          outlier_channels=args.outlier_channels, outlier_gain=args.outlier_gain,
                          weight_scale=args.weight_scale, layers=args.layers)
    log.info("synthetic.done", out=str(out), size=args.size, seed=args.seed,
             zero_expert_bias=args.zero_expert_bias, outlier_channels=args.outlier_channels,
             outlier_gain=args.outlier_gain, weight_scale=args.weight_scale, layers=args.layers,
             seconds=round(time.perf_counter() - t0, 1))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export an HF checkpoint to a moe-embed bundle",
        description="Read an HF checkpoint (hub id or local directory with config.json, "
        "model.safetensors[.index.json] and tokenizer.json) and write a bundle: dense ONNX "
        "segments, one ONNX graph per expert, router weights, manifest.json with sha256s. "
        "SOURCE may also be an fp32 bundle directory (one with a manifest.json): its graphs are "
        "then quantized without reading the checkpoint again.")
    p.add_argument("source", help="hub id (e.g. nomic-ai/nomic-embed-text-v2-moe), local "
                   "checkpoint dir, or an fp32 bundle dir")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--moe-mode", choices=MOE_MODES, default="routed",
                   help="routed (the product) or all-experts (benchmark peer only); "
                   "default: routed")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (exact), int8 (int8 weights, 8-bit table: ~1/4 the size, ~2x the "
                   "speed) or int4 (4-bit experts and table: ~1/6 the size); see README's "
                   "'Quantized bundles'. all-experts bundles are fp32 only. Default: fp32")
    p.set_defaults(func=_export, parser=p)

    s = sub.add_parser(
        "synthetic", help="write a synthetic checkpoint in the upstream HF format",
        description="Random weights with the exact upstream config fields, tensor names and "
        "shapes, decisive routers, non-zero expert bias and the real XLM-R tokenizer. The "
        "vectors it produces are not meaningful.")
    s.add_argument("--size", choices=sorted(SIZES), default="tiny",
                   help="tiny (hidden 64, 4 layers) or full (the real 475M shapes)")
    s.add_argument("--out", required=True, help="checkpoint directory to write")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--zero-expert-bias", action="store_true",
                   help="zero every mlp.experts.bias (only that tensor changes): for "
                   "comparisons with llama.cpp, whose GGUF converter drops it")
    s.add_argument("--outlier-channels", type=int, default=0, metavar="N",
                   help="give N hidden dimensions LayerNorm gains --outlier-gain times larger in "
                   "every LayerNorm, as trained transformers have (default 0: none)")
    s.add_argument("--outlier-gain", type=float, default=30.0,
                   help="the gain factor of the outlier channels (default 30)")
    s.add_argument("--weight-scale", type=float, default=1.0,
                   help="factor on the std of every linear weight (default 1)")
    s.add_argument("--layers", type=int, default=None,
                   help="override the layer count, keeping the size's widths (a reduced "
                   "checkpoint for quick exploration; default: the size's)")
    s.set_defaults(func=_synthetic)
