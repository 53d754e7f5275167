"""Script, not a test: what one replica costs to run: memory, start time, and the throughput
that goes with them.

    .venv/bin/python benchmarks/footprint.py [--config NAME=MOE_EMBED_CLI:BUNDLE[:FLAGS] ...]
        [--workers 1,2] [--rounds 2] [--quick]

For each configuration (a `moe-embed` executable, a bundle and optional serve flags, e.g.
`--no-share-weights`; default: this checkout on the cached full-size fp32 bundle of
`make bench`) and each worker count, in interleaved rounds:
- start: seconds from process start to grpc.health SERVING;
- memory once idle: the frontend's RSS, every process's PSS (from /proc/PID/smaps_rollup), and
  how much of the workers' memory is shared file pages; and the total PSS again after W3;
- W1 tokens/s (the multilingual texts one unary call at a time) and W3 tokens/s (a burst of the
  mixed-length corpus) through the service.
Compare configurations only within one run (the machine drifts). Name the CPU and load.
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

from moe_embed.testing import procfs
from moe_embed.testing.service import ServeProcess


def smaps(pid: int) -> dict[str, float]:
    """PSS, RSS and shared-clean MB of one process (0 if it is gone)."""
    kb = procfs.smaps_rollup_kb(pid)
    return {"pss": kb.get("Pss", 0) / 1024, "rss": kb.get("Rss", 0) / 1024,
            "shared_clean": kb.get("Shared_Clean", 0) / 1024,
            "private": (kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) / 1024}


def measure(cli: Path, bundle: Path, flags: tuple[str, ...], workers: int, threads: int, ctx,
            quick: bool) -> dict:
    import workloads as wl

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        server = ServeProcess(bundle, Path(tmp) / "serve.log", "--workers", str(workers),
                              "--threads-per-worker", str(threads), "--log-level", "warning",
                              "--metrics-port", "0", *flags, cli=cli, strip_thread_env=True)
        try:
            server.wait_serving(600)
            start_s = time.perf_counter() - t0
            time.sleep(2.0)
            front = smaps(server.proc.pid)
            kids = [smaps(p) for p in procfs.descendants(server.proc.pid)]
            # workers (and the loader they are forked from), not the resource tracker
            worker_mem = [k for k in kids if k["rss"] > 100]
            w1 = wl.w1_service(ctx, server.target)
            w3 = wl.w3_service(ctx, server.target, "service")
            loaded = smaps(server.proc.pid)["pss"] + sum(
                smaps(p)["pss"] for p in procfs.descendants(server.proc.pid))
        finally:
            server.stop()
    return {
        "start_s": round(start_s, 2),
        "frontend_rss_mb": round(front["rss"], 1),
        "total_pss_mb": round(front["pss"] + sum(k["pss"] for k in kids), 1),
        "workers_pss_mb": round(sum(k["pss"] for k in worker_mem), 1),
        "total_pss_after_w3_mb": round(loaded, 1),
        "workers_shared_clean_mb": round(sum(k["shared_clean"] for k in worker_mem), 1),
        "workers_private_mb": round(sum(k["private"] for k in worker_mem), 1),
        "w1_tokens_per_s": round(w1["tokens_per_s"], 1),
        "w3_tokens_per_s": round(w3["tokens_per_s"], 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", action="append", default=[],
                    help="NAME=MOE_EMBED_CLI:BUNDLE[:FLAGS] (repeatable; FLAGS: serve flags "
                         "separated by spaces); default: this checkout's moe-embed on the "
                         "cached full-size fp32 bundle")
    ap.add_argument("--workers", default="1,2", help="worker counts (default 1,2)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="cores shared by the workers of one server (default: all usable)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer texts, smaller W3")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = ap.parse_args(argv)

    import artifacts
    import inputs
    import workloads as wl
    from machine import info, load_average
    from plan import FULL, QUICK

    from moe_embed.service.tokenizer import Tokenizer

    configs = {}
    for spec in args.config:
        name, _, rest = spec.partition("=")
        cli, _, rest = rest.partition(":")
        bundle, _, flags = rest.partition(":")
        configs[name] = (Path(cli), Path(bundle), tuple(flags.split()))
    if not configs:
        art = artifacts.ensure(artifacts.default_cache())
        configs["this"] = (Path(sys.executable).with_name("moe-embed"), art.routed.path, ())
    plan = QUICK if args.quick else FULL
    first_bundle = next(iter(configs.values()))[1]
    tok = Tokenizer(first_bundle / "tokenizer.json")
    from moe_embed.workers.bundle.format import Bundle

    ctx = wl.Context(cfg=Bundle.load(first_bundle, verify=False).config, tok=tok, plan=plan,
                     w1=inputs.w1_set(tok, plan.w1_texts), short=inputs.short_set(tok),
                     w2=[], w3=inputs.w3_corpus(tok, 64 if not args.quick else 8,
                                                hi=plan.w3_max_tokens), log=lambda m: None)
    counts = [int(x) for x in args.workers.split(",")]
    report = {"machine": info(), "load_start": load_average(), "rounds": []}
    print(f"load at start: {report['load_start']['uptime']}", flush=True)
    rows: dict[tuple[str, int], list[dict]] = {}
    for r in range(args.rounds):
        for name, (cli, bundle, flags) in configs.items():
            for n in counts:
                m = measure(cli, bundle, flags, n, max(1, args.threads // n), ctx, args.quick)
                rows.setdefault((name, n), []).append(m)
                report["rounds"].append({"round": r, "config": name, "workers": n, **m})
                print(json.dumps({"round": r, "config": name, "workers": n, **m}), flush=True)
    summary = {}
    for (name, n), ms in rows.items():
        summary[f"{name} x{n}"] = {k: statistics.median(m[k] for m in ms) for k in ms[0]}
    report["median"] = summary
    report["load_end"] = load_average()
    keys = ("start_s", "frontend_rss_mb", "total_pss_mb", "total_pss_after_w3_mb",
            "w1_tokens_per_s", "w3_tokens_per_s")
    print("\n| config | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for label, m in summary.items():
        print(f"| {label} | " + " | ".join(f"{m[k]:.1f}" for k in keys) + " |")
    for name in configs:
        one, two = summary.get(f"{name} x1"), summary.get(f"{name} x2")
        if one and two:
            print(f"{name}: total PSS with 2 workers / 1 worker = "
                  f"{two['total_pss_mb'] / one['total_pss_mb']:.2f}x")
    print(f"load at end: {report['load_end']['uptime']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
