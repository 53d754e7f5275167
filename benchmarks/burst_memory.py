"""Script, not a test: what a burst of calls on one gRPC connection costs the frontend's memory,
for each --max-concurrent-streams given, side by side in one run.

    .venv/bin/python benchmarks/burst_memory.py [--limits 128,1024] [--calls 1500] [--rounds 2]

For each limit: a fresh `moe-embed serve` (demo model, 2 workers x 1 thread, as the soak runs
it), 50 calls to warm it, its RSS, then `--calls` Embed calls at once on a fresh channel and
the frontend's peak RSS over them (VmHWM, reset through /proc/PID/clear_refs just before).
Every call must be answered: past the limit, gRPC's client holds calls until streams free up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import grpc
from machine import cpu_isa, load_average

from moe_embed.service.demo import ensure_demo_bundle
from moe_embed.testing import procfs
from moe_embed.testing.service import ServeProcess
from moe_embed.v1 import embedder_pb2 as pb
from moe_embed.v1 import embedder_pb2_grpc as pb_grpc

TEXTS = json.loads((Path(__file__).resolve().parents[1] / "tests" / "data" /
                    "multilingual.json").read_text())


async def _burst(target: str, calls: int) -> int:
    """`calls` Embed calls at once on a fresh channel; how many were answered."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        got = await asyncio.gather(*(
            stub.Embed(pb.EmbedRequest(inputs=[TEXTS[i % len(TEXTS)]],
                                       task=pb.TASK_SEARCH_DOCUMENT), timeout=120)
            for i in range(calls)), return_exceptions=True)
    return sum(not isinstance(g, BaseException) for g in got)


def measure(bundle: Path, limit: int, calls: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp, ServeProcess(
            bundle, Path(tmp) / "serve.log", "--workers", "2", "--threads-per-worker", "1",
            "--max-concurrent-streams", str(limit), "--log-level", "warning") as srv:
        srv.wait_serving(600)
        pid = srv.proc.pid
        asyncio.run(_burst(srv.target, 50))
        time.sleep(1)
        idle = procfs.rss_mb(pid)
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak RSS := RSS now
        answered = asyncio.run(_burst(srv.target, calls))
        peak = procfs.peak_rss_mb(pid)
        time.sleep(3)
        after = procfs.rss_mb(pid)
    return {"max_concurrent_streams": limit, "calls": calls, "answered": answered,
            "idle_mb": idle, "peak_mb": peak, "grew_mb": peak - idle, "after_3s_mb": after}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limits", default="128,1024")
    p.add_argument("--calls", type=int, default=1500)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    kind, flags = cpu_isa()
    print(f"CPU {kind} ({' '.join(flags)}); load {load_average()['uptime']}", flush=True)
    bundle = Path(ensure_demo_bundle())
    runs = []
    for _ in range(args.rounds):
        for limit in (int(x) for x in args.limits.split(",")):
            r = measure(bundle, limit, args.calls)
            runs.append(r)
            print(f"--max-concurrent-streams {limit:5d}: idle {r['idle_mb']:.1f} MB, peak over "
                  f"{args.calls} calls {r['peak_mb']:.1f} (+{r['grew_mb']:.1f}), 3 s later "
                  f"{r['after_3s_mb']:.1f}; answered {r['answered']}/{args.calls}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"cpu": kind, "isa": flags, "runs": runs}, indent=1))
    return 0 if all(r["answered"] == r["calls"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
