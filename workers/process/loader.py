"""The loader: one process that loads the runtime once and forks every worker from it.

A worker that loads its own runtime holds its own copy of every weight: ONNX Runtime prepacks
each MatMul's weights into private memory, so N workers on one bundle cost N times the memory.
Workers forked from a process that has loaded the runtime share those pages copy-on-write
(nothing writes them after loading), and a worker that dies is replaced in milliseconds, not
in the seconds a load takes.

Forking is safe only when the runtime has started no threads that the child would need: ORT's
intra-op pool does not survive fork, so the frontend uses the loader only for workers with one
thread each (then ORT runs every op on the caller's thread, and torch's router is single-
threaded anyway); workers with more threads load their own runtime (`main.worker_main`).

The loader is started as its own program (`python -m moe_embed.workers.process.loader`) with
nothing inherited but stdio and its control socket, so the workers it forks hold no descriptor
that would keep a dead loader looking alive to the frontend.

Protocol on the control connection (a socket pair): the frontend sends Fork(index) followed by
the worker's two pipe ends as file descriptors (SCM_RIGHTS); the loader sends Ready once loaded,
or LoadFailed, after which it answers every pending Fork with LoadFailed on that worker's pipe
and exits, so that the frontend's next restart starts a fresh loader (the bundle may have been
fixed meanwhile). The loader exits when the frontend's end of the control connection closes;
its workers then live on until their own pipes close.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import sys
import time
from multiprocessing.connection import Connection
from multiprocessing.reduction import recvfds, sendfds

import structlog

from ..logs import configure_json_logging
from . import protocol
from .main import ignore_interrupts, load_runtime, serve
from .priority import lower_priority


def send_fork(control: Connection, index: int, requests_fd: int, results_fd: int) -> None:
    """Frontend side: ask for worker `index` on these pipe ends (the loader gets duplicates;
    the caller closes its own)."""
    control.send_bytes(protocol.Fork(index).encode())
    with socket.socket(fileno=os.dup(control.fileno())) as sock:
        sendfds(sock, [requests_fd, results_fd])


def _receive_fork(control: Connection) -> tuple[int, int, int]:
    msg = protocol.decode(control.recv_bytes())
    assert isinstance(msg, protocol.Fork), msg
    with socket.socket(fileno=os.dup(control.fileno())) as sock:
        requests_fd, results_fd = recvfds(sock, 2)
    return msg.index, requests_fd, results_fd


def _name_process(name: str) -> None:
    """What `ps -o comm` and `top` show (forked workers keep the loader's command line)."""
    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _fork_worker(runtime, control: Connection, index: int, requests_fd: int, results_fd: int,
                 log_level: str) -> int:
    """Fork worker `index` serving on the given pipe ends; returns its pid (in the loader)."""
    asked = time.perf_counter()
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:  # the worker: never returns into the loader's loop
        control.close()
        _name_process(f"moe-embed-w{index}")
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        configure_json_logging(log_level, worker=index, pid=os.getpid())
        requests = Connection(requests_fd, writable=False)
        results = Connection(results_fd, readable=False)
        fork_s = time.perf_counter() - asked
        structlog.get_logger("moe_embed.worker").info(
            "worker_ready", load_s=round(fork_s, 4), threads=1, forked=True)
        results.send_bytes(protocol.Ready(os.getpid(), fork_s).encode())
        serve(runtime, requests, results)
    except BaseException:  # noqa: BLE001 - a forked child must never unwind into the loader
        code = 1
    finally:
        os._exit(code)


def _refuse(results_fd: int, requests_fd: int, message: str) -> None:
    os.close(requests_fd)
    with Connection(results_fd, readable=False) as results:
        try:
            results.send_bytes(protocol.LoadFailed(message).encode())
        except OSError:
            pass


def command(control_fd: int, bundle_path: str, log_level: str, nice: int = 0) -> list[str]:
    """The command line that starts a loader on an inherited control socket."""
    return [sys.executable, "-m", __name__, "--control-fd", str(control_fd),
            "--bundle", bundle_path, "--log-level", log_level, "--nice", str(nice)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="moe-embed's worker loader (started by the "
                                 "frontend, not by hand)")
    ap.add_argument("--control-fd", type=int, required=True)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--nice", type=int, default=0, help="steps below the frontend")
    args = ap.parse_args(argv)
    loader_main(Connection(args.control_fd), args.bundle, args.log_level, args.nice)


def loader_main(control: Connection, bundle_path: str, log_level: str = "info",
                nice: int = 0) -> None:
    """Load, report, then fork workers on request until the frontend goes. Runs `nice` steps
    below the frontend, and so do the workers it forks (priority.py)."""
    ignore_interrupts()
    niceness = lower_priority(nice)
    _name_process("moe-embed-load")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the workers
    configure_json_logging(log_level, role="loader", pid=os.getpid())
    log = structlog.get_logger("moe_embed.loader")
    start = time.perf_counter()
    try:
        runtime = load_runtime(bundle_path, threads=1)
    except Exception as exc:
        log.error("loader_load_failed", error=str(exc))
        try:
            control.send_bytes(protocol.LoadFailed(str(exc)).encode())
            while control.poll(0):  # every worker asked for so far learns why
                _, requests_fd, results_fd = _receive_fork(control)
                _refuse(results_fd, requests_fd, str(exc))
        except (EOFError, OSError):
            pass
        return
    load_s = time.perf_counter() - start
    threads = len(os.listdir("/proc/self/task"))  # must be 1: a fork copies only this one
    log.info("loader_ready", load_s=round(load_s, 3), threads=threads, nice=niceness)
    try:
        control.send_bytes(protocol.Ready(os.getpid(), load_s).encode())
        while True:
            index, requests_fd, results_fd = _receive_fork(control)
            pid = _fork_worker(runtime, control, index, requests_fd, results_fd, log_level)
            os.close(requests_fd)  # the worker holds the only copies now
            os.close(results_fd)
            log.info("worker_forked", worker=index, worker_pid=pid)
    except (EOFError, OSError):
        log.info("loader_frontend_gone")


if __name__ == "__main__":
    main()
