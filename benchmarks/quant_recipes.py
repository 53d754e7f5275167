"""Quantization recipes across checkpoints: quality and size of candidate recipes next to
llama.cpp's Q8_0 and Q4_K_M of the same checkpoint, one run.

    .venv/bin/python benchmarks/quant_recipes.py \\
        --checkpoint full:seed=0 --checkpoint full:seed=1 --checkpoint full:seed=2:outliers=3 \\
        [--recipes shipped-int8,shipped-int4,...] [--gguf Q8_0,Q4_K_M] [--out FILE.json]

A checkpoint spec is `SIZE[:seed=N][:outliers=N][:gain=G][:weight_scale=S][:layers=N]`: a
synthetic checkpoint (`moe-embed synthetic` with those options) with zero expert bias (llama.cpp's
converter drops that tensor), cached in the bench cache. `layers=4` keeps the real widths with
fewer layers: quick exploration only; report full checkpoints.

For each checkpoint: the fp32 bundle, then each candidate recipe exported from it; the 24
multilingual texts of tests/data/multilingual.json with both search prefixes (48 embeddings), one
text per call, against the fp32 PyTorch reference (one text per forward): min and mean cosine;
and the bundle's size on disk (every file: graphs, router, tokenizer, manifest). With
`--gguf` (needs `make llama-peer`), the same for llama.cpp's GGUF types (file size). Prints one
JSON line per row and a markdown table per checkpoint; `--out` keeps them all as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from moe_embed.workers.bundle.recipes import RECIPES, Recipe, _recipe

HERE = Path(__file__).resolve().parent

GROUPS = {"experts": ("expert.w1", "expert.w2"), "attn": ("attn.qkv", "attn.out_proj"),
          "fc": ("mlp.fc1", "mlp.fc2"), "table": ("word_embeddings",)}


def _without(base: str, group: str) -> Recipe:
    """The shipped `base` recipe with `group`'s roles left fp32."""
    shipped = RECIPES[base]
    formats = {r: ("fp32" if r in GROUPS[group] else f) for r, f in shipped.formats.items()}
    return Recipe(base, formats, dict(shipped.overrides),
                  shipped.accuracy_level).validate()


