"""Script, not a test: how long writing one /v1/embeddings body (256 x 768 float32 as JSON)
stops the frontend's other threads, written in one orjson call against a vector at a time
(service/http/embeddings_body.py), both in a second thread as the server does.

    .venv/bin/python benchmarks/body_stall.py [--inputs 256] [--dims 768] [--bodies 40]

orjson holds the GIL for a whole call, so a thread that wakes up meanwhile (the HTTP loop, the
engine's loop) waits until the call ends. The main thread here sleeps 0.2 ms at a time and
records how late each wake-up was: its worst lateness is the stall another caller would see.
The server's switch interval (0.5 ms) is set as `serve` sets it.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import numpy as np
import orjson

from moe_embed.service.http.embeddings_body import embeddings_body
from moe_embed.service.serve_command import SWITCH_INTERVAL_S

TICK_S = 0.0002


def one_call(vectors: list[np.ndarray], model: str) -> bytes:
    """The body as one orjson call over the whole object (how it was written before)."""
    return orjson.dumps({"object": "list", "data": [
        {"object": "embedding", "index": i, "embedding": v, "truncated": False}
        for i, v in enumerate(vectors)], "model": model,
        "usage": {"prompt_tokens": 1, "total_tokens": 1}}, option=orjson.OPT_SERIALIZE_NUMPY)


def in_pieces(vectors: list[np.ndarray], model: str) -> bytes:
    return embeddings_body(vectors, [False] * len(vectors), "float", model, 1)


def measure(write, vectors: list[np.ndarray], bodies: int) -> dict:
    """Write `bodies` bodies back to back in a thread; the main thread's wake-up lateness."""
    done = threading.Event()
    took: list[float] = []

    def writer() -> None:
        for _ in range(bodies):
            t0 = time.perf_counter()
            write(vectors, "m")
            took.append(time.perf_counter() - t0)
        done.set()

    late: list[float] = []
    thread = threading.Thread(target=writer)
    thread.start()
    while not done.is_set():
        t0 = time.perf_counter()
        time.sleep(TICK_S)
        late.append(time.perf_counter() - t0 - TICK_S)
    thread.join()
    late.sort()
    took.sort()
    return {"body_ms_p50": took[len(took) // 2] * 1e3,
            "lateness_ms_p50": late[len(late) // 2] * 1e3,
            "lateness_ms_p99": late[int(0.99 * len(late))] * 1e3,
            "lateness_ms_max": late[-1] * 1e3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", type=int, default=256)
    p.add_argument("--dims", type=int, default=768)
    p.add_argument("--bodies", type=int, default=40)
    args = p.parse_args(argv)
    from machine import cpu_isa, load_average

    kind, flags = cpu_isa()
    print(f"CPU {kind} ({' '.join(flags)}); load {load_average()['uptime']}", flush=True)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal(args.dims).astype(np.float32) for _ in range(args.inputs)]
    assert one_call(vectors, "m") == in_pieces(vectors, "m")
    report = {}
    for name, write in (("one call", one_call), ("a vector at a time", in_pieces)) * 2:
        report.setdefault(name, []).append(measure(write, vectors, args.bodies))
    for name, runs in report.items():
        r = min(runs, key=lambda x: x["lateness_ms_max"])  # the quieter of two rounds
        print(f"{name:>20}: body {r['body_ms_p50']:.1f} ms; another thread's wake-up late by "
              f"p50 {r['lateness_ms_p50']:.2f} / p99 {r['lateness_ms_p99']:.2f} / max "
              f"{r['lateness_ms_max']:.2f} ms")
    print(json.dumps({"cpu": kind, "isa": flags, "inputs": args.inputs, "dims": args.dims,
                      "runs": report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
