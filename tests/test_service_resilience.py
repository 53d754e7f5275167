"""The service under stress: health transitions, a flood past the queue bound, workers killed
mid-load, and a SIGTERM drain of a real `moe-embed serve` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_fixtures import (
    NOT_SERVING,
    SERVING,
    TASKS,
    Expected,
    ServerThread,
    free_port,
    health_status,
    vectors,
    wait_for,
)

from moe_embed.v1 import embedder_pb2 as pb
from moe_embed.v1 import embedder_pb2_grpc as pb_grpc

ATOL = 1e-5
ADMIT_MARGIN_S = 0.2  # a request sent this long before SIGTERM has reached the server


def _request(texts, task="search_query", **kw) -> pb.EmbedRequest:
    return pb.EmbedRequest(inputs=texts, task=TASKS[task], **kw)


def _watch(target: str, service: str, seen: list[int]) -> threading.Thread:
    def run() -> None:
        with grpc.insecure_channel(target) as ch:
            try:
                for resp in health_pb2_grpc.HealthStub(ch).Watch(
                        health_pb2.HealthCheckRequest(service=service), timeout=120):
                    seen.append(resp.status)
            except grpc.RpcError:
                pass  # the server went away

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_health_transitions_and_flood_past_the_queue_bound(tiny_bundle) -> None:
    srv = ServerThread(tiny_bundle, max_queue=8).start(wait_ready=False)
    watched: list[int] = []
    try:
        assert health_status(srv.target) == NOT_SERVING
        assert health_status(srv.target, "moe_embed.v1.Embedder") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as exc:  # nothing is queued before workers load
            srv.stub().Embed(_request(["too early"]))
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        watcher = _watch(srv.target, "moe_embed.v1.Embedder", watched)
        srv.wait_ready()
        assert health_status(srv.target) == SERVING
        assert health_status(srv.target, "moe_embed.v1.Embedder") == SERVING

        stub = srv.stub()
        texts = ["a longer text to keep the worker busy for a little while " * 20] * 4
        with ThreadPoolExecutor(32) as ex:
            futures = [ex.submit(stub.Embed, _request(texts), timeout=60) for _ in range(64)]
            codes = []
            for f in futures:
                try:
                    f.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    codes.append(e.code())
                    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        assert "queue full" in e.details() and "max_queue 8" in e.details()
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert len(stub.Embed(_request(["after the flood"])).embeddings) == 1
    finally:
        srv.stop()
    watcher.join(10)
    assert watched[0] == NOT_SERVING and SERVING in watched
    assert watched[watched.index(SERVING):][-1] == NOT_SERVING  # NOT_SERVING again on drain


@pytest.fixture(scope="module")
def two_workers(tiny_bundle):
    srv = ServerThread(tiny_bundle, workers=2).start()
    yield srv
    srv.stop()


def _in_flight(srv: ServerThread, index: int) -> int:
    return srv.on_loop(lambda: len(srv.pool.workers[index].in_flight))


def test_worker_sigkilled_mid_load_loses_nothing(two_workers, tiny_bundle,
                                                 multilingual_texts) -> None:
    srv = two_workers
    expected = Expected(tiny_bundle)
    batches = [multilingual_texts[i:i + 4] for i in range(0, 24, 4)]
    for texts in batches:
        expected(texts, "search_query")
    failures: list[BaseException] = []
    done = []
    stop = threading.Event()

    def client(k: int) -> None:
        stub = srv.stub()
        i = k
        while not stop.is_set():
            texts = batches[i % len(batches)]
            i += 1
            try:
                got = vectors(stub.Embed(_request(texts), timeout=60))
                np.testing.assert_allclose(got, expected(texts, "search_query"), atol=ATOL,
                                           rtol=0)
                done.append(1)
            except BaseException as exc:  # reported below
                failures.append(exc)

    victim = srv.pool.pids()[0]
    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(done) > 20, 30, "load to run")
        os.kill(victim, signal.SIGSTOP)  # hold its batches in flight...
        wait_for(lambda: _in_flight(srv, 0) > 0, 10, "a batch in flight on the victim")
        os.kill(victim, signal.SIGKILL)  # ...and kill it with them
        wait_for(lambda: srv.pool.restarts == 1 and srv.pool.ready_count == 2, 120,
                 "the worker to be restarted")
        served = len(done)
        wait_for(lambda: len(done) > served + 20, 30, "load to go on after the restart")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not failures, failures[:3]
    assert srv.pool.resent_batches >= 1
    assert srv.pool.pids()[0] != victim


def test_batch_that_kills_two_workers_fails_with_internal(two_workers) -> None:
    srv = two_workers
    wait_for(lambda: srv.pool.ready_count == 2, 120, "both workers ready")
    pids = srv.pool.pids()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    future = srv.stub().Embed.future(_request(["doomed"]), timeout=120)
    wait_for(lambda: _in_flight(srv, 0) + _in_flight(srv, 1) == 1, 10, "the batch in flight")
    first = 0 if _in_flight(srv, 0) else 1
    resent = srv.pool.resent_batches
    os.kill(pids[first], signal.SIGKILL)
    wait_for(lambda: srv.pool.resent_batches == resent + 1 and _in_flight(srv, 1 - first) == 1,
             10, "the batch to be sent to the other worker")
    os.kill(pids[1 - first], signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as exc:
        future.result()
    assert exc.value.code() == grpc.StatusCode.INTERNAL
    assert "batch" in exc.value.details() and "2 workers that died" in exc.value.details()
    wait_for(lambda: srv.pool.ready_count == 2, 120, "both workers restarted")
    assert len(srv.stub().Embed(_request(["alive again"])).embeddings) == 1


def test_sigterm_drains_without_losing_requests(tiny_bundle, tmp_path) -> None:
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("moe-embed")), "serve",
             "--bundle", str(tiny_bundle), "--host", "127.0.0.1", "--port", str(port),
             "--metrics-port", "0",
             "--workers", "1", "--threads-per-worker", "1"],
            env={**os.environ, "MOE_EMBED_DRAIN_GRACE_S": "30"},
            stdout=log_file, stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    try:
        wait_for(lambda: health_status(target) == SERVING, 120, "the server to serve",
                 interval=0.1)
        watched: list[int] = []
        watcher = _watch(target, "", watched)
        texts = [f"document {i}: " + "some words to embed " * 60 for i in range(16)]
        outcomes: list[tuple[float, float, grpc.StatusCode, str]] = []
        lock = threading.Lock()
        stop = threading.Event()

        def client() -> None:
            with grpc.insecure_channel(target) as ch:
                stub = pb_grpc.EmbedderStub(ch)
                while not stop.is_set():
                    start = time.monotonic()
                    try:
                        resp = stub.Embed(_request(texts), timeout=60)
                        code, detail = grpc.StatusCode.OK, str(len(resp.embeddings))
                    except grpc.RpcError as e:
                        code, detail = e.code(), e.details()
                    with lock:
                        outcomes.append((start, time.monotonic(), code, detail))
                    if code != grpc.StatusCode.OK:
                        return

        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        wait_for(lambda: len(outcomes) >= 6, 60, "requests to complete")
        sigterm_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        stop.set()
        for t in threads:
            t.join(60)
        watcher.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = log_path.read_text()
    assert '"event": "draining"' in log and '"finished_in_grace": true' in log, log[-3000:]
    # sent well before SIGTERM: surely admitted, so each must finish, some during the drain
    admitted = [o for o in outcomes if o[0] < sigterm_at - ADMIT_MARGIN_S]
    assert all(o[2] == grpc.StatusCode.OK and o[3] == "16" for o in admitted), admitted
    assert any(o[1] > sigterm_at for o in admitted), "no request was in flight at SIGTERM"
    for _, _, code, detail in outcomes:  # the rest: done, or refused before any work (retryable)
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE), (code, detail)
    assert watched[-1] == NOT_SERVING