CANDIDATES: dict[str, tuple[str, Recipe]] = {
    "shipped-int8": ("int8", RECIPES["int8"]),
    "shipped-int4": ("int4", RECIPES["int4"]),
    "int8-all-nbits8": ("int8", _recipe("int8", "nbits8-block32", "nbits8-block32",
                                        "nbits8-block128")),
    "int8-all-rowwise": ("int8", _recipe("int8", "int8-rowwise", "int8-rowwise",
                                         "nbits8-block128")),
    "int8-ln-inputs-nbits8": ("int8", _recipe(
        "int8", "int8-rowwise", "int8-rowwise", "nbits8-block128",
        **{"attn.qkv": "nbits8-block32", "attn.out_proj": "nbits8-block32",
           "mlp.fc1": "nbits8-block32", "expert.w1": "nbits8-block32"})),
    "int8-fc-nbits8-sym": ("int8", _recipe(
        "int8", "int8-rowwise", "int8-rowwise", "nbits8-block128",
        **{"attn.qkv": "nbits8-block32", "attn.out_proj": "nbits8-block32",
           "mlp.fc1": "nbits8-block32-sym", "mlp.fc2": "nbits8-block32-sym"})),
    "int8-fc-nbits8-sym-t256": ("int8", _recipe(
        "int8", "int8-rowwise", "int8-rowwise", "nbits8-block256",
        **{"attn.qkv": "nbits8-block32", "attn.out_proj": "nbits8-block32",
           "mlp.fc1": "nbits8-block32-sym", "mlp.fc2": "nbits8-block32-sym"})),
    "int8-table-sym": ("int8", _recipe(
        "int8", "int8-rowwise", "nbits8-block32", "nbits8-block128-sym",
        **{"mlp.fc1": "nbits8-block32-sym", "mlp.fc2": "nbits8-block32-sym"})),
    # attribution: the shipped recipe with one group of roles left fp32 (over the size budget;
    # they say where a checkpoint's loss comes from, not what to ship)
    **{f"{base}-{group}-fp32": (base, _without(base, group))
       for base in ("int8", "int4") for group in GROUPS},
    # the experts' second GEMM (a Gelu's 3072-wide output: one row scale spans its outliers)
    # with per-block activation scales; not batch-invariant (MatMulNBits 8-bit at blocks >= 128)
    **{f"int8-w2-nbits8-b{b}": ("int8", Recipe("int8", {
        **RECIPES["int8"].formats, "expert.w2": f"nbits8-block{b}-sym"}).validate())
       for b in (128, 256)},
    # coarser blocks for attention and the dense MLP (fewer int32 -> float conversions: faster
    # MatMulNBits on AVX-512 VNNI), alone and with expert.w2 on 8-bit blocks (block 128: not
    # batch-invariant either)
    **{f"int8-dense-b{b}{'-w2' if w2 else ''}": ("int8", Recipe("int8", {
        **RECIPES["int8"].formats, "attn.qkv": f"nbits8-block{b}",
        "attn.out_proj": f"nbits8-block{b}", "mlp.fc1": f"nbits8-block{b}-sym",
        "mlp.fc2": f"nbits8-block{b}-sym",
        **({"expert.w2": "nbits8-block256-sym"} if w2 else {})}).validate())
       for b in (64, 128) for w2 in (False, True)},
    # expert.w2 on 8-bit blocks of 64 (batch-invariant, unlike blocks >= 128) in some MoE
    # layers only: each layer costs ~1.1 MiB over the row-wise form, and Q8_0's size leaves ~4.5
    **{f"int8-w2-b64-l{'-'.join(map(str, layers))}": ("int8", Recipe(
        "int8", dict(RECIPES["int8"].formats),
        {f"layers.{i}.expert.w2": "nbits8-block64-sym" for i in layers}).validate())
       for layers in ((1,), (3,), (5,), (7,), (9,), (11,), (1, 3), (1, 3, 5), (1, 3, 5, 7),
                      (1, 3, 5, 7, 9, 11))},
    # int4's loss on the outlier checkpoint is its 4-bit experts: one MoE layer's on 8-bit blocks
    # (the first; the last ones, whose changes no later router sees)
    **{f"int4-l{layer}-{'-'.join(roles)}-8bit": ("int4", Recipe(
        "int4", dict(RECIPES["int4"].formats),
        {f"layers.{layer}.expert.{r}": "nbits8-block32-sym" for r in roles}).validate())
       for layer in (1, 9, 11) for roles in (("w2",), ("w1", "w2"))},
    "int4-table-b32": ("int4", _recipe("int4", "nbits4-block32", "int8-rowwise",
                                       "nbits4-block32")),
    "int4-table-8bit": ("int4", _recipe("int4", "nbits4-block32", "int8-rowwise",
                                        "nbits8-block128")),
}


