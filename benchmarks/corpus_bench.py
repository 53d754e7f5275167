"""Corpus jobs (`moe-embed batch`, RayEmbedder) against the in-process W3 loop, side by side.

    .venv/bin/python benchmarks/corpus_bench.py [--bundle DIR] [--docs 2000] [--out DIR]
        [--skip ray,server,kill,rss] [--peers CHECKPOINT] [--int8-bundle DIR]

One run measures, on the same corpus (multilingual documents of log-uniform lengths, some over
512 tokens, built from tests/data/multilingual.json), every figure the issue's targets name:
- W3 in process (before the jobs and again after them; the ratios divide by the mean): the
  documents' ids (truncated to 512, as the job does), length-sorted into
  batches of a padded-token budget, through the routed runtime (benchmarks/peers.OrtPeer) in
  this process, all cores; tokens/s is the yardstick the others are divided by;
- `moe-embed batch` in process (JSONL in, one worker with all cores), through one local server
  (`moe-embed serve`, one worker, all cores) and through Ray Data (local cluster, one actor with
  all cores): tokens/s over the job's own time (from its `batch.done` line: workers started)
  and over the whole command (start-up included);
- kill -9 at a random point of an in-process job, `--resume`, compare the shards' bytes with
  the uninterrupted run's; the time lost to the kill;
- with --peers, PyTorch eager (length-sorted batches) and llama.cpp F32 (one by one and
  batched) on the same ids; with --int8-bundle, the in-process job on the int8 bundle;
- the job process's peak RSS on a 10,000-row input and on a 1,000,000-row input stopped after
  20,000 rows (short texts).
The machine's CPU, instruction sets and load average are recorded with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import machine
from inputs import multilingual_texts, token_budget_batches, w3_corpus
from peers import OrtPeer

from moe_embed.service.tasks import task_named
from moe_embed.service.tokenizer import Tokenizer
from moe_embed.testing import procfs
from moe_embed.testing.service import ServeProcess

BIN = Path(sys.executable).parent
TASK = "search_document"
BATCH_TOKENS = 8192  # W3's padded-token budget (benchmarks/plan.py)


def log(msg: str) -> None:
    print(f"[corpus-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_corpus(tok: Tokenizer, n: int, lo: int = 16, hi: int = 1024,
                seed: int = 0) -> list[str]:
    """`n` documents of log-uniform target lengths in [lo, hi] tokens (some over 512): W3's
    generator, with longer documents."""
    return w3_corpus(tok, n, lo, hi, seed).texts


def write_jsonl(path: Path, texts: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"doc-{i}", "text": t}, ensure_ascii=False) + "\n")
    return path


def job_figures(stderr: str) -> dict:
    for line in stderr.splitlines():
        if line.startswith("{") and '"batch.done"' in line:
            return json.loads(line)
    raise RuntimeError("no batch.done line:\n" + stderr[-3000:])


def run_job(args: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([str(BIN / "moe-embed"), "batch", *args, "--progress", "json"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    f = job_figures(proc.stderr)
    return {"wall_s": wall, "job_s": f["elapsed_s"], "tokens": f["tokens"],
            "tokens_per_s_job": f["tokens"] / f["elapsed_s"],
            "tokens_per_s_wall": f["tokens"] / wall}


def w3(bundle: Path, ids: list[list[int]], threads: int) -> dict:
    from moe_embed.workers.bundle.format import Bundle

    peer = OrtPeer("routed", Bundle.load(bundle, verify=False), threads)
    batches = [[ids[i] for i in b] for b in token_budget_batches(ids, BATCH_TOKENS)]
    peer.run(batches[0])  # warm-up
    t0 = time.perf_counter()
    for b in batches:
        peer.run(b)
    s = time.perf_counter() - t0
    tokens = sum(len(x) for x in ids)
    return {"seconds": s, "tokens": tokens, "tokens_per_s": tokens / s, "batches": len(batches)}


def serve_and_run(bundle: Path, src: Path, out: Path, threads: int) -> dict:
    log_path = out.with_name(f"{out.name}.serve.log")
    with ServeProcess(bundle, log_path, "--workers", "1", "--threads-per-worker", str(threads),
                      "--log-level", "warning", cli=BIN / "moe-embed") as serve:
        serve.wait_serving(300)
        return run_job([str(src), "--out", str(out), "--bundle", str(bundle), "--task", TASK,
                        "--server", serve.target])


def ray_run(bundle: Path, src_parquet: Path, out: Path, threads: int) -> dict:
    import ray

    from moe_embed.batch import RayEmbedder

    # the actor takes `threads` CPUs; one more logical CPU runs Ray's read and write tasks
    # (without it they wait for the actor's CPUs forever)
    ray.init(num_cpus=threads + 1, include_dashboard=False, log_to_driver=False,
             object_store_memory=500 << 20)
    try:
        t0 = time.perf_counter()
        ds = ray.data.read_parquet(str(src_parquet))
        ds = ds.map_batches(RayEmbedder, batch_size=256, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=threads,
                            fn_constructor_kwargs={"bundle": str(bundle), "task": TASK,
                                                   "threads": threads})
        ds.write_parquet(str(out))
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    import pyarrow.dataset as pds

    tokens = int(pds.dataset(out).to_table(columns=["tokens"]).column("tokens").to_numpy().sum())
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s_wall": tokens / wall}


def kill_and_resume(bundle: Path, src: Path, reference: Path, work: Path, uninterrupted_s: float,
                    seed: int) -> dict:
    """SIGKILL at a random point of the uninterrupted run's duration, resume, compare."""
    out = work / "killed"
    args = [str(src), "--out", str(out), "--bundle", str(bundle), "--task", TASK, "--quiet",
            "--shard-rows", "100"]
    at = random.Random(seed).uniform(0.2, 0.8) * uninterrupted_s
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "moe-embed"), "batch", *args])
    time.sleep(at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_s = time.perf_counter() - t0
    shards = len(json.loads((out / "_manifest.json").read_text())["shards"]) \
        if (out / "_manifest.json").exists() else 0
    t1 = time.perf_counter()
    subprocess.run([str(BIN / "moe-embed"), "batch", *args, "--resume"], check=True)
    resume_s = time.perf_counter() - t1

    def parts(d: Path) -> dict:
        return {p.name: p.read_bytes() for p in d.iterdir() if p.name.startswith("part-")}

    return {"killed_after_s": killed_s, "shards_committed_at_kill": shards,
            "resume_s": resume_s, "lost_s": killed_s + resume_s - uninterrupted_s,
            "identical": parts(out) == parts(reference)}


def rss(bundle: Path, work: Path) -> dict:
    """Peak RSS (VmHWM) of the job process: 10,000 rows vs 1,000,000 stopped at 20,000."""
    texts = multilingual_texts()
    big = work / "million.jsonl"
    with open(big, "w", encoding="utf-8") as f:
        for i in range(1_000_000):
            f.write(json.dumps({"id": i, "text": texts[i % len(texts)]}, ensure_ascii=False)
                    + "\n")
    small = work / "ten-thousand.jsonl"
    with open(big, encoding="utf-8") as f, open(small, "w", encoding="utf-8") as g:
        for _ in range(10_000):
            g.write(f.readline())
    out: dict = {}
    for name, src, stop_rows in (("10k", small, None), ("1M_stopped_at_20k", big, 20_000)):
        dest = work / f"rss-{name}"
        proc = subprocess.Popen([str(BIN / "moe-embed"), "batch", str(src), "--out", str(dest),
                                 "--bundle", str(bundle), "--task", TASK, "--quiet",
                                 "--shard-rows", "1000"])
        peak = 0.0
        while proc.poll() is None:
            try:
                peak = max(peak, procfs.peak_rss_mb(proc.pid))
                done = json.loads((dest / "_manifest.json").read_text())["shards"]
            except (OSError, ValueError, KeyError):
                done = []
            if stop_rows and sum(s["rows"] for s in done) >= stop_rows:
                peak = max(peak, procfs.peak_rss_mb(proc.pid))
                proc.send_signal(signal.SIGTERM)
                proc.wait()
                break
            time.sleep(0.05)
        out[name] = {"peak_rss_mb": peak}
    out["ratio"] = out["1M_stopped_at_20k"]["peak_rss_mb"] / out["10k"]["peak_rss_mb"]
    return out


def peers(checkpoint: Path, ids: list[list[int]], threads: int) -> dict:
    """The peers on the same ids: PyTorch eager in W3's length-sorted batches (as
    sentence-transformers sorts), and llama.cpp F32 one text at a time and batched (where
    `make llama-peer` has installed it)."""
    from peers import LlamaCppPeer, TorchPeer, llama_available

    tokens = sum(len(x) for x in ids)
    batches = [[ids[i] for i in b] for b in token_budget_batches(ids, BATCH_TOKENS)]
    out: dict = {}

    def timed(name: str, run, calls: list[list[list[int]]]) -> None:
        run(calls[0][:2])  # warm-up
        t0 = time.perf_counter()
        for c in calls:
            run(c)
        s = time.perf_counter() - t0
        out[name] = {"seconds": s, "tokens_per_s": tokens / s}
        log(f"{name}: {tokens / s:.0f} tok/s")

    torch_peer = TorchPeer(str(checkpoint), threads)
    timed("torch_eager_length_sorted", torch_peer.run, batches)
    torch_peer.close()
    why_not = llama_available()
    if why_not is not None:
        out["llama_cpp_f32"] = {"skipped": why_not}
        return out
    llama = LlamaCppPeer(str(checkpoint), threads)
    timed("llama_cpp_f32_one_by_one", llama.run, [[x] for x in ids])
    timed("llama_cpp_f32_batched", llama.run, batches)
    llama.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="bundle directory (default: the embedded demo model)")
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--out", help="where to write corpus_bench.json (default: print only)")
    ap.add_argument("--skip", default="", help="comma list of: server, ray, kill, rss")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peers", type=Path, metavar="CHECKPOINT",
                    help="also time PyTorch eager and llama.cpp F32 on this checkpoint (the one "
                    "--bundle was exported from)")
    ap.add_argument("--int8-bundle", type=Path,
                    help="also run the in-process job on this int8 bundle (of the same model)")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if args.bundle:
        bundle = Path(args.bundle)
    else:
        from moe_embed.service.demo import ensure_demo_bundle

        bundle = ensure_demo_bundle()
    threads = os.cpu_count() or 1
    model, isa = machine.cpu_isa()
    res: dict = {"cpu": model, "isa": isa, "threads": threads, "bundle": str(bundle),
                 "load_before": machine.load_average()}
    from moe_embed.workers.bundle.format import Bundle

    tok = Tokenizer.from_bundle(Bundle.load(bundle, verify=False))
    docs = make_corpus(tok, args.docs, seed=args.seed)
    ids = [x.tolist() for x in tok.encode(docs, task_named(TASK))]
    full = [len(tok.full_ids(task_named(TASK).apply(d))) for d in docs]
    res["corpus"] = {"docs": len(docs), "tokens_after_truncation": sum(map(len, ids)),
                     "over_512": sum(n > 512 for n in full), "max_tokens": max(full)}
    with tempfile.TemporaryDirectory(prefix="corpus-bench-") as tmp:
        work = Path(tmp)
        src = write_jsonl(work / "corpus.jsonl", docs)
        import pyarrow as pa
        import pyarrow.parquet as pq

        src_parquet = work / "corpus.parquet"
        pq.write_table(pa.table({"id": [f"doc-{i}" for i in range(len(docs))], "text": docs}),
                       src_parquet)
        log(f"corpus: {res['corpus']}")
        res["w3_in_process"] = w3(bundle, ids, threads)
        log(f"W3 in process: {res['w3_in_process']['tokens_per_s']:.0f} tok/s")
        res["batch_in_process"] = run_job([str(src), "--out", str(work / "local"), "--bundle",
                                           str(bundle), "--task", TASK])
        log(f"batch in process: {res['batch_in_process']}")
        if "server" not in skip:
            res["batch_one_server"] = serve_and_run(bundle, src, work / "remote", threads)
            log(f"batch through one server: {res['batch_one_server']}")
        if "ray" not in skip:
            res["ray_one_actor"] = ray_run(bundle, src_parquet, work / "ray", threads)
            log(f"Ray Data, one actor: {res['ray_one_actor']}")
        if "kill" not in skip:
            reference = work / "reference"
            t0 = time.perf_counter()
            subprocess.run([str(BIN / "moe-embed"), "batch", str(src), "--out", str(reference),
                            "--bundle", str(bundle), "--task", TASK, "--quiet",
                            "--shard-rows", "100"], check=True)
            res["kill_resume"] = kill_and_resume(bundle, src, reference, work,
                                                 time.perf_counter() - t0, args.seed)
            log(f"kill -9 and resume: {res['kill_resume']}")
        if "rss" not in skip:
            res["rss"] = rss(bundle, work)
            log(f"RSS: {res['rss']}")
        if args.int8_bundle:
            res["batch_in_process_int8"] = run_job([str(src), "--out", str(work / "int8"),
                                                    "--bundle", str(args.int8_bundle),
                                                    "--task", TASK])
            log(f"batch in process, int8: {res['batch_in_process_int8']}")
    if args.peers:
        res["peers"] = peers(args.peers, ids, threads)
    # W3 again after the jobs: the other figures fall between the two under a changing load
    res["w3_in_process_after"] = w3(bundle, ids, threads)
    log(f"W3 in process, again: {res['w3_in_process_after']['tokens_per_s']:.0f} tok/s")
    base = (res["w3_in_process"]["tokens_per_s"] + res["w3_in_process_after"]["tokens_per_s"]) / 2
    res["w3_tokens_per_s_mean"] = base
    res["ratios_to_w3"] = {k: {"job": res[k].get("tokens_per_s_job", 0) / base,
                               "wall": res[k]["tokens_per_s_wall"] / base}
                           for k in ("batch_in_process", "batch_one_server", "ray_one_actor")
                           if k in res}
    if args.peers:
        job = res["batch_in_process"]["tokens_per_s_job"]
        ps = res["peers"]
        llama = max((ps[k]["tokens_per_s"] for k in ps if k.startswith("llama_cpp_f32_")
                     and "tokens_per_s" in ps[k]), default=None)
        torch_tps = ps["torch_eager_length_sorted"]["tokens_per_s"]
        res["ratios_to_peers"] = {
            "batch_fp32_vs_llama_cpp_f32_best": job / llama if llama else None,
            "batch_fp32_vs_torch_eager": job / torch_tps,
            "batch_int8_vs_torch_eager": (res["batch_in_process_int8"]["tokens_per_s_job"]
                                          / torch_tps if "batch_in_process_int8" in res
                                          else None)}
    res["load_after"] = machine.load_average()
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "corpus_bench.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
