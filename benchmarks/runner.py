"""One benchmark run: inputs, machine peaks, the in-process peers, the service, the outputs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import artifacts
import chart
import inputs
import machine
import peers
import report
import workloads as wl
from plan import FULL, QUICK
from targets import evaluate

from moe_embed.service.tokenizer import Tokenizer
from moe_embed.testing import procfs
from moe_embed.testing.service import ServeProcess

LOAD_WARN = 0.5


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def warn_load(load: dict) -> str | None:
    if load["1m"] <= LOAD_WARN:
        return None
    msg = (f"the 1-minute load average was {load['1m']:.2f} (> {LOAD_WARN}) when the run "
           "started: other work is using the cores and every figure below is understated")
    bar = "!" * 78
    print(f"\n{bar}\n!! WARNING: {msg}\n{bar}\n", file=sys.stderr, flush=True)
    return msg


class Recorder:
    """Runs each measurement, logs its time, and records a failure instead of stopping."""

    def __init__(self, results: dict) -> None:
        self.results = results
        self.peak_gflops: float | None = None  # for the progress lines only
        self.bandwidth_gbs: float | None = None

    def __call__(self, section: str, key: str, fn: Callable[[], Any]) -> Any:
        log(f"{section} {key} ...")
        t = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:  # a broken peer must not hide the other figures
            traceback.print_exc()
            self.results["errors"].append({"section": section, "key": key, "error": repr(exc)})
            log(f"{section} {key} FAILED: {exc!r}")
            return None
        self.results.setdefault(section, {})[key] = value
        log(f"{section} {key} done in {time.perf_counter() - t:.1f} s{self.brief(value)}")
        return value

    def brief(self, v: Any) -> str:
        if not isinstance(v, dict):
            return ""
        parts = []
        if v.get("tokens_per_s"):
            parts.append(f"{v['tokens_per_s']:.0f} tok/s")
        if v.get("gflops") and self.peak_gflops:
            parts.append(f"{100 * v['gflops'] / self.peak_gflops:.0f}% sgemm peak")
        if v.get("weight_gb_per_s") and self.bandwidth_gbs:
            parts.append(f"{100 * v['weight_gb_per_s'] / self.bandwidth_gbs:.0f}% roofline")
        return (": " + ", ".join(parts + _latency(v))) if parts or _latency(v) else ""


def _latency(v: dict) -> list[str]:
    parts = []
    if isinstance(v.get("latency"), dict) and v["latency"].get("p50_ms") is not None:
        parts.append(f"p50 {v['latency']['p50_ms']:.1f} ms")
    return parts


def _open(name: str, bundles: dict, checkpoint: str, threads: int) -> tuple[Any, dict]:
    t = time.perf_counter()
    peer = peers.open_peer(name, bundles, checkpoint, threads)
    return peer, {"load_s": time.perf_counter() - t}


def _inprocess(args, ctx: wl.Context, art: artifacts.Artifacts, rec: Recorder) -> None:
    bundles = {"routed": art.routed, "all-experts": art.all_experts}
    for name in (p for p in peers.PEERS if p in args.peers):
        if name == "llama.cpp" and (why := peers.llama_available()):
            log(f"skipping the llama.cpp peer: {why}")
            rec.results.setdefault("skipped", {})[name] = why
            continue
        todo = [w for w in ("W1", "W2", "W3") if w in args.workloads]
        if name == "routed" and "W4" in args.workloads:
            todo.append("W4")
        if not todo:
            continue
        peer = rec("load", name,
                   lambda n=name: _open(n, bundles, str(art.checkpoint), args.threads))
        if peer is None:
            continue
        peer, rec.results["load"][name] = peer
        for w in todo:
            fn = {"W1": wl.w1_inprocess, "W2": wl.w2, "W3": wl.w3_inprocess,
                  "W4": wl.w4_inprocess}[w]
            rec(w, "inprocess" if w == "W4" else name, lambda fn=fn, peer=peer: fn(ctx, peer))
        peer.close()


def _service(args, ctx: wl.Context, art: artifacts.Artifacts, rec: Recorder, out: Path) -> None:
    todo = [w for w in ("W1", "W3", "W4", "W5", "RSS") if w in args.workloads]
    if not todo or "service" not in args.peers:
        return
    layouts = [("1x", 1, args.threads)]
    if "RSS" in args.workloads:
        layouts.append(("2x", 2, max(1, args.threads // 2)))
    for tag, workers, threads in layouts:
        name = f"{workers}x{threads}"
        log(f"starting moe-embed serve: {workers} worker(s) x {threads} thread(s)")
        (out / "logs").mkdir(exist_ok=True)
        server = ServeProcess(art.routed.path, out / "logs" / f"serve-{name}.log",
                              "--workers", str(workers), "--threads-per-worker", str(threads),
                              "--log-level", "warning", "--metrics-port", "0",
                              strip_thread_env=True)
        try:
            ready = server.wait_serving(600).ready_s
            rec.results.setdefault("service_start", {})[name] = {"ready_s": ready,
                                                                 "memory": server.memory()}
            _service_workloads(tag, name, todo, server, ctx, rec,
                               lambda: peers.open_peer("routed", {"routed": art.routed},
                                                       str(art.checkpoint), args.threads))
        except Exception as exc:
            traceback.print_exc()
            rec.results["errors"].append({"section": "service", "key": name, "error": repr(exc)})
        finally:
            rec.results.setdefault("service_exit", {})[name] = server.stop()


def _service_workloads(tag: str, name: str, todo: list[str], server: ServeProcess, ctx: wl.Context,
                       rec: Recorder, open_routed: Callable[[], Any]) -> None:
    target = server.target
    if tag == "2x":
        rec("W3", "service-2x1", lambda: wl.w3_service(ctx, target, "service-2x1"))
        rec("RSS", name, server.memory)
        return
    if "W1" in todo:
        rec("W1", "service", lambda: wl.w1_service(ctx, target))
    if "W3" in todo or "RSS" in todo:
        rec("W3", "service", lambda: wl.w3_service(ctx, target, "service"))
    if "RSS" in todo:
        rec("RSS", name, server.memory)
    if "W4" in todo:
        rec("W4", "overhead", lambda: _with_peer(open_routed, lambda p: wl.w4_overhead(
            ctx, target, p)))
        rec("W4", "service", lambda: wl.w4_service(ctx, target))
    if "W5" in todo:
        rec("W5", "service", lambda: wl.w5_service(ctx, target))


def _with_peer(open_peer: Callable[[], Any], fn: Callable[[Any], Any]) -> Any:
    peer = open_peer()
    try:
        return fn(peer)
    finally:
        peer.close()


def _inputs_summary(ctx: wl.Context) -> dict:
    def lengths(ts: inputs.TextSet) -> dict:
        ls = ts.lengths
        return {"texts": len(ls), "task": ts.task, "tokens": sum(ls), "min": min(ls),
                "max": max(ls), "lengths": ls}
    return {"W1": lengths(ctx.w1), "short": lengths(ctx.short),
            "W2": {"shape": [len(ctx.w2), len(ctx.w2[0])], "seed": 0},
            "W3": {**lengths(ctx.w3), "seed": 0, "batch_tokens": ctx.plan.w3_batch_tokens,
                   "batches": [len(b) for b in ctx.w3.batches(ctx.plan.w3_batch_tokens)]}}


def _measure_machine(args, plan, rec: Recorder, when: str) -> None:
    """sgemm peak and read bandwidth; measured at the start and the end of the run, the best
    of both is the peak every fraction is quoted against."""
    sgemm = rec("machine", f"sgemm_{when}", lambda: machine.sgemm_peak(args.threads))
    bw = rec("machine", f"bandwidth_{when}",
             lambda: machine.read_bandwidth(args.threads, plan.bandwidth_gib))
    m = rec.results["machine"]
    if sgemm:
        m["sgemm_peak_gflops"] = rec.peak_gflops = max(rec.peak_gflops or 0,
                                                       sgemm["peak_gflops"])
    if bw:
        m["bandwidth_gb_per_s"] = rec.bandwidth_gbs = max(rec.bandwidth_gbs or 0,
                                                          bw["gb_per_s"])
    if sgemm and bw:
        lib = ", ".join(f"{k} {v:.0f}" for k, v in sgemm["gflops_by_library"].items())
        log(f"machine ({when}): sgemm GFLOPS {lib}; read {bw['gb_per_s']:.1f} GB/s")


def run(args: argparse.Namespace, default_out: Path) -> int:
    plan = QUICK if args.quick else FULL
    out = args.out or (default_out / "quick" if args.quick else default_out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load_start = machine.load_average()
    results: dict[str, Any] = {
        "meta": {"started": load_start["at"], "quick": args.quick, "threads": args.threads,
                 "argv": sys.argv[1:], "workloads": args.workloads, "peers": args.peers,
                 "plan": dataclasses.asdict(plan), "load_start": load_start,
                 "load_warning": warn_load(load_start), "machine": machine.info()},
        "errors": [], "load": {}, "machine": {}}
    log(f"load average at start: {load_start['uptime']}")
    cache = args.cache or artifacts.default_cache()
    art = artifacts.ensure(cache, log=log)
    results["meta"].update(cache=str(cache), build_s=art.build_s,
                           bundles={"routed": art.routed.digest,
                                    "all-experts": art.all_experts.digest})
    tok = Tokenizer.from_bundle(art.routed)
    ctx = wl.Context(cfg=art.routed.config, tok=tok, plan=plan,
                     w1=inputs.w1_set(tok, plan.w1_texts), short=inputs.short_set(tok),
                     w2=inputs.w2_batch(*plan.w2_shape),
                     w3=inputs.w3_corpus(tok, plan.w3_texts, hi=plan.w3_max_tokens), log=log)
    results["inputs"] = _inputs_summary(ctx)
    rec = Recorder(results)
    _measure_machine(args, plan, rec, "start")
    for rows in sorted({512, plan.w2_shape[0] * plan.w2_shape[1]}):
        rec("machine", f"ort_linear_{rows}", lambda rows=rows: machine.ort_linear_gflops(
            ctx.cfg, args.threads, tokens=rows))
    _inprocess(args, ctx, art, rec)
    _service(args, ctx, art, rec, out)
    _measure_machine(args, plan, rec, "end")
    wl.add_fractions(results, rec.peak_gflops, rec.bandwidth_gbs)
    load_end = machine.load_average()
    results["meta"].update(load_end=load_end, wall_s=time.perf_counter() - t0,
                           finished=load_end["at"],
                           harness_peak_rss_mb=procfs.peak_rss_mb())
    results["routing"] = {w: {str(i): e for i, e in calls.items()}
                          for w, calls in ctx.routing.items()}  # expert_tokens per call
    results["targets"] = [{**dataclasses.asdict(t), "verdict": t.verdict}
                          for t in evaluate(results)]
    json_path = out / "bench.json"
    json_path.write_text(json.dumps(results, indent=1, default=_jsonable) + "\n")
    md_path = (out.parent / "RESULTS.md" if out.resolve() == default_out.resolve()
               else out / "RESULTS.md")
    png_path = out / "ratios.png"
    chart.write_chart(results, png_path)
    md_path.write_text(report.markdown(results, md_path.parent, json_path, png_path))
    log(f"load average at end: {load_end['uptime']}")
    log(f"wrote {json_path}, {md_path}, {png_path} in {results['meta']['wall_s']:.0f} s")
    if results["meta"]["load_warning"]:
        warn_load(load_start)
    return 1 if results["errors"] else 0


def _jsonable(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
