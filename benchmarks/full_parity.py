"""Script, not a CI test: the full-size (475M) synthetic model, runtime vs PyTorch reference.

    .venv/bin/python benchmarks/full_parity.py [--workdir DIR] [--threads 2]

Builds (or reuses) the `full` synthetic checkpoint and its routed bundle, embeds every text of
tests/data/multilingual.json one at a time and as one padded batch, and checks cos >= 0.99999,
max-abs error and identical expert choices token by token against the reference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from moe_embed.export.checkpoint import load_checkpoint
from moe_embed.export.reference import ReferenceModel, pad_batch
from moe_embed.export.split import export_bundle
from moe_embed.export.synthetic import write_synthetic
from moe_embed.service.tasks import task_named
from moe_embed.service.tokenizer import Tokenizer
from moe_embed.workers.bundle.format import Bundle, BundleError
from moe_embed.workers.runtime.runtime import Runtime, pack

TEXTS = Path(__file__).resolve().parents[1] / "tests" / "data" / "multilingual.json"


def _bundle(workdir: Path) -> tuple[Path, Path]:
    ckpt, bundle = workdir / "ckpt", workdir / "routed"
    if not (ckpt / "model.safetensors").is_file():
        write_synthetic(ckpt, "full", seed=0)
    try:
        Bundle.load(bundle)
    except BundleError:
        export_bundle(str(ckpt), bundle)
    return ckpt, bundle


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache/moe-embed/full-parity")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ckpt, bundle = _bundle(args.workdir)
    rt = Runtime(bundle, threads=args.threads)
    ck = load_checkpoint(str(ckpt))
    ref = ReferenceModel.from_tensors(ck.config, ck.tensors)
    texts = json.loads(TEXTS.read_text())
    ids = [x.tolist() for x in Tokenizer.from_bundle(rt.bundle).encode(
        texts, task_named("search_document"))]
    worst_cos, worst_abs, mismatches = 1.0, 0.0, 0
    t0 = time.perf_counter()
    for batch in [[x] for x in ids] + [ids]:
        input_ids, mask = pad_batch(batch)
        hidden, routing = ref(input_ids, mask)
        r = rt.forward(*pack(batch))
        m = mask.numpy().astype(bool)
        for layer, experts in routing.items():
            mismatches += int((experts.numpy()[m] != r.expert_ids[layer]).any(axis=1).sum())
        ours = np.stack(rt.embed(*pack(batch)).vectors)
        theirs = ref.embed(input_ids, mask).numpy()
        worst_cos = min(worst_cos, float((ours * theirs).sum(axis=1).min()))
        worst_abs = max(worst_abs, float(np.abs(ours - theirs).max()))
    ok = worst_cos >= 0.99999 and mismatches == 0
    seconds = round(time.perf_counter() - t0, 1)
    print(json.dumps({"texts": len(texts), "min_cos": worst_cos, "max_abs": worst_abs,
                      "routing_mismatches": mismatches, "seconds": seconds, "pass": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
