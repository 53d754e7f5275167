"""Script, not a test: the targets of issue 22 (hardening, round two), measured against
`moe-embed serve` (1 worker, the demo bundle unless --bundle) over loopback.

    .venv/bin/python benchmarks/hardening.py [--hold 60] [--timeout 20] [--out FILE]

1. Slow sockets: the server runs under a 1024-descriptor limit with --timeout seconds for HTTP
   headers, bodies and keep-alive; 500 sockets that send nothing, half a header or half a body
   are kept open for --hold seconds (each one the server closes is replaced). Every one must be
   closed by the server within its timeout (+5 s), a light gRPC client's p99 during it <= 2x
   its unloaded p99, every log line JSON, the log under 1 MB.
2. Token-id floods: 24 concurrent senders of 4 MB token-id bodies for 20 s (a process of their
   own, at nice 10): the frontend's RSS peak <= 1.5x idle, gRPC health p99 <= 50 ms meanwhile.
3. 200 idle sockets on the metrics port: the frontend's thread count unchanged.
Prints the figures, the machine's load average at the start and end, and a verdict per target.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from slow_clients import closed_by_server, id_flood_body, open_slow, post_raw
from verdicts import finish

from moe_embed.service.demo import ensure_demo_bundle
from moe_embed.testing.procfs import rss_mb, thread_count
from moe_embed.testing.service import ServeProcess
from moe_embed.v1 import embedder_pb2 as pb
from moe_embed.v1 import embedder_pb2_grpc as pb_grpc

DESCRIPTORS = 1024
SLOW = 500
SLOW_KINDS = ("nothing", "half-header", "half-body")
CLOSE_SLACK_S = 5
FLOOD_SENDERS = 24
FLOOD_S = 20.0
IDLE_METRICS = 200


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def timed_loop(call, stop: threading.Event) -> list[float]:
    """Milliseconds of `call()`, back to back, until `stop`."""
    out = []
    while not stop.is_set():
        t = time.perf_counter()
        call()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def for_seconds(call, seconds: float) -> list[float]:
    stop = threading.Event()
    threading.Timer(seconds, stop.set).start()
    return timed_loop(call, stop)


def light_call(target: str):
    stub = pb_grpc.EmbedderStub(grpc.insecure_channel(target))
    request = pb.EmbedRequest(inputs=["tell me about embeddings"], task=pb.TASK_SEARCH_QUERY)
    stub.Embed(request, timeout=30)
    return lambda: stub.Embed(request, timeout=30)


def health_call(target: str):
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    request = health_pb2.HealthCheckRequest(service="")
    stub.Check(request, timeout=10)
    return lambda: stub.Check(request, timeout=10)


def slow_sockets(srv: ServeProcess, hold_s: float, timeout_s: float) -> dict:
    light = light_call(srv.target)
    unloaded = for_seconds(light, 10)
    closed, late, opened_total = [], 0, 0
    held: list[tuple] = []
    stop = threading.Event()
    during: list[float] = []
    runner = threading.Thread(target=lambda: during.extend(timed_loop(light, stop)))
    log_before = srv.log_path.stat().st_size
    kinds = iter(SLOW_KINDS * SLOW)
    end = time.monotonic() + hold_s
    runner.start()
    while time.monotonic() < end or held:
        while time.monotonic() < end and len(held) < SLOW:
            held.append((open_slow(srv.http_port, next(kinds)), time.monotonic()))
            opened_total += 1
        for item in list(held):
            sock, opened = item
            age = time.monotonic() - opened
            if closed_by_server(sock):
                closed.append(age)
            elif age > timeout_s + CLOSE_SLACK_S:
                late += 1
            else:
                continue
            sock.close()
            held.remove(item)
        time.sleep(0.2)
    stop.set()
    runner.join()
    lines = [line for line in srv.log_path.read_text().splitlines() if line.strip()]
    return {
        "sockets_opened": opened_total, "closed_by_server": len(closed), "late": late,
        "close_s": {"min": round(min(closed, default=0), 2),
                    "max": round(max(closed, default=0), 2)},
        "timeout_s": timeout_s,
        "light_unloaded_ms": {"p50": statistics.median(unloaded),
                              "p99": percentile(unloaded, 0.99), "n": len(unloaded)},
        "light_during_ms": {"p50": statistics.median(during), "p99": percentile(during, 0.99),
                            "n": len(during)},
        "log_bytes_during": srv.log_path.stat().st_size - log_before,
        "log_lines_not_json": sum(not line.startswith("{") for line in lines),
    }


def flood_senders(port: int, senders: int, seconds: float, out) -> None:
    """`senders` threads POSTing 4 MB token-id bodies for `seconds`, in a process of its own at
    nice 10 (so the health client's latency is the server's, not this process's GIL); sends the
    statuses to `out`."""
    os.nice(10)
    body, statuses = id_flood_body(4.0), []
    end = time.monotonic() + seconds

    def send() -> None:
        while time.monotonic() < end:
            statuses.append(post_raw(port, body)[0])
    workers = [threading.Thread(target=send) for _ in range(senders)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.send(statuses)
    out.close()


def id_floods(srv: ServeProcess) -> dict:
    pid = srv.proc.pid
    health = health_call(srv.target)
    unloaded = for_seconds(health, 5)
    idle = rss_mb(pid)
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    flood = ctx.Process(target=flood_senders, args=(srv.http_port, FLOOD_SENDERS, FLOOD_S,
                                                    send), daemon=True)
    flood.start()
    send.close()
    stop = threading.Event()
    peak = [idle]

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb(pid))
            time.sleep(0.05)
    sampler = threading.Thread(target=sample)
    sampler.start()
    time.sleep(2)  # the senders' process starts
    health_ms = for_seconds(health, FLOOD_S - 4)
    statuses = receive.recv() if receive.poll(FLOOD_S + 120) else []
    stop.set()
    sampler.join()
    flood.join(30)
    return {"senders": FLOOD_SENDERS, "bodies_sent": len(statuses),
            "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
            "rss_mb": {"idle": round(idle, 1), "peak": round(peak[0], 1)},
            "health_unloaded_ms": {"p50": statistics.median(unloaded),
                                   "p99": percentile(unloaded, 0.99), "n": len(unloaded)},
            "health_ms": {"p50": statistics.median(health_ms),
                          "p99": percentile(health_ms, 0.99), "n": len(health_ms)}}


def idle_metrics(srv: ServeProcess) -> dict:
    pid = srv.proc.pid
    before = thread_count(pid)
    socks = [open_slow(srv.metrics_port, "half-header") for _ in range(IDLE_METRICS)]
    time.sleep(2)
    try:  # a scrape still gets in beside them
        scraped = b"moe_embed_queue_depth" in urllib.request.urlopen(
            f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=30).read()
    except OSError:
        scraped = False
    during = thread_count(pid)
    for s in socks:
        s.close()
    return {"sockets": IDLE_METRICS, "threads_before": before, "threads_during": during,
            "scrape_ok": scraped}


def verdicts(r: dict) -> list[tuple[str, str, bool]]:
    out = []
    if "slow" in r:
        s = r["slow"]
        out += [
            ("slow sockets all closed by the server within their timeout",
             f"{s['closed_by_server']} closed in {s['close_s']['min']}-{s['close_s']['max']} s "
             f"(timeout {s['timeout_s']} s), {s['late']} late", s["late"] == 0),
            ("light p99 during <= 2x unloaded",
             f"{s['light_during_ms']['p99']:.1f} / {s['light_unloaded_ms']['p99']:.1f} ms",
             s["light_during_ms"]["p99"] <= 2 * s["light_unloaded_ms"]["p99"]),
            ("every log line JSON", f"{s['log_lines_not_json']} not", s["log_lines_not_json"] == 0),
            ("log under 1 MB", f"{s['log_bytes_during']} bytes", s["log_bytes_during"] < 1e6),
        ]
    if "floods" in r:
        f = r["floods"]
        out += [
            ("RSS peak <= 1.5x idle under 24 id floods",
             f"{f['rss_mb']['peak']} / {f['rss_mb']['idle']} MB",
             f["rss_mb"]["peak"] <= 1.5 * f["rss_mb"]["idle"]),
            ("gRPC health p99 <= 50 ms meanwhile", f"{f['health_ms']['p99']:.1f} ms (p50 "
             f"{f['health_ms']['p50']:.1f}; unloaded p99 {f['health_unloaded_ms']['p99']:.1f})",
             f["health_ms"]["p99"] <= 50),
        ]
    if "metrics_port" in r:
        m = r["metrics_port"]
        out += [
            ("metrics port: threads unchanged by 200 idle sockets, and a scrape served",
             f"{m['threads_during']} / {m['threads_before']}, scrape {m['scrape_ok']}",
             m["threads_during"] <= m["threads_before"] and m["scrape_ok"]),
        ]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hold", type=float, default=60.0, help="seconds the slow sockets are held")
    ap.add_argument("--timeout", type=float, default=20.0,
                    help="the server's HTTP header/body/keep-alive timeouts (s)")
    ap.add_argument("--only", choices=("slow", "floods", "metrics"), default=None,
                    help="measure one target only")
    ap.add_argument("--bundle", type=Path, default=None, help="default: the demo bundle")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = ap.parse_args(argv)
    bundle = args.bundle or ensure_demo_bundle()
    report: dict = {"load_average_start": os.getloadavg(), "cpus": os.cpu_count()}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with tempfile.TemporaryDirectory() as tmp:
        resource.setrlimit(resource.RLIMIT_NOFILE, (DESCRIPTORS, hard))  # the server inherits
        try:
            srv = ServeProcess(bundle, Path(tmp) / "serve.log", "--workers", "1",
                               "--http-header-timeout-s", str(args.timeout),
                               "--http-body-timeout-s", str(args.timeout),
                               "--http-keepalive-s", str(args.timeout))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        with srv:
            srv.wait_serving()
            if args.only in (None, "slow"):
                report["slow"] = slow_sockets(srv, args.hold, args.timeout)
            if args.only in (None, "floods"):
                report["floods"] = id_floods(srv)
            if args.only in (None, "metrics"):
                report["metrics_port"] = idle_metrics(srv)
    report["load_average_end"] = os.getloadavg()
    return finish(report, verdicts(report), args.out)


if __name__ == "__main__":
    sys.exit(main())
