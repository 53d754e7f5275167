"""W1-W5 and the RSS measurement. Each function times one peer on one workload and returns a
JSON-able dict of raw figures plus the rates derived from them (tokens/s, FLOP rate and
weight-bytes rate, which `add_fractions` turns into fractions of this machine's sgemm peak and
read bandwidth once the run has measured them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cost as costs
import numpy as np
import service_client as svc
from inputs import TextSet
from plan import Plan
from timing import median, percentile, repeat, summary_ms, timed_passes

from moe_embed.service.tasks import task_named
from moe_embed.service.tokenizer import Tokenizer
from moe_embed.workers.bundle.config import ModelConfig
from moe_embed.workers.runtime.runtime import pack


@dataclass
class Context:
    cfg: ModelConfig
    tok: Tokenizer
    plan: Plan
    w1: TextSet
    short: TextSet
    w2: list[list[int]]
    w3: TextSet
    routing: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    log: Any = print

    def cost(self, workload: str, call: int, ids: list[list[int]]) -> costs.Cost:
        """The call's cost under the routing the routed runtime took on it (if it ran)."""
        return costs.call_cost(self.cfg, ids, self.routing.get(workload, {}).get(call))

    @staticmethod
    def rates(cost: costs.Cost, seconds: float | None, with_bytes: bool = True) -> dict:
        """Absolute rates; the fractions of peak are added once the run's peaks are known."""
        if not seconds:
            return {}
        out = {"tokens_per_s": cost.tokens / seconds, "gflops": cost.flops / seconds / 1e9}
        if with_bytes:
            out["weight_gb_per_s"] = cost.weight_bytes / seconds / 1e9
        return out


def _record(ctx: Context, workload: str, call: int, expert_tokens: np.ndarray | None) -> None:
    if expert_tokens is not None:
        ctx.routing.setdefault(workload, {})[call] = np.array(expert_tokens, copy=True)


def _cost_dict(c: costs.Cost, with_bytes: bool = True) -> dict:
    out = {"tokens": c.tokens, "gflop": c.flops / 1e9, "routed_pairs": c.routed_pairs}
    if with_bytes:
        out.update(weight_gb=c.weight_bytes / 1e9, experts_touched=c.experts_touched)
    return out


def _w1_result(ctx: Context, peer: str, passes: list[list[float]], with_cost: bool) -> dict:
    ids = ctx.w1.ids
    per_call = [ctx.cost("W1", i, [x]) for i, x in enumerate(ids)]
    total = costs.total(per_call)
    pass_s = [sum(p) for p in passes]
    per_text = [median([p[i] for p in passes]) * 1e3 for i in range(len(ids))]
    out = {"peer": peer, "texts": len(ids), "passes": len(passes), "pass_s": pass_s,
           "median_pass_s": median(pass_s), "latency": summary_ms([t for p in passes for t in p]),
           "per_text_p50_ms": per_text, "per_text_tokens": ctx.w1.lengths,
           "cost": _cost_dict(total), "samples_s": passes,
           "per_text_gflop": [c.flops / 1e9 for c in per_call],
           "per_text_weight_gb": [c.weight_bytes / 1e9 for c in per_call],
           "expert_slots": len(ids) * len(ctx.cfg.moe_layers) * ctx.cfg.num_experts,
           "routing": "taken by the routed runtime" if len(ctx.routing.get("W1", {})) == len(ids)
           else "upper bound: every expert touched (the routed runtime did not run)"}
    out.update(ctx.rates(total, median(pass_s), with_bytes=with_cost))
    return out


def w1_inprocess(ctx: Context, peer) -> dict:
    """One text at a time over the multilingual set."""
    calls = []
    for i, x in enumerate(ctx.w1.ids):
        def call(i: int = i, x: list[int] = x) -> None:
            _record(ctx, "W1", i, peer.run([x]))
        calls.append(call)
    passes = timed_passes(calls, 1, ctx.plan.w1_reps[peer.name], ctx.plan.w1_budget_s)
    return _w1_result(ctx, peer.name, passes, True)


def _unary_calls(stub, texts: TextSet) -> list:
    """One unary Embed per text, each checked against the in-process token count."""
    calls = []
    for text, n in zip(texts.texts, texts.lengths, strict=True):
        req = svc.request(text, texts.task)

        def call(req=req, n: int = n) -> None:
            svc._check(stub.Embed(req, timeout=600), n)
        calls.append(call)
    return calls


def _inprocess_calls(ctx: Context, peer, texts: TextSet) -> list:
    """One tokenize + embed per text: the in-process counterpart of a unary Embed."""
    calls = []
    for text in texts.texts:
        def call(text: str = text) -> None:
            peer.runtime.embed(*pack(ctx.tok.encode([text], task_named(texts.task))))
        calls.append(call)
    return calls


def w1_service(ctx: Context, target: str) -> dict:
    """W1 end to end: one unary Embed per text, one client, sequential."""
    ch, stub = svc.unary_stub(target)
    try:
        passes = timed_passes(_unary_calls(stub, ctx.w1), 1, ctx.plan.w1_reps["service"],
                              ctx.plan.w1_budget_s)
    finally:
        ch.close()
    return _w1_result(ctx, "service", passes, True)