# the quantizer's source as this process imported it: a cached bundle is reused only if the code
# that would export it again is the same
CODE = "".join((HERE.parent / f).read_text()
               for f in ("export/quantize.py", "workers/bundle/recipes.py"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_spec(spec: str) -> dict:
    size, *opts = spec.split(":")
    out = {"size": size, "seed": 0, "outlier_channels": 0, "outlier_gain": 30.0,
           "weight_scale": 1.0, "layers": None}
    keys = {"seed": ("seed", int), "outliers": ("outlier_channels", int),
            "gain": ("outlier_gain", float), "weight_scale": ("weight_scale", float),
            "layers": ("layers", int)}
    for opt in opts:
        k, _, v = opt.partition("=")
        if k not in keys:
            raise SystemExit(f"unknown checkpoint option {k!r} in {spec!r}; known: {list(keys)}")
        field, cast = keys[k]
        out[field] = cast(v)
    return out


def checkpoint(spec: str, root: Path) -> Path:
    from moe_embed.export.synthetic import write_synthetic

    opts = parse_spec(spec)
    path = root / "checkpoints" / spec.replace(":", "_").replace("=", "")
    if not (path / ".complete").is_file():
        log(f"checkpoint {spec}: writing")
        write_synthetic(path, zero_expert_bias=True, **opts)
        (path / ".complete").write_text("ok\n")
    return path


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bundle(ckpt: Path, root: Path, name: str, precision: str, recipe: Recipe | None) -> Path:
    from moe_embed.export.split import export_bundle

    key = "fp32" if recipe is None else hashlib.sha256(
        (json.dumps(recipe.to_dict(), sort_keys=True) + CODE).encode()).hexdigest()[:10]
    path = root / "bundles" / ckpt.name / f"{name}-{key}"
    if not (path / "manifest.json").is_file():
        t = time.perf_counter()
        source = ckpt if recipe is None else bundle(ckpt, root, "fp32", "fp32", None)
        export_bundle(str(source), path, precision=precision, recipe=recipe)
        log(f"{ckpt.name}: exported {name} in {time.perf_counter() - t:.0f} s")
    return path


def texts_ids(ckpt: Path) -> list[list[int]]:
    from moe_embed.service.tasks import task_named
    from moe_embed.service.tokenizer import Tokenizer

    texts = json.loads((HERE.parent / "tests" / "data" / "multilingual.json").read_text())
    tok = Tokenizer(ckpt / "tokenizer.json")
    return [x.tolist() for task in ("search_query", "search_document")
            for x in tok.encode(texts, task_named(task))]


def reference(ckpt: Path, ids: list[list[int]]) -> np.ndarray:
    cached = ckpt / "reference-multilingual.npy"
    if not cached.is_file():
        from llama_peer.peer import reference_embeddings

        t = time.perf_counter()
        np.save(cached, reference_embeddings(ckpt, ids))
        log(f"{ckpt.name}: reference in {time.perf_counter() - t:.0f} s")
    return np.load(cached)


def ours(path: Path, ids: list[list[int]], threads: int) -> np.ndarray:
    from moe_embed.workers.runtime.runtime import Runtime, pack

    rt = Runtime(path, threads=threads)
    return np.stack([rt.embed(*pack([x])).vectors[0] for x in ids])


def gguf(ckpt: Path, qtype: str, ids: list[list[int]], threads: int) -> tuple[np.ndarray, int]:
    from llama_peer.ggufs import make_ggufs
    from llama_peer.peer import LlamaPeer

    path = make_ggufs(ckpt, types=(qtype,))[qtype]
    with LlamaPeer(path, threads=threads) as peer:
        return np.concatenate([peer.embed([x]) for x in ids]), path.stat().st_size


def cosines(v: np.ndarray, ref: np.ndarray) -> dict:
    cos = (v.astype(np.float64) * ref).sum(axis=1) / np.linalg.norm(v, axis=1) \
        / np.linalg.norm(ref, axis=1)
    return {"cos_min": float(cos.min()), "cos_mean": float(cos.mean())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", action="append", required=True, help="checkpoint spec")
    p.add_argument("--recipes", default="shipped-int8,shipped-int4",
                   help=f"comma list from {list(CANDIDATES)}")
    p.add_argument("--gguf", default="", help="comma list of GGUF types, e.g. Q8_0,Q4_K_M")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", type=Path, default=None, help="bench cache (default "
                   "$MOE_EMBED_BENCH_CACHE or ~/.cache/moe-embed/bench)")
    p.add_argument("--out", type=Path, default=None, help="write every row here as JSON")
    args = p.parse_args(argv)

    root = (args.cache or Path.home() / ".cache" / "moe-embed" / "bench") / "quant-recipes"
    root.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.recipes.split(",") if n]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise SystemExit(f"unknown recipes {unknown}; choose from {list(CANDIDATES)}")
    rows = []
    for spec in args.checkpoint:
        ckpt = checkpoint(spec, root)
        ids = texts_ids(ckpt)
        ref = reference(ckpt, ids)
        todo = [(n, *CANDIDATES[n]) for n in names]
        for name, precision, recipe in todo:
            path = bundle(ckpt, root, name, precision, recipe)
            row = {"checkpoint": spec, "variant": name, "precision": precision,
                   "recipe": recipe.to_dict(), "mib": dir_bytes(path) / 2**20,
                   **cosines(ours(path, ids, args.threads), ref)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        for qtype in [q for q in args.gguf.split(",") if q]:
            v, size = gguf(ckpt, qtype, ids, args.threads)
            row = {"checkpoint": spec, "variant": f"llama.cpp {qtype}", "mib": size / 2**20,
                   **cosines(v, ref)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    for spec in args.checkpoint:
        print(f"\n### {spec}\n\n| variant | MiB | cos min | cos mean |\n|---|---|---|---|")
        for r in rows:
            if r["checkpoint"] == spec:
                print(f"| {r['variant']} | {r['mib']:.1f} | {r['cos_min']:.5f} | "
                      f"{r['cos_mean']:.5f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
