"""The service under stress: health transitions, a flood past the queue bound, workers killed
mid-load, and a SIGTERM drain of a real `moe-embed serve` process."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_embed.service.config import WORKER_NICE
from moe_embed.service.server import FINAL_GRACE_S, LAME_DUCK_S
from moe_embed.testing import procfs
from moe_embed.testing.service import (
    NOT_SERVING,
    SERVING,
    TASKS,
    Expected,
    ServeProcess,
    ServerThread,
    health_status,
    vectors,
    wait_for,
)
from moe_embed.v1 import embedder_pb2 as pb
from moe_embed.v1 import embedder_pb2_grpc as pb_grpc

ATOL = 1e-5


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
    """The loading state is created (listening, workers not started), not raced for."""
    srv = ServerThread(tiny_bundle, max_queue=8).start(wait_ready=False, load=False)
    watched: list[int] = []
    try:
        assert health_status(srv.target) == NOT_SERVING
        assert health_status(srv.target, "moe_embed.v1.Embedder") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as exc:  # nothing is queued before workers load
            srv.stub().Embed(_request(["too early"]), timeout=30)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        watcher = _watch(srv.target, "moe_embed.v1.Embedder", watched)
        wait_for(lambda: bool(watched), 30, "the watch to report the loading state")
        srv.load()
        srv.wait_ready()
        assert health_status(srv.target) == SERVING
        assert health_status(srv.target, "moe_embed.v1.Embedder") == SERVING

        # the flood past the bound is created: the worker is stopped, so what the queue and
        # the worker's slots hold stays there and the rest must be refused; then it goes on
        stub = srv.stub()
        texts = ["a longer text to keep the worker busy for a little while " * 20] * 4
        (worker,) = [w.pid for w in srv.pool.workers]
        os.kill(worker, signal.SIGSTOP)
        try:
            with ThreadPoolExecutor(32) as ex:
                futures = [ex.submit(stub.Embed, _request(texts), timeout=60)
                           for _ in range(64)]
                wait_for(lambda: any(f.done() for f in futures), 30, "a refusal")
                assert not all(f.done() for f in futures)  # some are held, not refused
                os.kill(worker, signal.SIGCONT)
                codes = []
                for f in futures:
                    try:
                        f.result()
                        codes.append(grpc.StatusCode.OK)
                    except grpc.RpcError as e:
                        codes.append(e.code())
                        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                            assert "queue full" in e.details() and "max_queue 8" in e.details()
        finally:
            with contextlib.suppress(ProcessLookupError):  # replaced if held past its limit
                os.kill(worker, signal.SIGCONT)
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
    assert srv.scheduler.resent_batches >= 1
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
    resent = srv.scheduler.resent_batches
    os.kill(pids[first], signal.SIGKILL)
    wait_for(lambda: srv.scheduler.resent_batches == resent + 1 and _in_flight(srv, 1 - first) == 1,
             10, "the batch to be sent to the other worker")
    os.kill(pids[1 - first], signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as exc:
        future.result()
    assert exc.value.code() == grpc.StatusCode.INTERNAL
    assert "batch" in exc.value.details() and "2 workers that died" in exc.value.details()
    wait_for(lambda: srv.pool.ready_count == 2, 120, "both workers restarted")
    assert len(srv.stub().Embed(_request(["alive again"])).embeddings) == 1


def _smaps_kb(pid: int, key: str) -> int:
    kb = procfs.smaps_rollup_kb(pid)
    assert key in kb, f"no {key} for {pid}"
    return kb[key]


def test_one_thread_workers_share_the_loaders_weights(two_workers, tiny_bundle) -> None:
    srv = two_workers
    wait_for(lambda: srv.pool.ready_count == 2, 120, "both workers ready")
    stub = srv.stub()
    for k in range(8):
        stub.Embed(_request([f"text number {k} " * (k + 1)] * 4))
    loader = srv.pool.loader_pid()
    assert procfs.thread_count(loader) == 1  # a fork copies only the calling thread
    weights_kb = sum(f.stat().st_size for f in tiny_bundle.rglob("*")
                     if f.suffix in (".onnx", ".data", ".safetensors")) // 1024
    for pid in srv.pool.pids():
        assert procfs.parent_pid(pid) == loader != os.getpid()
        # a worker that loaded its own runtime holds every weight privately
        private = _smaps_kb(pid, "Private_Dirty")
        assert private < weights_kb / 2, (pid, private, weights_kb)
        assert _smaps_kb(pid, "Shared_Dirty") > weights_kb, pid


def test_a_dead_loader_is_replaced_when_a_worker_needs_it(two_workers) -> None:
    srv = two_workers
    wait_for(lambda: srv.pool.ready_count == 2, 120, "both workers ready")
    old_loader, (victim, survivor) = srv.pool.loader_pid(), srv.pool.pids()
    os.kill(old_loader, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{old_loader}"), 10, "the loader to be gone")
    assert len(srv.stub().Embed(_request(["the workers outlive their loader"])).embeddings) == 1
    restarts = srv.pool.restarts
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: srv.pool.restarts == restarts + 1 and srv.pool.ready_count == 2, 120,
             "the worker to be forked from a new loader")
    assert srv.pool.loader_pid() not in (None, old_loader)
    assert srv.pool.pids()[1] == survivor
    assert procfs.parent_pid(srv.pool.pids()[0]) == srv.pool.loader_pid()
    assert len(srv.stub().Embed(_request(["alive again"])).embeddings) == 1


def _inputs_admitted(srv: ServeProcess) -> float:
    """Inputs the server has admitted: those sent to a worker plus those still queued."""
    m = srv.metrics()
    return m.get("moe_embed_batch_size_inputs_sum", 0.0) + m.get("moe_embed_queue_depth", 0.0)


def test_sigterm_drains_without_losing_requests(tiny_bundle, tmp_path) -> None:
    """SIGTERM with requests in flight: every admitted request finishes, later ones are refused
    with UNAVAILABLE (never CANCELLED). The in-flight window is made, not hoped for: the only
    worker is stopped (SIGSTOP) until every request is admitted and the drain has begun."""
    clients = 6
    texts = [f"document {i}: " + "some words to embed " * 60 for i in range(16)]
    with ServeProcess(tiny_bundle, tmp_path / "serve.log", "--workers", "1",
                      "--threads-per-worker", "1", MOE_EMBED_DRAIN_GRACE_S="30") as srv:
        srv.wait_serving()
        (worker,) = srv.worker_pids()
        watched: list[int] = []
        watcher = _watch(srv.target, "", watched)
        late_codes: list[grpc.StatusCode] = []
        late_details: list[str] = []
        finished_at: list[float] = []
        stop = threading.Event()

        def late_client() -> None:
            """Small requests every 10 ms through the drain, and for a second after the
            admitted work is done (then a client gives up on this replica); the server must
            keep refusing them itself until they stop coming."""
            with grpc.insecure_channel(srv.target) as ch:
                stub = pb_grpc.EmbedderStub(ch)
                while not stop.is_set():
                    try:
                        stub.Embed(_request(["late"]), timeout=10)
                        late_codes.append(grpc.StatusCode.OK)
                    except grpc.RpcError as e:
                        late_codes.append(e.code())
                        late_details.append(e.details() or "")
                    if finished_at and time.monotonic() - finished_at[0] > 1.0:
                        return
                    time.sleep(0.01)

        os.kill(worker, signal.SIGSTOP)  # nothing can finish until SIGCONT (or the exit)
        with ThreadPoolExecutor(clients) as ex:
            stub = pb_grpc.EmbedderStub(grpc.insecure_channel(srv.target))
            admitted = [ex.submit(stub.Embed, _request(texts), timeout=60)
                        for _ in range(clients)]
            wait_for(lambda: _inputs_admitted(srv) == clients * len(texts), 30,
                     "every request to be admitted")
            srv.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: NOT_SERVING in watched, 10, "the drain to begin")
            with pytest.raises(grpc.RpcError) as late:  # new work is refused, retryable
                stub.Embed(_request(["too late"]), timeout=10)
            assert late.value.code() == grpc.StatusCode.UNAVAILABLE, late.value.details()
            # longer than a drain that did not wait for admitted work would take to stop (its
            # lame duck ends LAME_DUCK_S after the last call: no call comes meanwhile)
            time.sleep(LAME_DUCK_S + FINAL_GRACE_S + 1.0)
            assert not any(f.done() for f in admitted), "a request finished while stopped"
            hammer = threading.Thread(target=late_client)
            hammer.start()
            time.sleep(0.2)  # late calls are refused while the drain still waits
            os.kill(worker, signal.SIGCONT)
            for f in admitted:  # raises if any admitted request was lost
                assert len(f.result().embeddings) == len(texts)
            finished_at.append(time.monotonic())
        hammer.join(30)
        assert srv.proc.wait(60) == 0
        stop.set()
        watcher.join(10)
    log = srv.log_path.read_text()
    assert '"event": "draining"' in log and '"finished_in_grace": true' in log, log[-3000:]
    assert watched[-1] == NOT_SERVING
    assert late_codes and set(late_codes) <= {grpc.StatusCode.UNAVAILABLE}, late_codes
    # the port stayed open, refusing with the server's own word, until calls stopped coming
    assert all("draining" in d for d in late_details), set(late_details)


def _thread_nices(pid: int) -> set[int]:
    """The niceness of every thread of `pid` (/proc/PID/task/TID/stat, field 19)."""
    return {int((task / "stat").read_text().rsplit(")", 1)[1].split()[16])
            for task in Path(f"/proc/{pid}/task").iterdir()}


def test_workers_run_below_the_frontend(two_workers) -> None:
    """The loader and the workers it forks, every thread of them (ONNX Runtime's too), run
    --worker-nice steps below the frontend, so the frontend's threads get a core first."""
    srv = two_workers
    wait_for(lambda: srv.pool.ready_count == 2, 120, "both workers ready")
    srv.stub().Embed(_request(["a text"] * 4))
    want = min(19, os.getpriority(os.PRIO_PROCESS, 0) + WORKER_NICE)
    assert WORKER_NICE > 0
    for pid in [srv.pool.loader_pid(), *srv.pool.pids()]:
        assert _thread_nices(pid) == {want}, pid


@pytest.mark.parametrize("nice", [0, 7])
def test_workers_that_load_their_own_runtime_run_below_it_too(tiny_bundle, nice: int) -> None:
    """Workers of more than one thread are spawned and load their own runtime: each lowers
    every thread of its own, to --worker-nice steps below the frontend (0: level with it)."""
    srv = ServerThread(tiny_bundle, workers=1, threads_per_worker=2, worker_nice=nice).start()
    try:
        srv.stub().Embed(_request(["a text"] * 4))
        want = min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice)
        (pid,) = srv.pool.pids()
        assert srv.pool.loader_pid() is None
        assert _thread_nices(pid) == {want}
        assert len(list(Path(f"/proc/{pid}/task").iterdir())) >= 2  # the pool's threads too
    finally:
        srv.stop()
