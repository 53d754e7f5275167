"""The service against the in-process embedder, side by side in one run: W4 (closed-loop
clients, one short text per request, each on its own channel) at 1 (W1), 8 and 32 clients, W3
(one client, 256 texts a request) and W5 (one bidi stream, 32 requests in flight), for each
--max-batch-tokens of a sweep, with tracing on (exporting to a local OTLP sink) and off, and
for one or more CLIs (two checkouts: before and after a change); the in-process reference
embeds the same texts in batches of the same size with the same threads. Reports tokens/s,
the service / in-process ratio, p50/p99 latency and the batches the server formed (from its
metrics: how many, mean requests each, how many of a single request).

    .venv/bin/python benchmarks/service_sweep.py [--bundle DIR] [--tokens 1024,2048,4096,8192]
        [--clients 1,8,32,1x256,s32] [--seconds 10] [--rounds 3] [--tracing] [--cli NAME=PATH ...]

Each round measures the in-process reference and then the service at each level, so both see
the same machine (shared machines drift by 15% within minutes); the table is the median of the
rounds' ratios.

Default bundle: the full-size synthetic bundle of the benchmark cache (built on first use).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path
from statistics import median

import grpc
from machine import cpu_isa, load_average
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from service_client import TASKS, closed_loop, request, stream

from moe_embed.service.local import LocalEmbedder
from moe_embed.testing.service import CLI, ServeProcess
from moe_embed.v1 import embedder_pb2 as pb

TEXTS = Path(__file__).resolve().parents[1] / "tests" / "data" / "multilingual.json"


class _Sink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP receiver that counts spans and drops them (tracing's cost, not a collector's)."""

    def __init__(self, spans) -> None:
        self.spans = spans  # a multiprocessing.Value shared with the benchmark

    def Export(self, request, context):  # noqa: N802
        with self.spans.get_lock():
            self.spans.value += sum(len(ss.spans) for rs in request.resource_spans
                                    for ss in rs.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def _serve_sink(port, spans, stop) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(1))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Sink(spans), server)
    port.value = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop.wait()
    server.stop(0)


