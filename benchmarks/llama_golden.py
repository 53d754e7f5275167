"""Write tests/data/llama_golden.json: llama.cpp's embeddings of a tiny synthetic checkpoint.

    make llama-golden                       # = make llama-peer, then this script
    .venv/bin/python benchmarks/llama_golden.py [--seed 0] [--threads 2] [--out PATH]

Not a test: it needs the optional llama.cpp peer (`make llama-peer`). The file it writes is an
independent golden oracle for tests/export/test_llama_oracle.py, which needs no llama.cpp: the
recipe of the checkpoint (tiny, seed, zero expert bias, since llama.cpp drops
`mlp.experts.bias`), the sha256 of its model.safetensors, the llama.cpp version, the texts with
their task, their token ids (moe_embed's tokenizer: the same ids are fed to llama.cpp and to the
runtime) and llama.cpp's F32 embeddings (full dimension, mean-pooled, L2-normalized, 7
significant digits).

The texts are tests/data/multilingual.json plus one 512-token text built from them (rotary at
the far positions).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from llama_peer import LLAMA_CPP_PYTHON_VERSION
from llama_peer.ggufs import make_ggufs
from llama_peer.peer import MIN_COS, LlamaPeer, Reference, tokenizer_agreement

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

DEFAULT_OUT = ROOT / "tests" / "data" / "llama_golden.json"
TASK = "search_document"
SIZE = "tiny"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def golden_texts() -> list[str]:
    texts = json.loads((ROOT / "tests" / "data" / "multilingual.json").read_text())
    return texts + [" ".join(texts) * 3]  # > 512 tokens: truncated to 512 by the tokenizer


def _g7(x: float) -> float:
    return float(f"{x:.7g}")


def _dump(doc: dict) -> str:
    """JSON with one line per text, id list and embedding row: small and diff-friendly."""
    lines = ["{"]
    items = list(doc.items())
    for n, (key, value) in enumerate(items):
        end = "," if n < len(items) - 1 else ""
        if key in ("texts", "ids", "embeddings"):
            rows = [json.dumps(v, ensure_ascii=False) for v in value]
            body = ",\n    ".join(rows)
            lines.append(f'  "{key}": [\n    {body}\n  ]{end}')
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}{end}")
    return "\n".join(lines) + "\n}\n"


def build(seed: int, threads: int, workdir: Path) -> dict:
    import llama_cpp

    from moe_embed.export.synthetic import write_synthetic
    from moe_embed.service.tasks import task_named
    from moe_embed.service.tokenizer import Tokenizer

    ckpt = write_synthetic(workdir / "ckpt", SIZE, seed, zero_expert_bias=True)
    texts = golden_texts()
    tok = Tokenizer(ckpt / "tokenizer.json")
    ids = [x.tolist() for x in tok.encode(texts, task_named(TASK))]
    f32 = make_ggufs(ckpt, types=("F32",))["F32"]
    with LlamaPeer(f32, threads=threads) as peer:
        emb = np.concatenate([peer.embed([x]) for x in ids])  # one text per llama_encode call
        batched = peer.embed(ids)
        agreement = tokenizer_agreement(peer, texts, ids, task_named(TASK).prefix)
    reference = Reference(ckpt)
    ref, _ = reference.embed(ids)
    ref_ggml, _ = reference.embed(ids, gelu="ggml")
    cos = (emb.astype(np.float64) * ref).sum(axis=1)
    if cos.min() < MIN_COS:  # a router near-tie flipped by llama.cpp's approximate GELU
        bad = [int(i) for i in np.flatnonzero(cos < MIN_COS)]
        raise SystemExit(f"llama.cpp vs the fp32 reference: cos {cos.min():.7f} < {MIN_COS} on "
                         f"texts {bad}; the runtime would fail the oracle there. Pick another "
                         "--seed (see benchmarks/llama_peer/peer.py on GELU near-ties).")
    return {
        "about": "llama.cpp's F32 embeddings of a tiny synthetic nomic-bert-moe checkpoint, "
                 "the independent oracle of tests/export/test_llama_oracle.py. Regenerate with "
                 "`make llama-golden` (needs the optional llama.cpp peer).",
        "checkpoint": {"size": SIZE, "seed": seed, "zero_expert_bias": True,
                       "model_safetensors_sha256": sha256(ckpt / "model.safetensors")},
        "llama_cpp": {"llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
                      "installed": llama_cpp.__version__,
                      "gguf": "F32, convert_hf_to_gguf.py from the same sdist",
                      "gguf_sha256": sha256(f32),
                      "api": "llama_encode, one text per call, pooling MEAN, flash attention "
                             "off, embeddings L2-normalized",
                      "threads": threads,
                      "system_info": llama_cpp.llama_print_system_info().decode().strip()},
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "task": TASK,
        "task_prefix": task_named(TASK).prefix,
        "dim": int(emb.shape[1]),
        "at_generation": {
            "llama_vs_fp32_reference": {"min_cos": float(cos.min()),
                                        "max_abs": float(np.abs(emb - ref).max())},
            "llama_vs_fp32_reference_with_ggml_gelu_max_abs":
                float(np.abs(emb - ref_ggml).max()),
            "batched_vs_one_at_a_time_max_abs": float(np.abs(batched - emb).max()),
            "llama_tokenizer_identical_ids": f"{agreement['identical']}/{agreement['texts']}",
        },
        "texts": texts,
        "ids": ids,
        "embeddings": [[_g7(x) for x in row] for row in emb.tolist()],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="llama-golden-") as tmp:
        doc = build(args.seed, args.threads, Path(tmp))
    text = _dump(doc)
    json.loads(text)  # well-formed
    args.out.write_text(text, encoding="utf-8")
    print(json.dumps({"out": str(args.out), "bytes": len(text.encode()),
                      "texts": len(doc["texts"]), **doc["at_generation"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
