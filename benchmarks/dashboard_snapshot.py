"""Script, not a test: a picture of the Grafana dashboard over a real load run.

    .venv/bin/python benchmarks/dashboard_snapshot.py [--bundle DIR] [--out PNG]

No Grafana can run here, so this plots the dashboard's own queries (helm/dashboards/
moe-embed.json, every panel target, each heatmap repeated per MoE layer as the dashboard
repeats it) with matplotlib, evaluated by benchmarks/promql_eval.py over /metrics scraped
every second from `moe-embed serve` (the demo bundle unless --bundle, 2 workers x 1 thread)
while it runs: 15 s of light traffic, 25 s of overload (concurrent 32-input requests, a few
refused and truncated inputs; one worker SIGKILLed 8 s in), then 20 s idle. Grafana's
$__rate_interval is 5 s here (scrapes every second); the template variables match all.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import signal
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import matplotlib
import promql_eval

from moe_embed.service.demo import ensure_demo_bundle
from moe_embed.testing.service import ServeProcess
from moe_embed.v1 import embedder_pb2 as pb
from moe_embed.v1 import embedder_pb2_grpc as pb_grpc

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "helm" / "dashboards" / "moe-embed.json"
WORDS = "the of embedding expert router token batch queue worker layer model search".split()
PHASES = (("light", 15.0, 2), ("overload", 25.0, 24), ("idle", 20.0, 0))  # name, s, clients
KILL_AFTER_S = 8.0  # into the overload
RATE_INTERVAL = "5s"


def grafana_to_promql(expr: str, layer: str = ".*") -> str:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$layer", layer)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def client(target: str, stop: threading.Event, heavy: bool, seed: int) -> None:
    rng = random.Random(seed)
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        while not stop.is_set():
            inputs = ([text(rng, rng.randint(20, 120)) for _ in range(32)] if heavy
                      else [text(rng, rng.randint(3, 12))])
            if heavy and rng.random() < 0.05:
                inputs[0] = text(rng, 3000)  # past the context: truncated
            task = pb.TASK_UNSPECIFIED if rng.random() < 0.02 else pb.TASK_SEARCH_DOCUMENT
            try:
                stub.Embed(pb.EmbedRequest(inputs=inputs, task=task), timeout=30)
            except grpc.RpcError:
                pass


def worker_pids(log_path: Path) -> list[int]:
    pids = []
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "worker_ready" and "worker" in event:
                pids.append(int(event["pid"]))
    return pids


def run_load(bundle: Path, log_path: Path) -> tuple[promql_eval.Scrapes, list, float]:
    server = ServeProcess(bundle, log_path, "--workers", "2", "--threads-per-worker", "1",
                          "--log-level", "info", strip_thread_env=True)
    scrapes = promql_eval.Scrapes()
    times: list[float] = []
    marks: list[tuple[float, str]] = []
    done = threading.Event()

    def scrape() -> None:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        while not done.is_set():
            t = time.monotonic()
            with urllib.request.urlopen(url, timeout=5) as response:
                scrapes.add(t, response.read().decode())
            times.append(t)
            done.wait(max(0.0, 1.0 - (time.monotonic() - t)))

    try:
        server.wait_serving(600)
        t0 = time.monotonic()
        scraper = threading.Thread(target=scrape, daemon=True)
        scraper.start()
        for name, seconds, clients in PHASES:
            marks.append((time.monotonic() - t0, name))
            stop = threading.Event()
            threads = [threading.Thread(target=client, daemon=True,
                                        args=(server.target, stop, name == "overload", i))
                       for i in range(clients)]
            for th in threads:
                th.start()
            if name == "overload":
                time.sleep(KILL_AFTER_S)
                os.kill(worker_pids(log_path)[0], signal.SIGKILL)
                marks.append((time.monotonic() - t0, "worker killed"))
                time.sleep(seconds - KILL_AFTER_S)
            else:
                time.sleep(seconds)
            stop.set()
            for th in threads:
                th.join(60)
        done.set()
        scraper.join(10)
    finally:
        server.stop()
    return scrapes, [(t - t0, t) for t in times], marks


def legend(fmt: str, labels: promql_eval.Labels) -> str:
    values = dict(labels)
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: values.get(m.group(1), ""), fmt)
    return " ".join(text.split()) or "value"


def right_axis_series(panel: dict) -> set[str]:
    """Legends the panel's overrides place on the right axis (as Grafana draws them)."""
    return {o["matcher"]["options"] for o in panel["fieldConfig"].get("overrides", [])
            if {"id": "custom.axisPlacement", "value": "right"} in o["properties"]}