def w2(ctx: Context, peer) -> dict:
    """One batch of B x S random ids."""
    times = repeat(lambda: _record(ctx, "W2", 0, peer.run(ctx.w2)), 1,
                   ctx.plan.w2_reps[peer.name], ctx.plan.w2_budget_s)
    c = ctx.cost("W2", 0, ctx.w2)
    out = {"peer": peer.name, "shape": [len(ctx.w2), len(ctx.w2[0])], "reps": len(times),
           "samples_s": times, "median_s": median(times), "cost": _cost_dict(c)}
    out.update(ctx.rates(c, median(times)))
    return out


def w3_inprocess(ctx: Context, peer) -> dict:
    """The mixed-length corpus, sorted by length, in batches of a padded-token budget."""
    batches = [[ctx.w3.ids[i] for i in b] for b in ctx.w3.batches(ctx.plan.w3_batch_tokens)]

    def one_pass() -> None:
        for j, b in enumerate(batches):
            _record(ctx, "W3", j, peer.run(b))

    peer.run(batches[0])  # warm-up: the first (shortest) batch
    times = repeat(one_pass, 0, ctx.plan.w3_reps[peer.name], ctx.plan.w3_budget_s)
    total = costs.total([ctx.cost("W3", j, b) for j, b in enumerate(batches)])
    padded = sum(len(b) * max(len(x) for x in b) for b in batches)
    out = {"peer": peer.name, "texts": len(ctx.w3.ids), "batches": len(batches),
           "padded_tokens": padded, "reps": len(times), "samples_s": times,
           "median_s": median(times), "cost": _cost_dict(total)}
    out.update(ctx.rates(total, median(times)))
    return out


def w3_service(ctx: Context, target: str, name: str) -> dict:
    """The W3 corpus through the service: every text its own request, all in flight at once."""
    reqs, tokens = [svc.request(t, ctx.w3.task) for t in ctx.w3.texts], ctx.w3.lengths
    svc.burst(target, [svc.request(t, ctx.short.task) for t in ctx.short.texts],
              ctx.short.lengths)  # warm-up
    runs = []
    repeat(lambda: runs.append(svc.burst(target, reqs, tokens)), 0, ctx.plan.w3_reps[name],
           ctx.plan.w3_budget_s)
    walls = [r.wall_s for r in runs]
    total = costs.total([costs.call_cost(ctx.cfg, [x]) for x in ctx.w3.ids])
    out = {"peer": name, "texts": len(reqs), "reps": len(runs), "samples_s": walls,
           "median_s": median(walls), "request_latency": summary_ms(runs[-1].latencies_s),
           "cost": _cost_dict(total, with_bytes=False)}
    out.update(ctx.rates(total, median(walls), with_bytes=False))
    return out


def w4_inprocess(ctx: Context, peer) -> dict:
    """The in-process cost of one short request: tokenize + embed, one text per call; and the
    in-process tokens/s on the same texts in batches of as many as W4 has clients (8, 32):
    what that many one-text clients could get at best, W4's reference."""
    calls = _inprocess_calls(ctx, peer, ctx.short)
    passes = timed_passes(calls, 1, ctx.plan.w4_inprocess_reps, ctx.plan.w1_budget_s)
    return {"peer": peer.name, "texts": len(calls), "passes": len(passes),
            "latency": summary_ms([t for p in passes for t in p]), "samples_s": passes,
            "batched_tokens_per_s": {str(n): _batched_rate(ctx, peer, n)
                                     for n in ctx.plan.w4_clients if n > 1}}


