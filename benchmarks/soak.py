"""Script, not a test: a mixed flood against `moe-embed serve` over loopback, then a report.

    .venv/bin/python benchmarks/soak.py [--duration 600] [--overload 10] [--bundle DIR]

Starts the server (2 workers, the demo bundle unless --bundle), measures its capacity and the
light clients' unloaded latency (the same 6 light clients, once warm, for 10 s before the
flood: the figure their loaded latency is held to; one client alone is reported too), then
for --duration seconds runs at once:
- light clients: one short text per unary call, back to back, in a process of their own (so
  their latencies are the server's, not the flood generator's GIL);
- the flood (below) from this process, at nice 10 once the server and the light clients are up:
  on a small machine the load generator would otherwise take the server's cores, which in
  production it does not share;
- heavy streams: 256-input requests offered at --overload x the measured capacity;
- oversized inputs (3.9 MB strings), garbage bytes, calls cancelled or past their deadline,
  streams that never read their responses;
- one worker SIGKILLed and, later, one SIGSTOPped (taken for stuck and replaced);
- hostile HTTP (the second probe's findings): sockets that stop mid-header, mid-body or after a
  response (each must be closed by the server within its timeout: 10 s here), 4 MB token-id
  bodies (400 or 413 before they are read whole), clients that hang up mid-body (CANCELLED),
  200 idle connections to the metrics port (no thread each), a burst of 1,500 calls on a fresh
  channel (every call answered or refused visibly), big Tokenize calls (both sides must count
  the same codes).
Every OK vector is checked against the same text embedded alone (in process). Then the flood
stops and the light latency must recover. Prints requests by status, light p50/p99 against
unloaded, frontend and worker RSS (start, peak, end), restarts, lost or wrong responses, and
a verdict per target. Run it on a quiet machine: other work skews every latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
from slow_clients import (
    SLOW_KINDS,
    closed_by_server,
    hang_up,
    id_flood_body,
    open_slow,
    post_raw,
)
from verdicts import finish

from moe_embed.service.demo import ensure_demo_bundle
from moe_embed.service.local import LocalEmbedder
from moe_embed.testing import procfs
from moe_embed.testing.service import ServeProcess
from moe_embed.v1 import embedder_pb2 as pb
from moe_embed.v1 import embedder_pb2_grpc as pb_grpc

TEXTS = json.loads((Path(__file__).resolve().parents[1] / "tests/data/multilingual.json")
                   .read_text())
LIGHT_CLIENTS = 6
UNLOADED_S = 10.0  # the light clients run this long alone before the flood starts
FLOOD_NICE = 10  # the flood generator's niceness (the server and light clients keep 0)
HEAVY_INPUTS = 256
ATOL = 1e-5
HTTP_TIMEOUT_S = 10  # the server's HTTP header, body and keep-alive timeouts in the soak
SLOW_SOCKETS = 60  # held open at once, of every kind
CLOSE_SLACK_S = 5  # a slow socket the server has not closed this long past its timeout is late
IDLE_METRICS_SOCKETS = 200
BURST_CALLS = 1500


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def light_clients(target: str, expected: dict[str, list[float]], clients: int,
                  seconds: float, out) -> None:
    """The light clients, in a process of their own so that their latencies do not include
    the flood generator's GIL: one short text per unary call, back to back, every vector
    checked, for `seconds` after each client's first answer. Sends the monotonic time at which
    every client had its first answer, then (latencies as (monotonic start, ms), codes,
    vectors checked, wrong) to `out`."""
    want = {t: np.asarray(v, dtype=np.float32) for t, v in expected.items()}
    lock, ms, codes, tally = threading.Lock(), [], Counter(), {"checked": 0, "wrong": 0}
    split: list[tuple[float, float, float]] = []  # the server's queue / compute / total ms
    warm = threading.Barrier(clients)
    ready: list[float] = []

    def loop(k: int) -> None:
        stub = pb_grpc.EmbedderStub(grpc.insecure_channel(target))
        rng = random.Random(k)
        stub.Embed(pb.EmbedRequest(inputs=[TEXTS[0]], task=pb.TASK_SEARCH_DOCUMENT), timeout=60)
        if warm.wait() == 0:
            ready.append(time.monotonic())
            out.send(ready[0])
        warm.wait()
        stop_at = ready[0] + seconds
        while time.monotonic() < stop_at:
            text = rng.choice(TEXTS)
            at, t = time.monotonic(), time.perf_counter()
            try:
                resp = stub.Embed(pb.EmbedRequest(inputs=[text], task=pb.TASK_SEARCH_DOCUMENT),
                                  timeout=60)
                took = (time.perf_counter() - t) * 1e3
                got = [np.asarray(e.values, dtype=np.float32) for e in resp.embeddings]
                bad = len(got) != 1 or not np.allclose(got[0], want[text], atol=ATOL)
                with lock:
                    ms.append((at, took))
                    split.append((resp.timing.queue_ms, resp.timing.compute_ms,
                                  resp.timing.total_ms))
                    codes["OK"] += 1
                    tally["checked"] += 1
                    tally["wrong"] += bad
            except grpc.RpcError as e:
                with lock:
                    codes[e.code().name] += 1

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.send({"light_ms": ms, "split": split, "codes": dict(codes), **tally})
    out.close()


class Soak:
    def __init__(self, bundle: Path, log: Path, overload: float,
                 serve_args: Sequence[str] = ()) -> None:
        self.srv = ServeProcess(bundle, log, "--workers", "2", "--threads-per-worker", "1",
                                "--batch-timeout-s", "2",
                                "--http-header-timeout-s", str(HTTP_TIMEOUT_S),
                                "--http-body-timeout-s", str(HTTP_TIMEOUT_S),
                                "--http-keepalive-s", str(HTTP_TIMEOUT_S), *serve_args)
        self.overload = overload
        self.reference = LocalEmbedder(bundle, threads=1)
        self._memo: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self.codes: Counter = Counter()
        self.wrong = 0
        self.checked = 0
        self.light_ms: list[tuple[float, float]] = []  # (time, latency ms)
        self.stop = threading.Event()
        self.rss: dict[str, list[float]] = {"frontend": [], "workers": []}
        self.threads: list[int] = []  # the frontend's OS threads, sampled with the RSS
        self.slow_closed: list[float] = []  # seconds until the server closed a slow socket
        self.slow_late = 0  # slow sockets still open CLOSE_SLACK_S past their timeout
        self.burst: Counter = Counter()

    # -- bookkeeping -------------------------------------------------------------------------
    def expected(self, text: str) -> np.ndarray:
        with self._lock:
            if text not in self._memo:
                self._memo[text] = self.reference.embed([text], "search_document").vectors[0]
            return self._memo[text]

    def check(self, texts: list[str], resp: pb.EmbedResponse) -> None:
        got = [np.asarray(e.values, dtype=np.float32) for e in resp.embeddings]
        bad = len(got) != len(texts) or any(
            not np.allclose(g, self.expected(t), atol=ATOL)
            for g, t in zip(got, texts, strict=True))
        with self._lock:
            self.checked += len(texts)
            self.wrong += bad

    def count(self, what: str, code: grpc.StatusCode | str) -> None:
        name = code if isinstance(code, str) else code.name
        with self._lock:
            self.codes[(what, name)] += 1

    def stub(self, **options) -> pb_grpc.EmbedderStub:
        return pb_grpc.EmbedderStub(grpc.insecure_channel(self.srv.target,
                                                          options=list(options.items())))

    def sample_rss(self) -> None:
        """Frontend RSS; the workers' (and their loader's) total PSS, which counts the weights
        they share once."""
        pid = self.srv.proc.pid
        self.rss["frontend"].append(procfs.rss_mb(pid))
        self.threads.append(procfs.thread_count(pid))
        self.rss["workers"].append(sum(procfs.pss_mb(p) for p in procfs.descendants(pid)))

    # -- the clients -------------------------------------------------------------------------
    def heavy(self, k: int, rate_inputs_s: float) -> None:
        """A stream offering 256-input requests at `rate_inputs_s`, reading its responses."""
        rng = random.Random(100 + k)
        sent: dict[str, list[str]] = {}

        def requests():
            i, start = 0, time.monotonic()
            while not self.stop.is_set():
                i += 1
                texts = [rng.choice(TEXTS) for _ in range(HEAVY_INPUTS)]
                sent[str(i)] = texts
                yield pb.EmbedRequest(id=str(i), inputs=texts, task=pb.TASK_SEARCH_DOCUMENT)
                ahead = start + i * HEAVY_INPUTS / rate_inputs_s - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        try:
            for resp in self.stub().EmbedStream(requests(), timeout=3600):
                texts = sent.pop(resp.id, None)
                if resp.HasField("error"):
                    self.count("heavy", grpc.StatusCode(_status(resp.error.code)))
                elif texts is None:
                    self.count("heavy", "UNKNOWN_ID")
                else:
                    self.count("heavy", grpc.StatusCode.OK)
                    self.check(texts, resp)
                if self.stop.is_set():
                    break
        except grpc.RpcError as e:
            self.count("heavy-stream", e.code())

    def hostile(self) -> None:
        """Oversized inputs, garbage bytes, cancellations, deadlines, unread streams."""
        stub, rng = self.stub(), random.Random(7)
        raw = grpc.insecure_channel(self.srv.target).unary_unary("/moe_embed.v1.Embedder/Embed")
        big = "word " * 780_000
        unread = []
        while not self.stop.is_set():
            kind = rng.choice(["oversized", "garbage", "cancel", "deadline", "unread"])
            try:
                if kind == "oversized":
                    stub.Embed(pb.EmbedRequest(inputs=[big], task=pb.TASK_NONE), timeout=60)
                elif kind == "garbage":
                    raw(bytes(rng.getrandbits(8) for _ in range(64)), timeout=10)
                elif kind == "cancel":
                    f = stub.Embed.future(pb.EmbedRequest(inputs=TEXTS[:8], task=pb.TASK_NONE))
                    time.sleep(rng.random() * 0.05)
                    f.cancel()
                    kind = "cancel-sent"
                elif kind == "deadline":
                    stub.Embed(pb.EmbedRequest(inputs=TEXTS[:8], task=pb.TASK_NONE),
                               timeout=0.005)
                elif kind == "unread" and len(unread) < 4:
                    reqs = iter([pb.EmbedRequest(id=str(i), inputs=TEXTS[:4],
                                                 task=pb.TASK_NONE) for i in range(2000)])
                    unread.append(self.stub(**{"grpc.http2.bdp_probe": 0}).EmbedStream(
                        reqs, timeout=3600))
                self.count(kind, grpc.StatusCode.OK)
            except grpc.RpcError as e:
                self.count(kind, e.code())
            time.sleep(0.2)
        for s in unread:
            s.cancel()

    def slow_sockets(self) -> None:
        """SLOW_SOCKETS slow sockets of every kind kept open, each timed (every 0.2 s) until
        the server closes it, on a thread of its own so that the timing is the server's."""
        port, rng = self.srv.http_port, random.Random(11)
        held: list[tuple] = []
        idle = [open_slow(self.srv.metrics_port, "half-header")
                for _ in range(IDLE_METRICS_SOCKETS)]
        while not self.stop.is_set():
            while len(held) < SLOW_SOCKETS:
                held.append((open_slow(port, rng.choice(SLOW_KINDS)), time.monotonic()))
            for item in list(held):
                sock, opened = item
                age = time.monotonic() - opened
                closed = closed_by_server(sock)
                if closed or age > HTTP_TIMEOUT_S + CLOSE_SLACK_S:
                    with self._lock:
                        if closed:
                            self.slow_closed.append(age)
                        else:
                            self.slow_late += 1
                    sock.close()
                    held.remove(item)
            time.sleep(0.2)
        for sock, _ in held:
            sock.close()
        for sock in idle:
            sock.close()

    def http_hostile(self) -> None:
        """By turns: a 4 MB token-id body, a hang-up mid-body, a big Tokenize."""
        port, rng = self.srv.http_port, random.Random(12)
        flood, stub = id_flood_body(4.0), self.stub()
        while not self.stop.is_set():
            kind = rng.choice(["id-flood", "hang-up", "tokenize"])
            if kind == "id-flood":
                status, _ = post_raw(port, flood)
                self.count(kind, f"HTTP_{status}")
            elif kind == "hang-up":
                hang_up(port)
                self.count(kind, "sent")
            else:
                try:
                    stub.Tokenize(pb.TokenizeRequest(inputs=[rng.choice(TEXTS) * 40] * 256,
                                                      task=pb.TASK_NONE), timeout=60)
                    self.count(kind, grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    self.count(kind, e.code())
            time.sleep(0.5)

    def burst_calls(self, delay: float) -> None:
        """Once, BURST_CALLS unary calls at once on a fresh channel (streams past the
        connection's limit wait in the client until streams free up: every call must be answered
        or refused visibly)."""
        if self.stop.wait(delay):
            return

        async def burst() -> list[str]:
            async with grpc.aio.insecure_channel(self.srv.target) as channel:
                stub = pb_grpc.EmbedderStub(channel)
                calls = [stub.Embed(pb.EmbedRequest(inputs=[TEXTS[i % len(TEXTS)]],
                                                    task=pb.TASK_SEARCH_DOCUMENT), timeout=120)
                         for i in range(BURST_CALLS)]
                got = await asyncio.gather(*calls, return_exceptions=True)
            return [g.code().name if isinstance(g, grpc.RpcError) else "OK" for g in got]
        self.burst.update(asyncio.run(burst()))

    def faults(self, duration: float) -> list[str]:
        """SIGKILL a worker at a third of the run, SIGSTOP one at two thirds."""
        events = []
        for fraction, sig in ((1 / 3, signal.SIGKILL), (2 / 3, signal.SIGSTOP)):
            if self.stop.wait(duration * fraction - (time.monotonic() - self.started)):
                break
            pid = self.srv.worker_pid(0) if sig == signal.SIGKILL else self._live_worker()
            if pid:
                os.kill(pid, sig)
                events.append(f"{sig.name} worker pid {pid}")
        return events

    def _live_worker(self) -> int | None:
        ready = self.srv.events("worker_ready")
        return int(ready[-1]["pid"]) if ready else None

    # -- the run -----------------------------------------------------------------------------
    def unloaded(self, seconds: float) -> list[float]:
        stub, out, end = self.stub(), [], time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.perf_counter()
            stub.Embed(pb.EmbedRequest(inputs=[random.choice(TEXTS)],
                                       task=pb.TASK_SEARCH_DOCUMENT), timeout=30)
            out.append((time.perf_counter() - t) * 1e3)
        return out

    def capacity(self, seconds: float) -> float:
        """Inputs per second the server completes under a saturating closed loop."""
        stub, done, end = self.stub(), [0], time.monotonic() + seconds

        def loop() -> None:
            while time.monotonic() < end:
                stub.Embed(pb.EmbedRequest(inputs=TEXTS[:32], task=pb.TASK_SEARCH_DOCUMENT),
                           timeout=60)
                with self._lock:
                    done[0] += 32
        threads = [threading.Thread(target=loop) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return done[0] / seconds

    def start_light(self, seconds: float) -> tuple:
        """The light clients' process, running for `seconds` once warm; returns it, its pipe
        and the monotonic time at which it was warm. Collect with `light_results`."""
        ctx = multiprocessing.get_context("spawn")
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=light_clients, args=(
            self.srv.target, {t: self.expected(t).tolist() for t in TEXTS}, LIGHT_CLIENTS,
            seconds, send), daemon=True)
        proc.start()
        send.close()
        if not receive.poll(120):
            raise SystemExit("the light clients did not start")
        return proc, receive, receive.recv()

    @staticmethod
    def light_results(light: tuple) -> dict:
        proc, receive, _ = light
        out = receive.recv() if receive.poll(120) else {"light_ms": [], "codes": {},
                                                          "checked": 0, "wrong": 1}
        proc.join(10)
        return out

    def run(self, duration: float) -> dict:
        self.srv.wait_serving()
        for t in TEXTS:
            self.expected(t)
        self.sample_rss()
        idle = {"frontend_mb": self.rss["frontend"][-1], "workers_mb": self.rss["workers"][-1]}
        unloaded = self.unloaded(10)  # one client alone
        capacity = self.capacity(10)
        rate = self.overload * capacity
        # the light clients: UNLOADED_S without the flood (their unloaded figure), then with it
        light = self.start_light(UNLOADED_S + duration)
        self.started = light[2] + UNLOADED_S
        time.sleep(max(0.0, self.started - time.monotonic()))
        # The flood below comes from this process: in production it would come from other
        # machines, so here it yields the cores to the server (and the light clients) first.
        os.nice(FLOOD_NICE)
        threads = [threading.Thread(target=self.heavy, args=(k, rate / 2)) for k in range(2)]
        threads.append(threading.Thread(target=self.hostile))
        threads.append(threading.Thread(target=self.http_hostile))
        threads.append(threading.Thread(target=self.slow_sockets))
        threads.append(threading.Thread(target=self.burst_calls, args=(duration / 2,)))
        for t in threads:
            t.daemon = True
            t.start()
        fault_log: list[str] = []
        faulter = threading.Thread(target=lambda: fault_log.extend(self.faults(duration)),
                                   daemon=True)
        faulter.start()
        while time.monotonic() - self.started < duration:
            time.sleep(1)
            self.sample_rss()
        flood_end = time.monotonic()
        self.stop.set()
        lights = self.light_results(light)
        self.light_ms = lights["light_ms"]
        self.light_split = lights.get("split", [])
        with self._lock:
            self.checked += lights["checked"]
            self.wrong += lights["wrong"]
            for code, n in lights["codes"].items():
                self.codes[("light", code)] += n
        for t in threads:
            t.join(60)
        for pid in self.srv.worker_pids():  # a stopped worker that was never replaced
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        after = self.unloaded(8)
        recovery = _recovery_s(after, unloaded)
        self.sample_rss()
        m = self.srv.metrics()
        loaded = [ms for at, ms in self.light_ms if self.started <= at < flood_end]
        light_unloaded = [ms for at, ms in self.light_ms if at < self.started]
        self.light_split = [x for (at, _), x in zip(self.light_ms, self.light_split, strict=True)
                            if self.started <= at < flood_end]
        restarts = sum(v for k, v in m.items() if k.startswith("moe_embed_worker_restarts_total"))
        log_lines = self.srv.log_path.read_text().splitlines()
        tokenize = {k.split(":")[1]: n for k, n in self.codes_named().items()
                    if k.startswith("tokenize:")}
        return {
            "duration_s": duration, "overload": self.overload,
            "capacity_inputs_per_s": round(capacity, 1), "offered_inputs_per_s": round(rate, 1),
            "codes": {f"{w}:{c}": n for (w, c), n in sorted(self.codes.items())},
            "vectors_checked": self.checked, "wrong_or_lost": self.wrong,
            "one_client_unloaded_ms": {"p50": statistics.median(unloaded),
                                       "p99": percentile(unloaded, 0.99)},
            "light_unloaded_ms": {"p50": statistics.median(light_unloaded),
                                  "p99": percentile(light_unloaded, 0.99),
                                  "n": len(light_unloaded)},
            "light_loaded_ms": {"p50": statistics.median(loaded) if loaded else None,
                                "p99": percentile(loaded, 0.99), "n": len(loaded)},
            # p99 in each tenth of the flood: the SIGKILL falls in the 4th, the SIGSTOP in the 7th
            "light_p99_by_tenth": _by_tenth(self.light_ms, self.started, flood_end),
            "light_server_ms": {  # the server's own account of a light call (Timing)
                part: {"p50": statistics.median(xs), "p99": percentile(xs, 0.99)}
                for part, xs in zip(("queue", "compute", "total"),
                                    zip(*self.light_split, strict=True), strict=True)
            } if self.light_split else None,
            "recovery_s": recovery,
            "heap_trims": m.get("moe_embed_heap_trims_total"),
            "rss_mb": {"frontend": {"idle": idle["frontend_mb"],
                                    "peak": max(self.rss["frontend"]),
                                    "end": self.rss["frontend"][-1],
                                    # every 10th sample: where in the run the peaks were
                                    "series": [round(x) for x in self.rss["frontend"][::10]]},
                       "workers": {"idle": idle["workers_mb"],
                                   "peak": max(self.rss["workers"]),
                                   "end": self.rss["workers"][-1]}},
            "worker_restarts": restarts, "faults": fault_log,
            "http": {
                "slow_sockets_closed": len(self.slow_closed), "slow_sockets_late": self.slow_late,
                "slow_close_s_max": round(max(self.slow_closed, default=0.0), 2),
                "timeout_s": HTTP_TIMEOUT_S,
                "closed_by_reason": {k.split("{")[1].rstrip("}"): v for k, v in m.items()
                                     if k.startswith("moe_embed_connections_closed_total")},
            },
            "frontend_threads": {"idle": self.threads[0], "peak": max(self.threads)},
            "server_internal": sum(v for k, v in m.items() if k.startswith(
                "moe_embed_errors_total") and 'code="INTERNAL"' in k),
            "burst": dict(self.burst),
            "stream_limit_reached": m.get("moe_embed_grpc_stream_limit_reached_total", 0.0),
            "tokenize_client": tokenize,
            "tokenize_server": {k.split('code="')[1].split('"')[0]: v for k, v in m.items()
                                if k.startswith("moe_embed_requests_total")
                                and 'method="Tokenize"' in k},
            "log": {"lines": len(log_lines), "bytes": self.srv.log_path.stat().st_size,
                    "not_json": sum(not line.startswith("{") for line in log_lines if line)},
        }

    def codes_named(self) -> dict[str, int]:
        with self._lock:
            return {f"{w}:{c}": n for (w, c), n in self.codes.items()}


def _by_tenth(samples: list[tuple[float, float]], start: float, end: float) -> list:
    """p99 of (monotonic start, ms) samples in each tenth of [start, end)."""
    tenths: list[list[float]] = [[] for _ in range(10)]
    for at, ms in samples:
        if start <= at < end:
            tenths[min(9, int(10 * (at - start) / (end - start)))].append(ms)
    return [round(percentile(xs, 0.99), 1) if xs else None for xs in tenths]


def _status(number: int) -> tuple:
    return next(c.value for c in grpc.StatusCode if c.value[0] == number)


def _recovery_s(after: list[float], unloaded: list[float]) -> float | None:
    """Seconds of calls after the flood until latency is back within 2x the unloaded p50
    for 10 calls in a row."""
    limit, elapsed, run = 2 * statistics.median(unloaded), 0.0, 0
    for i, ms in enumerate(after):
        run = run + 1 if ms <= limit else 0
        if run == 10:
            return round(sum(after[: i - 9]) / 1e3, 3)
        elapsed += ms
    return None


def verdicts(r: dict) -> list[tuple[str, str, bool]]:
    bad_codes = sum(n for k, n in r["codes"].items()
                    if k.split(":")[1] in ("UNKNOWN", "INTERNAL", "UNKNOWN_ID"))
    fe = r["rss_mb"]["frontend"]
    light, un = r["light_loaded_ms"], r["light_unloaded_ms"]
    return [
        ("zero lost or wrong responses", f"{r['wrong_or_lost']} of {r['vectors_checked']}",
         r["wrong_or_lost"] == 0),
        ("zero UNKNOWN/INTERNAL", str(bad_codes), bad_codes == 0),
        ("frontend RSS peak <= 1.5x idle", f"{fe['peak']:.0f} / {fe['idle']:.0f} MB",
         fe["peak"] <= 1.5 * fe["idle"]),
        ("light p99 <= 5x unloaded", f"{light['p99']:.1f} / {un['p99']:.1f} ms "
         f"(p50 {light['p50']:.1f} / {un['p50']:.1f})", light["p99"] <= 5 * un["p99"]),
        ("recovery <= 5 s", f"{r['recovery_s']} s",
         r["recovery_s"] is not None and r["recovery_s"] <= 5),
        ("slow HTTP sockets closed by the server in time",
         f"{r['http']['slow_sockets_closed']} closed (slowest {r['http']['slow_close_s_max']} s "
         f"for a {r['http']['timeout_s']} s timeout), {r['http']['slow_sockets_late']} late",
         r["http"]["slow_sockets_late"] == 0 and r["http"]["slow_sockets_closed"] > 0),
        # 400: an id list over the model's 512 (refused after its first KB); 413: over the
        # values any request takes
        ("4 MB token-id bodies refused (400 or 413)", str({
            k: n for k, n in r["codes"].items() if k.startswith("id-flood:")}),
         all(k in ("id-flood:HTTP_400", "id-flood:HTTP_413")
             for k in r["codes"] if k.startswith("id-flood:"))),
        ("no INTERNAL in the server's metrics (hang-ups are CANCELLED)",
         str(r["server_internal"]), r["server_internal"] == 0),
        ("frontend threads do not grow with connections",
         f"{r['frontend_threads']['peak']} / {r['frontend_threads']['idle']} at idle",
         r["frontend_threads"]["peak"] <= r["frontend_threads"]["idle"] + 8),
        # UNAVAILABLE (a refused stream) or CANCELLED (gRPC core's pending calls) never reach
        # a handler or a metric; RESOURCE_EXHAUSTED is the queue's refusal, counted
        ("burst calls answered or refused visibly", f"burst {r['burst']}, limit reached "
         f"{r['stream_limit_reached']:.0f}x",
         set(r["burst"]) <= {"OK", "RESOURCE_EXHAUSTED"}),
        ("Tokenize counted as answered", f"client {r['tokenize_client']}, server "
         f"{r['tokenize_server']}", r["tokenize_client"] == r["tokenize_server"]),
        ("every log line JSON, log under 1 MB per minute",
         f"{r['log']['not_json']} not JSON of {r['log']['lines']}, {r['log']['bytes']} bytes",
         r["log"]["not_json"] == 0
         and r["log"]["bytes"] <= 1e6 * max(1.0, r["duration_s"] / 60)),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=600.0, help="flood seconds (default 600)")
    ap.add_argument("--overload", type=float, default=10.0,
                    help="heavy offered load as a multiple of the measured capacity")
    ap.add_argument("--bundle", type=Path, default=None, help="default: the demo bundle")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    ap.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                    help="one more `moe-embed serve` argument (repeat; e.g. "
                    "--serve-arg=--max-batch-tokens=2048): a sweep's variable")
    args = ap.parse_args(argv)
    bundle = args.bundle or ensure_demo_bundle()
    cpu = sorted(procfs.cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "amx_int8"})
    with tempfile.TemporaryDirectory() as tmp:
        soak = Soak(bundle, Path(tmp) / "serve.log", args.overload, args.serve_arg)
        with soak.srv:
            report = soak.run(args.duration)
    report["cpu_flags"] = cpu
    report["serve_args"] = args.serve_arg
    report["load_average_start"] = os.getloadavg()
    return finish(report, verdicts(report), args.out)


if __name__ == "__main__":
    sys.exit(main())
