"""Many small clients against the in-process embedder, side by side in one run: W4 (closed-loop
clients, one short text per request, each on its own channel) at 1, 8 and 32 clients, for each
--max-batch-tokens of a sweep and with tracing on (exporting to a local OTLP sink) and off;
the in-process reference embeds the same texts in batches of the same size with the same
threads. Reports tokens/s, the service / in-process ratio and p50/p99 latency.

    .venv/bin/python benchmarks/service_sweep.py [--bundle DIR] [--tokens 1024,2048,4096,8192]
                                                 [--clients 1,8,32] [--seconds 20] [--tracing]

Default bundle: the full-size synthetic bundle of the benchmark cache (built on first use).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path
from statistics import median

import grpc
from machine import cpu_isa, load_average
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from service_client import closed_loop, request

from moe_embed.service.local import LocalEmbedder
from moe_embed.testing.service import ServeProcess

TEXTS = Path(__file__).resolve().parents[1] / "tests" / "data" / "multilingual.json"


class _Sink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP receiver that counts spans and drops them (tracing's cost, not a collector's)."""

    spans = 0

    def Export(self, request, context):  # noqa: N802
        _Sink.spans += sum(len(ss.spans) for rs in request.resource_spans
                           for ss in rs.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def _sink() -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(1))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Sink(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def in_process(bundle: Path, texts: list[str], batch: int, threads: int,
               seconds: float) -> float:
    """Tokens/s of the in-process embedder on `texts` in batches of `batch`."""
    embedder = LocalEmbedder(bundle, threads)
    embedder.embed(texts[:batch], "search_query")  # warm
    tokens, start, i = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        chunk = [texts[(i + k) % len(texts)] for k in range(batch)]
        tokens += sum(embedder.embed(chunk, "search_query").tokens)
        i += batch
    return tokens / (time.perf_counter() - start)


def one_server(bundle: Path, flags: tuple[str, ...], texts: list[str], clients: list[int],
               seconds: float, log_dir: Path) -> dict:
    srv = ServeProcess(bundle, log_dir / f"serve{len(list(log_dir.iterdir()))}.log",
                       "--workers", "1", "--threads-per-worker", "2", "--log-level", "warning",
                       "--metrics-port", "0", *flags, strip_thread_env=True)
    try:
        srv.wait_serving()
        reqs = [request(t, "search_query") for t in texts]
        out = {}
        for c in clients:
            r = closed_loop(srv.target, c, reqs, [None] * len(reqs), min(5.0, seconds / 4),
                            seconds)
            lat = sorted(r.latencies_s)
            out[str(c)] = {"tokens_per_s": r.tokens / r.wall_s,
                           "requests_per_s": r.requests / r.wall_s,
                           "p50_ms": median(lat) * 1e3 if lat else None,
                           "p99_ms": lat[int(0.99 * (len(lat) - 1))] * 1e3 if lat else None}
            print(f"    {c:>2} clients: {out[str(c)]['tokens_per_s']:7.1f} tok/s "
                  f"p50 {out[str(c)]['p50_ms']:.1f} ms", flush=True)
        return out
    finally:
        srv.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path)
    p.add_argument("--tokens", default="1024,2048,4096,8192")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--tracing", action="store_true", help="also run each size with tracing on")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sweep.json")
    args = p.parse_args(argv)
    if args.bundle is None:
        from artifacts import default_cache, ensure

        args.bundle = ensure(default_cache()).routed.path
    clients = [int(c) for c in args.clients.split(",")]
    texts = json.loads(TEXTS.read_text())
    kind, flags = cpu_isa()
    report = {"cpu": kind, "isa": flags, "load_before": load_average(), "bundle":
              str(args.bundle), "in_process": {}, "service": {}}
    print(f"CPU {kind} ({' '.join(flags)}); load {report['load_before']}", flush=True)
    for c in clients:
        report["in_process"][str(c)] = in_process(args.bundle, texts, c, 2, args.seconds)
        print(f"  in process, batches of {c:>2}: {report['in_process'][str(c)]:7.1f} tok/s",
              flush=True)
    sink, port = _sink()
    with tempfile.TemporaryDirectory() as logs:
        for tokens in [int(t) for t in args.tokens.split(",")]:
            for tracing in ([False, True] if args.tracing else [False]):
                name = f"{tokens}{' traced' if tracing else ''}"
                flags = ("--max-batch-tokens", str(tokens), "--http-port", "0",
                         *(("--otlp-endpoint", f"http://127.0.0.1:{port}") if tracing else ()))
                print(f"  service, --max-batch-tokens {name}", flush=True)
                levels = one_server(args.bundle, flags, texts, clients, args.seconds,
                                    Path(logs))
                for c, v in levels.items():
                    v["ratio"] = v["tokens_per_s"] / report["in_process"][c]
                report["service"][name] = levels
    sink.stop(0)
    report["spans_exported"] = _Sink.spans
    report["load_after"] = load_average()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\n{'config':>14} " + " ".join(f"{c:>16}" for c in clients))
    for name, levels in report["service"].items():
        cells = [f"{levels[str(c)]['ratio']:5.2f}x p50 {levels[str(c)]['p50_ms']:5.0f}"
                 for c in clients]
        print(f"{name:>14} " + " ".join(f"{x:>16}" for x in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