def _batched_rate(ctx: Context, peer, size: int) -> float:
    """Tokens/s of tokenize + embed on W4's short texts in batches of `size` (taken in turn,
    ~8 texts' worth of batches per text), the median of timed passes."""
    texts, lengths, task = ctx.short.texts, ctx.short.lengths, task_named(ctx.short.task)
    count = max(2, -(-len(texts) * 8 // size))
    batches = [[k % len(texts) for k in range(b * size, (b + 1) * size)] for b in range(count)]
    calls = [lambda b=b: peer.runtime.embed(*pack(ctx.tok.encode([texts[k] for k in b], task)))
             for b in batches]
    passes = timed_passes(calls, 1, ctx.plan.w4_inprocess_reps, ctx.plan.w1_budget_s)
    tokens = sum(lengths[k] for b in batches for k in b)
    return tokens / median([sum(p) for p in passes])


def w4_overhead(ctx: Context, target: str, peer) -> dict:
    """What the service adds to one short request. Each round times one closed-loop block of
    in-process calls (tokenize + embed) and one of unary Embed calls from a plain synchronous
    client over the same short texts, in ABBA order across rounds; each block starts with an
    untimed call (the other process's threads have just gone idle). The overhead is the median
    over rounds of (service block p50 - in-process block p50): adjacent blocks share the
    machine's drift, which on a shared 2-core VM is easily +-10 ms over a few seconds.
    (Alternating single calls instead is worse: each process's idle-spinning ORT threads then
    slow the other's next call by tens of ms.)"""
    ch, stub = svc.unary_stub(target)
    inproc, service = _inprocess_calls(ctx, peer, ctx.short), _unary_calls(stub, ctx.short)

    def block(calls: list) -> list[float]:
        calls[-1]()  # untimed
        return timed_passes(calls, 0, 1, float("inf"))[0]

    rounds: list[tuple[list[float], list[float]]] = []
    try:
        for r in range(ctx.plan.w4_overhead_rounds):
            if r % 4 in (0, 3):
                a = block(inproc)
                b = block(service)
            else:
                b = block(service)
                a = block(inproc)
            rounds.append((a, b))
    finally:
        ch.close()
    diffs = [(median(b) - median(a)) * 1e3 for a, b in rounds]
    return {"peer": "service-vs-inprocess", "texts": len(inproc), "rounds": len(rounds),
            "inprocess": summary_ms([t for a, _ in rounds for t in a]),
            "service": summary_ms([t for _, b in rounds for t in b]),
            "round_overhead_ms": diffs, "overhead_ms": median(diffs),
            "overhead_p25_ms": percentile(diffs, 25), "overhead_p75_ms": percentile(diffs, 75),
            "samples_s": [{"inprocess": a, "service": b} for a, b in rounds]}


def w4_service(ctx: Context, target: str) -> dict:
    """Closed-loop short requests from 1, 8 and 32 concurrent clients."""
    reqs = [svc.request(t, ctx.short.task) for t in ctx.short.texts]
    levels = {}
    for clients in ctx.plan.w4_clients:
        r = svc.closed_loop(target, clients, reqs, ctx.short.lengths, ctx.plan.w4_warmup_s,
                            ctx.plan.w4_duration_s)
        lat = summary_ms(r.latencies_s)
        gflop_per_token = (costs.total([costs.call_cost(ctx.cfg, [x]) for x in ctx.short.ids])
                           .flops / ctx.short.tokens / 1e9)
        levels[str(clients)] = {
            "clients": clients, "requests": r.requests, "duration_s": r.wall_s,
            "requests_per_s": r.requests / r.wall_s, "tokens_per_s": r.tokens / r.wall_s,
            "gflops": r.tokens * gflop_per_token / r.wall_s, "latency": lat}
        ctx.log(f"  W4 {clients:>2} clients: {r.requests / r.wall_s:7.1f} req/s, "
                f"p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms")
    return {"peer": "service", "levels": levels}


def w5_service(ctx: Context, target: str) -> dict:
    """One bidi stream of short requests with a bounded window in flight."""
    reqs = [svc.request(t, ctx.short.task) for t in ctx.short.texts]
    svc.stream(target, ctx.plan.w5_window, ctx.plan.w5_window, reqs, ctx.short.lengths)  # warm
    r = svc.stream(target, ctx.plan.w5_requests, ctx.plan.w5_window, reqs, ctx.short.lengths)
    return {"peer": "service", "requests": r.requests, "window": ctx.plan.w5_window,
            "wall_s": r.wall_s, "requests_per_s": r.requests / r.wall_s,
            "tokens_per_s": r.tokens / r.wall_s, "latency": summary_ms(r.latencies_s)}


def add_fractions(results: dict, peak_gflops: float | None, bandwidth_gbs: float | None) -> None:
    """Add frac_sgemm_peak / frac_bandwidth next to every gflops / weight_gb_per_s figure."""
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "gflops" in node and peak_gflops:
                node["frac_sgemm_peak"] = node["gflops"] / peak_gflops
            if "weight_gb_per_s" in node and bandwidth_gbs:
                node["frac_bandwidth"] = node["weight_gb_per_s"] / bandwidth_gbs
            for v in node.values():
                walk(v)

    for w in ("W1", "W2", "W3", "W4", "W5"):
        walk(results.get(w))
    if peak_gflops and bandwidth_gbs:
        for r in (results.get("W1") or {}).values():
            if isinstance(r, dict) and r.get("per_text_gflop"):
                r.update(w1_roofline(r, peak_gflops, bandwidth_gbs))


def w1_roofline(r: dict, peak_gflops: float, bandwidth_gbs: float) -> dict:
    """The roofline model per text: a call needs at least max(weight bytes / bandwidth,
    FLOPs / sgemm peak). A text whose FLOPs take longer than its bytes is compute-bound, and
    no implementation can then score 100% of the memory roofline on it: `attainable`
    is the best memory-roofline fraction any implementation could report on this text set."""
    mem = [gb / bandwidth_gbs for gb in r["per_text_weight_gb"]]
    comp = [gf / peak_gflops for gf in r["per_text_gflop"]]
    bound = sum(max(m, c) for m, c in zip(mem, comp, strict=True))
    return {"roofline": {
        "memory_s": sum(mem), "compute_s": sum(comp), "bound_s": bound,
        "compute_bound_texts": sum(c > m for m, c in zip(mem, comp, strict=True)),
        "attainable_frac_bandwidth": sum(mem) / bound,
        "frac_of_bound": bound / r["median_pass_s"]}}