def plot(scrapes: promql_eval.Scrapes, times: list, marks: list, out: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    layers = sorted({dict(labels)["layer"] for (name, labels) in scrapes.series
                     if name == "moe_embed_expert_tokens_total"}, key=int)
    drawn = [(p, None) for p in panels if p["type"] != "heatmap"]
    drawn += [(p, layer) for p in panels if p["type"] == "heatmap" for layer in layers]
    cols = 3
    rows = math.ceil(len(drawn) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 6, rows * 3.4), squeeze=False)
    xs = [x for x, _ in times]
    for ax, (panel, layer) in zip(axes.flat, drawn, strict=False):
        title = panel["title"].replace("$layer", layer or "")
        ax.set_title(title, fontsize=10)
        for mark_x, _ in marks:
            ax.axvline(mark_x, color="grey", lw=0.6, ls=":")
        if panel["type"] == "heatmap":
            target = panel["targets"][0]
            promql = grafana_to_promql(target["expr"], layer)
            values = [promql_eval.evaluate(promql, scrapes, t) for _, t in times]
            experts = sorted({dict(k)["expert"] for v in values for k in v}, key=int)
            grid = [[v.get(frozenset({("expert", e)}), math.nan) for v in values]
                    for e in experts]
            image = ax.imshow(grid, aspect="auto", origin="lower", cmap="Oranges",
                              extent=(xs[0], xs[-1], -0.5, len(experts) - 0.5))
            ax.set_ylabel("expert")
            fig.colorbar(image, ax=ax, label="share of the layer's tokens")
            continue
        right = right_axis_series(panel)
        twin = ax.twinx() if right else None
        plotted = 0
        for target in panel["targets"]:
            promql = grafana_to_promql(target["expr"])
            series: dict[promql_eval.Labels, list[float]] = {}
            for i, (_, t) in enumerate(times):
                value = promql_eval.evaluate(promql, scrapes, t)
                if isinstance(value, float):
                    value = {frozenset(): value}
                for labels, v in value.items():
                    series.setdefault(labels, [math.nan] * len(times))[i] = v
            for labels, ys in sorted(series.items(), key=lambda kv: sorted(kv[0])):
                name = legend(target.get("legendFormat", ""), labels)
                (twin if name in right else ax).plot(xs, ys, lw=1.2, label=name,
                                                     color=f"C{plotted}")
                plotted += 1
        ax.set_ylabel(panel["fieldConfig"]["defaults"].get("unit", ""))
        handles = ax.get_legend_handles_labels()
        if twin is not None:
            twin.set_ylabel(", ".join(sorted(right)))
            extra = twin.get_legend_handles_labels()
            handles = (handles[0] + extra[0], handles[1] + extra[1])
        ax.legend(*handles, fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("seconds (dotted: " + ", ".join(name for _, name in marks) + ")")
    fig.suptitle("moe-embed dashboard: its panel queries over a load run (plotted with "
                 "matplotlib from /metrics scrapes, not rendered by Grafana)", fontsize=12)
    fig.tight_layout()
    fig.savefig(out, dpi=80)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None, help="default: the demo bundle")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dashboard.png")
    args = ap.parse_args(argv)
    bundle = args.bundle or ensure_demo_bundle()
    with tempfile.TemporaryDirectory() as tmp:
        scrapes, times, marks = run_load(bundle, Path(tmp) / "serve.log")
    plot(scrapes, times, marks, args.out)
    print(f"wrote {args.out} ({len(times)} scrapes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