class Sink:
    """The OTLP receiver in a process of its own: decoding spans must not take the GIL of the
    process whose clients are being timed."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.port, self.spans, self._stop = ctx.Value("i", 0), ctx.Value("q", 0), ctx.Event()
        self.proc = ctx.Process(target=_serve_sink, args=(self.port, self.spans, self._stop))
        self.proc.start()
        while self.port.value == 0:
            time.sleep(0.05)

    def stop(self) -> int:
        self._stop.set()
        self.proc.join(30)
        return self.spans.value


def in_process(embedder: LocalEmbedder, texts: list[str], batch: int, seconds: float) -> float:
    """Tokens/s of the in-process embedder on `texts` in batches of `batch`."""
    embedder.embed(texts[:batch], "search_query")  # warm
    tokens, start, i = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        chunk = [texts[(i + k) % len(texts)] for k in range(batch)]
        tokens += sum(embedder.embed(chunk, "search_query").tokens)
        i += batch
    return tokens / (time.perf_counter() - start)


def level(spec: str) -> tuple[int, int]:
    """'32': 32 clients of one text per request (W4, W1 at 1); '1x256': one client sending 256
    texts per request (W3 through the service); 's32': one bidi stream holding 32 one-text
    requests in flight (W5), as (32, 1)."""
    clients, _, per = spec.lstrip("s").partition("x")
    return int(clients), int(per or 1)


BATCH_REQUESTS = "moe_embed_batch_size_requests"


def batches(before: dict[str, float], after: dict[str, float]) -> dict:
    """The batches formed between two scrapes of the server's metrics: how many, the mean
    requests in one, and how many carried a single request."""
    d = {k: after[k] - before.get(k, 0.0) for k in after if k.startswith(BATCH_REQUESTS)}
    n = d.get(f"{BATCH_REQUESTS}_count", 0.0)
    return {"batches": n, "mean_requests": d[f"{BATCH_REQUESTS}_sum"] / n if n else None,
            "of_one_request": d.get(f'{BATCH_REQUESTS}_bucket{{le="1.0"}}', 0.0)}


def service(srv: ServeProcess, texts: list[str], clients: int, seconds: float,
            per: int = 1) -> dict:
    reqs = [request(t, "search_query") for t in texts]
    if per > 1:
        reqs = [pb.EmbedRequest(inputs=[texts[(i + k) % len(texts)] for k in range(per)],
                                task=TASKS["search_query"]) for i in range(0, len(texts), per)]
    before = srv.metrics()  # includes the warm-up: batch figures are of the whole level
    r = closed_loop(srv.target, clients, reqs, [None] * len(reqs), min(3.0, seconds / 4),
                    seconds)
    lat = sorted(r.latencies_s)
    # one client of long requests: by their own time (few complete inside the window)
    busy = sum(lat) if clients == 1 and per > 1 else r.wall_s
    return {"tokens_per_s": r.tokens / busy, "requests_per_s": r.requests / r.wall_s,
            "p50_ms": median(lat) * 1e3 if lat else None,
            "p99_ms": lat[int(0.99 * (len(lat) - 1))] * 1e3 if lat else None,
            **batches(before, srv.metrics())}


def w5(srv: ServeProcess, texts: list[str], window: int, seconds: float) -> dict:
    """One EmbedStream with `window` one-text requests in flight, about `seconds` long."""
    reqs = [request(t, "search_query") for t in texts]
    stream(srv.target, 2 * window, window, reqs, [None] * len(reqs))  # warm
    n = 16 * window
    r = stream(srv.target, n, window, reqs, [None] * len(reqs))
    lat = sorted(r.latencies_s)
    return {"tokens_per_s": r.tokens / r.wall_s, "requests_per_s": r.requests / r.wall_s,
            "p50_ms": median(lat) * 1e3, "p99_ms": lat[int(0.99 * (len(lat) - 1))] * 1e3}


def configs(args: argparse.Namespace, sink_port: int) -> list[tuple[str, Path, tuple[str, ...]]]:
    """(name, CLI, serve flags) for every CLI x --max-batch-tokens x tracing off/on."""
    clis = [c.split("=", 1) for c in args.cli] or [["", str(CLI)]]
    out = []
    for label, cli in clis:
        for tokens in [int(t) for t in args.tokens.split(",")]:
            for tracing in ([False, True] if args.tracing else [False]):
                name = f"{label + ' ' if label else ''}{tokens}{' traced' if tracing else ''}"
                flags = ("--max-batch-tokens", str(tokens), "--http-port", "0",
                         *(("--otlp-endpoint", f"http://127.0.0.1:{sink_port}")
                           if tracing else ()))
                out.append((name, Path(cli), flags))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path)
    p.add_argument("--tokens", default="1024,2048,4096,8192")
    p.add_argument("--clients", default="1,8,32,1x256,s32",
                   help="levels: C clients of one text each, CxN: C clients of N texts each, "
                   "sW: one stream with W one-text requests in flight")
    p.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    p.add_argument("--rounds", type=int, default=3,
                   help="each round measures in process, then the service, at every level")
    p.add_argument("--tracing", action="store_true", help="also run each size with tracing on")
    p.add_argument("--cli", action="append", default=[], metavar="NAME=PATH",
                   help="compare moe-embed CLIs (e.g. two checkouts) side by side")
    p.add_argument("--paired", action="store_true",
                   help="start every config's server at once and measure them in turn at each "
                   "level of each round (side by side within seconds: for A/B comparisons)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sweep.json")
    args = p.parse_args(argv)
    if args.bundle is None:
        from artifacts import default_cache, ensure

        args.bundle = ensure(default_cache()).routed.path
    clients = args.clients.split(",")
    texts = json.loads(TEXTS.read_text())
    kind, flags = cpu_isa()
    report = {"cpu": kind, "isa": flags, "load_before": load_average(), "bundle":
              str(args.bundle), "rounds": args.rounds, "seconds": args.seconds, "service": {}}
    print(f"CPU {kind} ({' '.join(flags)}); load {report['load_before']}", flush=True)
    embedder = LocalEmbedder(args.bundle, 2)
    sink = Sink()
    port = sink.port.value
    plan = configs(args, port) if args.paired else None
    with tempfile.TemporaryDirectory() as logs:
        groups = [plan] if plan else [[c] for c in configs(args, port)]
        for group in groups:  # --paired: every config's server up at once, measured in turn
            servers = {}
            try:
                for name, cli, serve_flags in group:
                    servers[name] = ServeProcess(
                        args.bundle, Path(logs) / f"{len(report['service'])}-{name}.log",
                        "--workers", "1", "--threads-per-worker", "2", "--log-level",
                        "warning", *serve_flags, cli=cli,
                        strip_thread_env=True)
                for srv in servers.values():
                    srv.wait_serving(600)
                rounds = {name: {c: [] for c in clients} for name in servers}
                for _ in range(args.rounds):
                    for c in clients:
                        n, per = level(c)
                        ref = in_process(embedder, texts, n * per, args.seconds)
                        for name, srv in servers.items():
                            got = (w5(srv, texts, n, args.seconds) if c.startswith("s") else
                                   service(srv, texts, n, args.seconds, per))
                            got |= {"in_process_tokens_per_s": ref,
                                    "ratio": got["tokens_per_s"] / ref}
                            rounds[name][c].append(got)
                            mix = (f", {got['batches']:.0f} batches of {got['mean_requests']:.1f} "
                                   f"requests ({got['of_one_request']:.0f} of one)"
                                   if got.get("mean_requests") else "")
                            print(f"    {name:>14} {c:>5} clients: {got['tokens_per_s']:6.1f} "
                                  f"tok/s vs {ref:6.1f} in process = {got['ratio']:.2f}x, "
                                  f"p50 {got['p50_ms']:.0f} ms{mix}", flush=True)
            finally:
                for srv in servers.values():
                    srv.stop()
            for name, levels in rounds.items():
                report["service"][name] = {
                    c: {"rounds": rs, "ratio": median(r["ratio"] for r in rs),
                        "p50_ms": median(r["p50_ms"] for r in rs),
                        "p99_ms": median(r["p99_ms"] for r in rs)} for c, rs in levels.items()}
    report["spans_exported"] = sink.stop()
    report["load_after"] = load_average()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nmedian of {args.rounds} rounds, service / in process (batches of the same size), "
          "and p50")
    print(f"{'config':>22} " + " ".join(f"{c:>16}" for c in clients))
    for name, levels in report["service"].items():
        cells = [f"{levels[str(c)]['ratio']:5.2f}x p50 {levels[str(c)]['p50_ms']:5.0f}"
                 for c in clients]
        print(f"{name:>22} " + " ".join(f"{x:>16}" for x in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
