"""The quantized-bundle table: moe-embed fp32/int8/int4 against llama.cpp's GGUF variants, one run.

    make quant-table [ARGS="--quick"]
    .venv/bin/python benchmarks/quant_table.py [--quick] [--only int8,Q8_0,...] [--threads 2]

On the full-size synthetic checkpoint with zero expert bias (llama.cpp's converter drops
`mlp.experts.bias`), built and cached by the llama peer: moe-embed bundles at every precision
(fp32 from the checkpoint, int8 and int4 from that fp32 bundle: `moe-embed export --precision`)
and llama.cpp GGUF files made by llama.cpp's own converter (F32) and quantizer (F16, Q8_0, Q6_K,
Q5_K_M, Q4_K_M, Q4_0, Q3_K_M, Q2_K). First the F32 GGUF is checked against the fp32 PyTorch
reference (llama_peer/peer.py --check: cos >= 0.99999, the GGUF's rotary base and LayerNorm eps);
quantized GGUF figures are quoted only if it passes. Then every variant runs in its own fresh
process, one after another, with the same thread count:

1. W1, W2, W3 as `make bench` defines them (benchmarks/inputs.py: the multilingual set one text
   per call; one batch of 32 x 128 random ids; 256 texts of 8..512 tokens in length-sorted
   batches of <= 8192 padded tokens), medians of timed repetitions after warm-ups;
2. the process's peak RSS (VmHWM) after W3: what a worker holds under a W3-style load;
3. embeddings for quality: the multilingual texts with both search prefixes, one text per call,
   and a retrieval corpus (inputs.retrieval_corpus: 200 queries, 2,000 documents) in W3-style
   batches; moe-embed's runs also return every token's expert choices.

Quality is measured against the fp32 PyTorch reference (export/reference.py, one text per
forward, cached per checkpoint and inputs): min and mean cosine over the 48 multilingual
embeddings, mean cosine over the corpus, top-10 overlap (|top-10 of the variant ∩ top-10 of the
reference| / 10 for each query searching the 2,000 documents by dot product, averaged), and for
moe-embed the routing fidelity: the fraction of (token, MoE layer) pairs whose top-2 expert set
equals the reference's. Writes benchmarks/QUANT.md and benchmarks/results/quant.json (under
benchmarks/results/quick with --quick). About 50 minutes on a quiet 2-core machine, most of it
llama.cpp's batch runs (~250-450 tokens/s here); --quick (5 variants, small inputs) about 5.
The bundles, the reference embeddings and each child's job, log and embeddings are kept under
<bench cache>/quant-<checkpoint key>-v<version>/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moe_embed.testing import procfs

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

OURS = ("fp32", "int8", "int4")
GGUF = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")
# Run order: each target pair next to each other in time (a shared machine drifts).
ORDER = ("fp32", "Q8_0", "int8", "Q4_K_M", "int4", "F16", "Q6_K", "Q5_K_M", "Q4_0", "Q3_K_M",
         "Q2_K")


@dataclass(frozen=True)
class Plan:
    w1_texts: int | None
    w1_passes: int
    w2_shape: tuple[int, int]
    w2_reps: int
    w3_texts: int
    w3_max_tokens: int
    w3_reps: int
    queries: int
    docs: int
    doc_tokens: tuple[int, int]
    batch_tokens: int = 8192


FULL = Plan(w1_texts=None, w1_passes=3, w2_shape=(32, 128), w2_reps=2, w3_texts=256,
            w3_max_tokens=512, w3_reps=1, queries=200, docs=2000, doc_tokens=(8, 32))
QUICK = Plan(w1_texts=8, w1_passes=2, w2_shape=(4, 128), w2_reps=1, w3_texts=16,
             w3_max_tokens=256, w3_reps=1, queries=40, docs=300, doc_tokens=(8, 32))
QUICK_VARIANTS = ("fp32", "Q8_0", "int8", "Q4_K_M", "int4")  # the target pairs


def log(msg: str) -> None:
    print(f"[quant-table {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu() -> dict:
    from machine import cpu_isa

    model, flags = cpu_isa()
    return {"model": model, "flags": flags, "cores_usable": len(os.sched_getaffinity(0))}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------
# Child processes: one per variant (and one for the reference), so each starts fresh.


def _child(job_path: Path) -> int:
    job = json.loads(job_path.read_text())
    if job["kind"] == "reference":
        return _child_reference(job)
    return _child_variant(job)


def open_variant(kind: str, path: str, threads: int) -> tuple[Callable, Callable]:
    """A variant loaded in this process: `run(ids)` (timed calls) and `embed(ids)` (unit vectors
    and, for moe-embed, each token's sorted expert choices)."""
    import numpy as np

    if kind == "ours":
        from moe_embed.workers.runtime.pooling import mean_pool
        from moe_embed.workers.runtime.runtime import Runtime, pack

        rt = Runtime(path, threads=threads)

        def run(ids: list[list[int]]) -> None:
            rt.embed(*pack(ids))

        def embed(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray | None]:
            f = rt.forward(*pack(ids))
            v = mean_pool(f.hidden, f.offsets)
            routes = np.stack([np.sort(f.expert_ids[k], axis=-1) for k in sorted(f.expert_ids)],
                              axis=1).astype(np.int8)  # [tokens, layers, k]
            return v / np.linalg.norm(v, axis=1, keepdims=True), routes
        return run, embed
    from llama_peer.peer import LlamaPeer

    peer = LlamaPeer(path, threads=threads)

    def embed_gguf(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray | None]:
        return peer.embed(ids), None
    return peer.run, embed_gguf


def _child_variant(job: dict) -> int:
    import numpy as np
    from timing import median, repeat, timed_passes

    inputs = json.loads(Path(job["inputs"]).read_text())
    threads = job["threads"]
    t0 = time.perf_counter()
    run, embed = open_variant(job["kind"], job["path"], threads)
    load_s = time.perf_counter() - t0
    rss_loaded = procfs.rss_mb()
    out: dict[str, Any] = {"variant": job["variant"], "load_s": load_s,
                           "rss_after_load_mib": rss_loaded, "load_average": load_average()}

    # W1: one text per call, passes over the set (bench: median pass)
    w1 = inputs["w1"]
    calls = [lambda x=x: run([x]) for x in w1]
    passes = timed_passes(calls, 1, job["plan"]["w1_passes"], float("inf"))
    pass_s = [sum(p) for p in passes]
    tokens = sum(len(x) for x in w1)
    out["W1"] = {"texts": len(w1), "tokens": tokens, "pass_s": pass_s,
                 "tokens_per_s": tokens / median(pass_s),
                 "p50_ms": median([t for p in passes for t in p]) * 1e3}
    # W2: one batch
    w2 = inputs["w2"]
    times = repeat(lambda: run(w2), 1, job["plan"]["w2_reps"], float("inf"))
    out["W2"] = {"shape": [len(w2), len(w2[0])], "samples_s": times,
                 "tokens_per_s": len(w2) * len(w2[0]) / median(times)}
    # W3: length-sorted batches under a padded-token budget, warm-up on the first batch
    w3 = [[inputs["w3"][i] for i in b] for b in inputs["w3_batches"]]
    run(w3[0])
    times = repeat(lambda: [run(b) for b in w3], 0, job["plan"]["w3_reps"], float("inf"))
    tokens = sum(len(x) for b in w3 for x in b)
    out["W3"] = {"texts": sum(len(b) for b in w3), "batches": len(w3), "tokens": tokens,
                 "samples_s": times, "tokens_per_s": tokens / median(times)}
    out["peak_rss_after_w3_mib"] = procfs.peak_rss_mb()

    # quality inputs: multilingual one text per call, the corpus in W3-style batches
    vecs, routes = {}, {}
    for task, ids in inputs["multilingual"].items():
        got = [embed([x]) for x in ids]
        vecs[f"ml_{task}"] = np.concatenate([g[0] for g in got])
        if got[0][1] is not None:
            routes[f"ml_{task}"] = np.concatenate([g[1] for g in got])
    corpus = inputs["corpus"]
    cv = np.zeros((len(corpus), vecs["ml_search_query"].shape[1]), np.float32)
    croutes: list[Any] = [None] * len(corpus)
    for b in inputs["corpus_batches"]:
        v, r = embed([corpus[i] for i in b])
        cv[b] = v
        if r is not None:
            offsets = np.cumsum([0] + [len(corpus[i]) for i in b])
            for j, i in enumerate(b):
                croutes[i] = r[offsets[j]:offsets[j + 1]]
    vecs["corpus"] = cv
    if croutes[0] is not None:
        routes["corpus"] = np.concatenate(croutes)
    out["peak_rss_end_mib"] = procfs.peak_rss_mb()
    np.savez(job["out_npz"], **{f"vec_{k}": v for k, v in vecs.items()},
             **{f"route_{k}": r for k, r in routes.items()})
    Path(job["out_json"]).write_text(json.dumps(out))
    return 0


def _child_reference(job: dict) -> int:
    """The fp32 PyTorch reference, one text per forward: vectors and expert choices."""
    import numpy as np
    import torch

    from moe_embed.export.checkpoint import load_checkpoint
    from moe_embed.export.reference import ReferenceModel, pad_batch

    torch.set_num_threads(job["threads"])
    inputs = json.loads(Path(job["inputs"]).read_text())
    ck = load_checkpoint(job["checkpoint"])
    model = ReferenceModel.from_tensors(ck.config, ck.tensors)
    del ck

    def embed_one(x: list[int]) -> tuple[np.ndarray, np.ndarray]:
        input_ids, mask = pad_batch([x])
        hidden, routing = model(input_ids, mask)
        v = hidden[0].mean(0)
        r = np.stack([np.sort(routing[k][0].numpy(), axis=-1) for k in sorted(routing)], axis=1)
        return (v / v.norm()).numpy(), r.astype(np.int8)

    arrays = {}
    with torch.inference_mode():
        sets = {f"ml_{t}": ids for t, ids in inputs["multilingual"].items()}
        sets["corpus"] = inputs["corpus"]
        for name, ids in sets.items():
            got = [embed_one(x) for x in ids]
            arrays[f"vec_{name}"] = np.stack([g[0] for g in got]).astype(np.float32)
            arrays[f"route_{name}"] = np.concatenate([g[1] for g in got])
    np.savez(job["out_npz"], **arrays)
    return 0


def run_child(job: dict, work: Path, threads: int) -> dict | None:
    """Run one job in a fresh interpreter; its log goes to work/<name>.log."""
    name = job["variant"]
    job_path = work / f"{name}.job.json"
    job.update(out_npz=str(work / f"{name}.npz"), out_json=str(work / f"{name}.json"))
    job_path.write_text(json.dumps(job))
    env = {**os.environ, **{v: str(threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                      "MKL_NUM_THREADS")}}
    with open(work / f"{name}.log", "w") as fh:
        rc = subprocess.run([sys.executable, __file__, "--child", str(job_path)], env=env,
                            stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = (work / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
        log(f"{name} FAILED (exit {rc}):\n  " + "\n  ".join(tail))
        return None
    return json.loads(Path(job["out_json"]).read_text()) if job["kind"] != "reference" else {}


# ---------------------------------------------------------------------------------------------
# The parent: artifacts, inputs, reference, children, metrics, report.


def _export(source: Path, out: Path, precision: str, threads: int) -> dict:
    """`moe-embed export SOURCE --precision P` in a child process: its time and peak RSS."""
    code = ("import json, sys, time; from moe_embed.export.split import export_bundle; "
            "from moe_embed.testing.procfs import peak_rss_mb; "
            "t = time.perf_counter(); "
            "export_bundle(sys.argv[1], sys.argv[2], precision=sys.argv[3]); "
            "s = time.perf_counter() - t; "
            "print(json.dumps({'seconds': s, 'peak_rss_mib': peak_rss_mb()}))")
    r = subprocess.run([sys.executable, "-c", code, str(source), str(out), precision],
                       capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if r.returncode:
        raise RuntimeError(f"export {precision} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def cache_root(cache: Path | None) -> tuple[Path, Path]:
    """The llama peer's zero-bias full-size checkpoint and this table's folder in the bench
    cache (bundles, reference, work files), keyed by checkpoint, version and bundle layout."""
    from importlib.metadata import version

    from llama_peer.ggufs import checkpoint_key
    from llama_peer.peer import zero_bias_checkpoint

    from moe_embed.export.split import LAYOUT

    checkpoint = zero_bias_checkpoint("full")
    cache = cache or Path(os.environ.get("MOE_EMBED_BENCH_CACHE",
                                         Path.home() / ".cache" / "moe-embed" / "bench"))
    return checkpoint, cache / (f"quant-{checkpoint_key(checkpoint)}-v{version('moe-embed')}"
                                f"-layout{LAYOUT}")


def bundles(checkpoint: Path, root: Path, threads: int) -> tuple[dict[str, Path], dict]:
    """fp32 from the checkpoint, int8/int4 from the fp32 bundle; reused while they verify and
    carry the shipped recipe."""
    from moe_embed.workers.bundle.format import Bundle, BundleError
    from moe_embed.workers.bundle.recipes import RECIPES

    paths, built = {}, {}
    for p in OURS:
        path = root / p
        try:
            if Bundle.load(path).manifest.recipe == RECIPES[p]:
                paths[p] = path
                continue
        except (BundleError, OSError, KeyError, ValueError):
            pass
        source = checkpoint if p == "fp32" else paths["fp32"]
        log(f"exporting the {p} bundle from {source}")
        built[p] = _export(source, path, p, threads)
        log(f"  {p}: {built[p]['seconds']:.0f} s, export peak RSS {built[p]['peak_rss_mib']:.0f} "
            "MiB")
        paths[p] = path
    return paths, built


def make_inputs(tok, plan: Plan) -> dict:
    import inputs as inp

    w1 = inp.w1_set(tok, plan.w1_texts)
    w3 = inp.w3_corpus(tok, plan.w3_texts, hi=plan.w3_max_tokens)
    queries, docs = inp.retrieval_corpus(tok, plan.queries, plan.docs, *plan.doc_tokens)
    corpus = queries.ids + docs.ids
    texts = inp.multilingual_texts()
    return {
        "w1": w1.ids, "w2": inp.w2_batch(*plan.w2_shape), "w3": w3.ids,
        "w3_batches": w3.batches(plan.batch_tokens),
        "multilingual": {t: inp.encode(tok, texts, t) for t in ("search_query",
                                                                 "search_document")},
        "corpus": corpus, "corpus_batches": inp.token_budget_batches(corpus, plan.batch_tokens),
        "n_queries": len(queries.ids),
    }


def reference(inputs_path: Path, checkpoint: Path, cache: Path, work: Path,
              threads: int) -> Path:
    key = hashlib.sha256(inputs_path.read_bytes()).hexdigest()[:16]
    out = cache / f"reference-{key}.npz"
    if out.is_file():
        log(f"reference embeddings cached: {out}")
        return out
    log("embedding the quality inputs with the fp32 PyTorch reference (one text per forward)")
    t = time.perf_counter()
    job = {"kind": "reference", "variant": "reference", "inputs": str(inputs_path),
           "checkpoint": str(checkpoint), "threads": threads}
    if run_child(job, work, threads) is None:
        raise RuntimeError("the reference run failed")
    Path(job["out_npz"]).replace(out)
    log(f"  reference done in {time.perf_counter() - t:.0f} s")
    return out


def f32_check(threads: int, work: Path) -> dict:
    """llama_peer/peer.py --check on the full checkpoint, in its own process."""
    log("checking the F32 GGUF against the fp32 reference (llama_peer/peer.py --check)")
    r = subprocess.run([sys.executable, str(HERE / "llama_peer" / "peer.py"), "--check",
                        "--sizes", "full", "--threads", str(threads)],
                       capture_output=True, text=True)
    (work / "f32-check.log").write_text(r.stdout + r.stderr)
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if not lines:
        return {"pass": False, "error": r.stderr[-2000:]}
    return json.loads(lines[-1])


def quality(npz: Path, ref: dict, n_queries: int) -> dict:
    import numpy as np

    z = np.load(npz)
    out: dict[str, Any] = {}
    ml = []
    for task in ("search_query", "search_document"):
        cos = (z[f"vec_ml_{task}"].astype(np.float64) * ref[f"vec_ml_{task}"]).sum(1)
        out[task] = {"min_cos": float(cos.min()), "mean_cos": float(cos.mean())}
        ml.append(cos)
    cos = np.concatenate(ml)
    out.update(min_cos=float(cos.min()), mean_cos=float(cos.mean()), texts=int(cos.size))
    v, r = z["vec_corpus"], ref["vec_corpus"]
    ccos = (v.astype(np.float64) * r).sum(1)
    out["corpus"] = {"texts": int(ccos.size), "min_cos": float(ccos.min()),
                     "mean_cos": float(ccos.mean())}
    q, d, rq, rd = v[:n_queries], v[n_queries:], r[:n_queries], r[n_queries:]
    k = 10
    mine = np.argsort(-(q @ d.T), axis=1)[:, :k]
    theirs = np.argsort(-(rq @ rd.T), axis=1)[:, :k]
    overlap = [len(set(a) & set(b)) / k for a, b in zip(mine, theirs, strict=True)]
    out["top10_overlap"] = float(np.mean(overlap))
    out["top10_overlap_min"] = float(np.min(overlap))
    if "route_corpus" in z:
        same, every = [], []
        for name in ("ml_search_query", "ml_search_document", "corpus"):
            eq = (z[f"route_{name}"] == ref[f"route_{name}"]).all(-1)  # [tokens, layers]
            same.append(eq.reshape(-1))
            every.append(eq.all(-1))
        same_all, every_all = np.concatenate(same), np.concatenate(every)
        out["routing"] = {"pairs": int(same_all.size), "fidelity": float(same_all.mean()),
                          "tokens": int(every_all.size),
                          "tokens_all_layers_same": float(every_all.mean())}
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few minutes: fewer and shorter "
                   f"inputs, fewer repetitions, only {', '.join(QUICK_VARIANTS)} unless --only "
                   "(writes under benchmarks/results/quick)")
    p.add_argument("--only", default="", help=f"comma list of variants, from {ORDER}")
    p.add_argument("--threads", type=int, default=2, help="threads for every variant "
                   "(default 2)")
    p.add_argument("--cache", type=Path, default=None, help="bench cache (default "
                   "$MOE_EMBED_BENCH_CACHE or ~/.cache/moe-embed/bench)")
    p.add_argument("--out", type=Path, default=None, help="folder for quant.json and QUANT.md "
                   "(default: benchmarks/results + benchmarks/QUANT.md)")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=BUNDLE",
                   help="also measure this moe-embed bundle (recipe experiments)")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    default = QUICK_VARIANTS if args.quick else ORDER
    args.variants = [v for v in ORDER if v in set(args.only.split(","))] if args.only \
        else list(default)
    unknown = set(filter(None, args.only.split(","))) - set(ORDER)
    if unknown:
        p.error(f"--only: unknown {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return _child(args.child)
    from importlib.metadata import version

    import numpy as np
    from llama_peer import LLAMA_CPP_PYTHON_VERSION
    from llama_peer.ggufs import make_ggufs
    from llama_peer.provision import check_installed
    from quant_report import markdown

    from moe_embed.service.tokenizer import Tokenizer

    check_installed()
    plan = QUICK if args.quick else FULL
    t_start = time.perf_counter()
    results_dir = args.out or (HERE / "results" / ("quick" if args.quick else ""))
    results_dir.mkdir(parents=True, exist_ok=True)
    md_path = (results_dir / "QUANT.md") if (args.out or args.quick) else HERE / "QUANT.md"
    meta: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "plan": asdict(plan),
                            "quick": args.quick, "threads": args.threads, "cpu": cpu(),
                            "load_start": load_average(),
                            "uptime_start": subprocess.run(["uptime"], capture_output=True,
                                                           text=True).stdout.strip()}
    log(f"CPU {meta['cpu']['model']}; {' '.join(meta['cpu']['flags'])}")
    log(f"load average at start: {meta['uptime_start']}")

    checkpoint, root = cache_root(args.cache)
    work = root / ("work-quick" if args.quick else "work")  # job files, logs, embeddings
    work.mkdir(parents=True, exist_ok=True)
    paths, built = bundles(checkpoint, root, args.threads)
    for extra in args.extra:
        name, _, path = extra.partition("=")
        paths[name] = Path(path)
        args.variants.append(name)
    ggufs = make_ggufs(checkpoint, types=("F32", *[v for v in GGUF if v in args.variants]))
    meta.update(checkpoint=str(checkpoint), bundles={k: str(v) for k, v in paths.items()},
                exports=built, ggufs={k: str(v) for k, v in ggufs.items()},
                versions={p: version(p) for p in ("moe-embed", "onnxruntime", "torch", "onnx",
                                                    "numpy")}
                | {"llama-cpp-python": LLAMA_CPP_PYTHON_VERSION})

    check = f32_check(args.threads, work)
    log(f"F32 GGUF check: {'PASS' if check.get('pass') else 'FAIL'}")

    tok = Tokenizer(paths["fp32"] / "tokenizer.json")
    inputs = make_inputs(tok, plan)
    inputs_path = work / "inputs.json"
    inputs_path.write_text(json.dumps(inputs))
    ref_path = reference(inputs_path, checkpoint, root, work, args.threads)
    ref = dict(np.load(ref_path))

    rows: dict[str, dict] = {}
    for name in args.variants:
        ours = name not in GGUF
        path = paths[name] if ours else ggufs[name]
        size = dir_bytes(path) if ours else path.stat().st_size
        log(f"{name}: measuring in a fresh process ({size / 2**20:.1f} MiB)")
        t = time.perf_counter()
        r = run_child({"kind": "ours" if ours else "gguf", "variant": name, "path": str(path),
                       "threads": args.threads, "inputs": str(inputs_path),
                       "plan": asdict(plan)}, work, args.threads)
        if r is None:
            rows[name] = {"variant": name, "error": "see the log", "bytes": size}
            continue
        r.update(bytes=size, seconds=time.perf_counter() - t, ours=ours,
                 quality=quality(work / f"{name}.npz", ref, inputs["n_queries"]))
        if ours:
            from moe_embed.workers.bundle.format import Bundle

            m = Bundle.load(path, verify=False).manifest
            r["recipe"] = m.recipe.to_dict() if m.recipe else None
            r["stored_bytes"] = m.stored_bytes()
        rows[name] = r
        q = r["quality"]
        log(f"  {name}: W1 {r['W1']['tokens_per_s']:.0f}, W2 {r['W2']['tokens_per_s']:.0f}, "
            f"W3 {r['W3']['tokens_per_s']:.0f} tok/s; RSS {r['peak_rss_after_w3_mib']:.0f} MiB; "
            f"cos min {q['min_cos']:.5f} mean {q['mean_cos']:.5f}; top-10 "
            f"{q['top10_overlap']:.3f}" + (f"; routing {q['routing']['fidelity']:.4f}"
                                          if "routing" in q else "")
            + f" ({r['seconds']:.0f} s)")
    meta.update(load_end=load_average(), wall_s=time.perf_counter() - t_start,
                uptime_end=subprocess.run(["uptime"], capture_output=True,
                                          text=True).stdout.strip(),
                git_commit=subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO,
                                          capture_output=True, text=True).stdout.strip(),
                git_dirty=bool(subprocess.run(["git", "status", "--porcelain",
                                               "--untracked-files=no"], cwd=REPO,
                                              capture_output=True, text=True).stdout.strip()))
    ggufs_size = {k: v.stat().st_size for k, v in ggufs.items()}
    results = {"meta": meta, "f32_check": check, "rows": rows, "gguf_bytes": ggufs_size,
               "inputs": {"w1_tokens": sum(map(len, inputs["w1"])),
                          "w3_tokens": sum(map(len, inputs["w3"])),
                          "corpus_queries": inputs["n_queries"],
                          "corpus_docs": len(inputs["corpus"]) - inputs["n_queries"],
                          "corpus_tokens": sum(map(len, inputs["corpus"])),
                          "multilingual_texts": len(inputs["multilingual"]["search_query"])}}
    json_path = results_dir / "quant.json"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    md_path.write_text(markdown(results, md_path.parent, json_path))
    log(f"load average at end: {meta['uptime_end']}")
    log(f"wrote {json_path} and {md_path} in {meta['wall_s'] / 60:.1f} min")
    return 0 if all("error" not in r for r in rows.values()) and check.get("pass") else 1


if __name__ == "__main__":
    sys.exit(main())
