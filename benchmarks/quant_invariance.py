"""Batch invariance of bundles: each text's vector alone vs inside random batches (in process) and
vs through the service with 2 workers under concurrent load: pairs, bit-identical pairs, worst
cosine, largest difference.

    .venv/bin/python benchmarks/quant_invariance.py BUNDLE [BUNDLE ...] [--partitions 5]
        [--no-service] [--json OUT]

Texts: the 24 of tests/data/multilingual.json as queries and as documents, plus one document over
512 tokens (truncated). In process (2 threads): every text alone, then `--partitions` random
partitions of all texts into batches of 2..14 (one partition with 24-token dense chunks, one with
3-row expert calls). Service: `moe-embed serve --workers 2 --threads-per-worker 1`, 8 concurrent
clients, three random partitions of each task's texts into requests of 1..5 texts, every vector
compared with the in-process vector of the text alone (a 2-thread process: the thread count
differs too). tests/workers/test_batch_invariance.py checks the same on the tiny model in
`make test`.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

TASKS = ("search_query", "search_document")


def cases(bundle: Path) -> list[dict]:
    from moe_embed.service.tasks import task_named
    from moe_embed.service.tokenizer import Tokenizer
    from moe_embed.workers.bundle.format import Bundle

    texts = json.loads((HERE.parent / "tests" / "data" / "multilingual.json").read_text())
    tok = Tokenizer.from_bundle(Bundle.load(bundle))
    out = []
    for task in TASKS:
        mine = texts + ([" ".join(texts) * 3] if task == "search_document" else [])
        for text, ids in zip(mine, tok.encode(mine, task_named(task)), strict=True):
            out.append({"text": text, "task": task, "ids": ids.tolist()})
    return out


def verdict(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    same = sum(1 for a, b in pairs if np.array_equal(a, b))
    cos = [float(a.astype(np.float64) @ b / np.linalg.norm(a) / np.linalg.norm(b))
           for a, b in pairs if not np.array_equal(a, b)]  # an identical pair: 1 exactly
    return {"pairs": len(pairs), "bit_identical": same, "worst_cos": min(cos, default=1.0),
            "max_abs": max(float(np.abs(a - b).max()) for a, b in pairs)}


def in_process(bundle: Path, cs: list[dict], partitions: int, seed: int
               ) -> tuple[list[np.ndarray], dict]:
    from moe_embed.workers.runtime.runtime import Runtime, pack

    rt = Runtime(bundle, threads=2)
    alone = [rt.embed(*pack([c["ids"]])).vectors[0] for c in cs]
    rng = np.random.default_rng(seed)
    pairs = []
    for p in range(partitions):
        rt.chunk_tokens = 24 if p == partitions - 2 else 512
        rt.expert_rows = 3 if p == partitions - 1 else 1024
        order = rng.permutation(len(cs))
        cuts = np.cumsum(rng.integers(2, 15, size=len(cs)))
        for members in np.split(order, cuts[cuts < len(cs)]):
            got = rt.embed(*pack([cs[i]["ids"] for i in members])).vectors
            pairs += [(alone[i], v) for i, v in zip(members, got, strict=True)]
    return alone, verdict(pairs)


def through_service(bundle: Path, cs: list[dict], alone: list[np.ndarray], seed: int,
                    log_dir: Path) -> dict:
    from service_client import TASKS as PB_TASKS
    from service_client import unary_stub

    from moe_embed.testing.service import ServeProcess
    from moe_embed.v1 import embedder_pb2 as pb

    rng = np.random.default_rng(seed)
    reqs = []
    for task in TASKS:
        mine = [i for i, c in enumerate(cs) if c["task"] == task]
        for _ in range(3):
            order = rng.permutation(mine)
            cuts = np.cumsum(rng.integers(1, 6, size=len(order)))
            reqs += [(task, [int(i) for i in m]) for m in np.split(order, cuts[cuts < len(order)])]
    server = ServeProcess(bundle, log_dir / f"{bundle.name}.serve.log", "--workers", "2",
                          "--threads-per-worker", "1", "--log-level", "warning",
                          "--metrics-port", "0", strip_thread_env=True)
    try:
        server.wait_serving(600)
        channel, stub = unary_stub(server.target)

        def call(req: tuple[str, list[int]]) -> list[np.ndarray]:
            task, members = req
            resp = stub.Embed(pb.EmbedRequest(inputs=[cs[i]["text"] for i in members],
                                              task=PB_TASKS[task]), timeout=600)
            return [np.asarray(e.values, dtype=np.float32) for e in resp.embeddings]

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(call, reqs))
        channel.close()
    finally:
        server.stop()
    return verdict([(alone[i], v) for (_, members), got in zip(reqs, answers, strict=True)
                    for i, v in zip(members, got, strict=True)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundles", nargs="+", type=Path)
    p.add_argument("--partitions", type=int, default=5)
    p.add_argument("--no-service", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from machine import cpu_isa, load_average

    model, flags = cpu_isa()
    print(f"# {model}; flags {' '.join(flags)}; load {load_average()}", flush=True)
    rows = []
    for i, bundle in enumerate(args.bundles):
        from moe_embed.workers.bundle.format import Bundle

        m = Bundle.load(bundle).manifest
        label = f"{m.model_id} {m.precision}"
        cs = cases(bundle)
        t = time.perf_counter()
        alone, inproc = in_process(bundle, cs, args.partitions, seed=i)
        row = {"bundle": str(bundle), "label": label, "in_process": inproc}
        if not args.no_service:
            row["service"] = through_service(bundle, cs, alone, i, Path("/tmp"))
        row["seconds"] = time.perf_counter() - t
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| bundle | where | pairs | bit-identical | worst cosine | max abs |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for where in ("in_process", "service"):
            if where in r:
                v = r[where]
                print(f"| {r['label']} | {where.replace('_', ' ')} | {v['pairs']} | "
                      f"{v['bit_identical']} | {v['worst_cos']:.7f} | {v['max_abs']:.2e} |")
    print(f"# load after: {load_average()}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
