"""Script, not a test: where one short text's time goes in the runtime (W1, one text a call),
or where a corpus's goes (--w3: W3's texts in its batches).

    .venv/bin/python benchmarks/profile_w1.py [--bundle DIR] [--threads 2] [--reps 5] [--w3]

Wraps the runtime's sessions and routers with timers (nothing else changes) and embeds the
multilingual W1 texts one at a time, then prints per text the median split: dense segment
calls, expert calls, router, and everything else (numpy gathers and scatter-adds, pooling,
Python), with call counts. With --w3: the same split for W3's corpus (256 texts of 8..512
tokens, sorted by length, batches of 8192 padded tokens, as `make bench` runs it), per pass,
median over --reps passes, and tokens/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path


class Timed:
    """A session or callable whose calls are timed into `bucket`."""

    def __init__(self, inner, bucket: str, clock: dict) -> None:
        self.inner, self.bucket, self.clock = inner, bucket, clock

    def run(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.inner.run(*args, **kwargs)
        finally:
            self.clock[self.bucket] += time.perf_counter() - t
            self.clock[self.bucket + "_calls"] += 1

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.clock[self.bucket] += time.perf_counter() - t
            self.clock[self.bucket + "_calls"] += 1


def instrument(rt, clock: dict) -> None:
    rt.segments = [(Timed(s, "segments", clock), m) for s, m in rt.segments]
    rt.experts = {layer: [Timed(s, "experts", clock) for s in sessions]
                  for layer, sessions in rt.experts.items()}
    for router in rt.routers.values():
        router.route = Timed(router.route, "router", clock)


def w3(rt, corpus, clock: dict, reps: int) -> int:
    """W3's passes, each split like a W1 text; prints the median pass and tokens/s."""
    from plan import FULL

    from moe_embed.workers.runtime.runtime import pack

    batches = [[corpus.ids[i] for i in b] for b in corpus.batches(FULL.w3_batch_tokens)]
    rt.embed(*pack(batches[0]))  # warm-up
    passes = []
    for _ in range(reps):
        clock.clear()
        t = time.perf_counter()
        for b in batches:
            rt.embed(*pack(b))
        total = time.perf_counter() - t
        parts = {k: clock[k] * 1e3 for k in ("segments", "experts", "router")}
        parts["other"] = total * 1e3 - sum(parts.values())
        parts["total"] = total * 1e3
        passes.append(parts)
    keys = ("total", "segments", "experts", "router", "other")
    med = {k: statistics.median(p[k] for p in passes) for k in keys}
    tokens = corpus.tokens
    print(json.dumps({"workload": "W3", "texts": len(corpus.ids), "batches": len(batches),
                      "tokens": tokens, "passes": reps,
                      "median_ms": {k: round(v, 1) for k, v in med.items()},
                      "share_percent": {k: round(100 * med[k] / med["total"], 1)
                                        for k in keys[1:]},
                      "tokens_per_s": round(tokens / (med["total"] / 1e3), 1),
                      "expert_calls": clock["experts_calls"],
                      "segment_calls": clock["segments_calls"]}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=None,
                    help="default: the cached full-size routed bundle of `make bench`")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--w3", action="store_true", help="W3's corpus in its batches instead")
    args = ap.parse_args(argv)

    import artifacts
    import inputs
    from plan import FULL

    from moe_embed.service.tokenizer import Tokenizer
    from moe_embed.workers.runtime.runtime import Runtime, pack

    bundle = args.bundle or artifacts.ensure(artifacts.default_cache()).routed.path
    rt = Runtime(bundle, threads=args.threads)
    clock: dict = defaultdict(float)
    instrument(rt, clock)
    if args.w3:
        return w3(rt, inputs.w3_corpus(Tokenizer.from_bundle(rt.bundle), n=FULL.w3_texts,
                                        hi=FULL.w3_max_tokens), clock, args.reps)
    texts = inputs.w1_set(Tokenizer.from_bundle(rt.bundle))
    for ids in texts.ids[:3]:
        rt.embed(*pack([ids]))  # warm-up
    rows = []
    for ids in texts.ids:
        samples = []
        for _ in range(args.reps):
            clock.clear()
            t = time.perf_counter()
            rt.embed(*pack([ids]))
            total = time.perf_counter() - t
            parts = {k: clock[k] * 1e3 for k in ("segments", "experts", "router")}
            parts["other"] = total * 1e3 - sum(parts.values())
            parts["total"] = total * 1e3
            parts["expert_calls"] = clock["experts_calls"]
            samples.append(parts)
        rows.append({"tokens": len(ids),
                     **{k: statistics.median(s[k] for s in samples) for k in samples[0]}})
    keys = ("total", "segments", "experts", "router", "other")
    mean = {k: statistics.mean(r[k] for r in rows) for k in (*keys, "expert_calls", "tokens")}
    print(f"{'tokens':>6} " + " ".join(f"{k:>9}" for k in keys) + "  expert calls (ms, median)")
    for r in rows:
        print(f"{r['tokens']:>6} " + " ".join(f"{r[k]:9.2f}" for k in keys)
              + f"  {r['expert_calls']:.0f}")
    print(f"{'mean':>6} " + " ".join(f"{mean[k]:9.2f}" for k in keys)
          + f"  {mean['expert_calls']:.1f}")
    share = {k: round(100 * mean[k] / mean["total"], 1) for k in keys[1:]}
    print(json.dumps({"texts": len(rows), "mean_ms": {k: round(mean[k], 3) for k in keys},
                      "share_percent": share, "mean_tokens": mean["tokens"],
                      "expert_calls_per_text": mean["expert_calls"],
                      "ms_per_expert_call": round(mean["experts"] / mean["expert_calls"], 3),
                      "ms_per_segment_call": round(mean["segments"] / 7, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
