"""The runtime agrees with llama.cpp, an independent implementation, on a tiny checkpoint.

tests/data/llama_golden.json holds llama.cpp's F32 embeddings (written by
benchmarks/llama_golden.py; llama.cpp is NOT needed here). The reference model and the exporter
share code (rotary tables, config parsing), so a mistake made in both passes test_parity;
llama.cpp shares none of it. Its own deviations from the exact model are small and known:
GELU is the tanh form looked up in an fp16 table, and the expert output bias is dropped (hence
a checkpoint with zero expert bias).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from moe_embed.export.split import export_bundle
from moe_embed.export.synthetic import write_synthetic
from moe_embed.service.tasks import task_named
from moe_embed.service.tokenizer import Tokenizer
from moe_embed.testing.service import IN_PROCESS_THREADS
from moe_embed.workers.runtime.runtime import Runtime, pack

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "llama_golden.json"
MIN_COS = 0.99999
# Measured at generation: llama.cpp vs the runtime 8.3e-5, vs the fp32 reference 8.3e-5 (tiny,
# seed 0, 25 texts up to 512 tokens). Components of a 64-dim unit vector are ~0.125.
MAX_ABS = 2.5e-4
REGENERATE = ("`make llama-golden` (builds the optional llama.cpp peer, then runs "
              "benchmarks/llama_golden.py) and review the diff of tests/data/llama_golden.json")


def embed_ids(bundle: Path, ids: list[list[int]], batched: bool) -> np.ndarray:
    """The runtime's normalized full-dimension embeddings: the one place that calls its API."""
    rt = Runtime(bundle, threads=IN_PROCESS_THREADS)
    if batched:
        return np.stack(rt.embed(*pack(ids)).vectors)
    return np.stack([rt.embed(*pack([x])).vectors[0] for x in ids])


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def oracle_bundle(golden, tmp_path_factory) -> Path:
    recipe = golden["checkpoint"]
    assert recipe["zero_expert_bias"] is True  # llama.cpp drops mlp.experts.bias
    ckpt = write_synthetic(tmp_path_factory.mktemp("oracle") / "ckpt", recipe["size"],
                           recipe["seed"], zero_expert_bias=True)
    digest = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
    if digest != recipe["model_safetensors_sha256"]:
        pytest.fail(
            f"the synthetic generator changed: write_synthetic({recipe['size']!r}, seed="
            f"{recipe['seed']}, zero_expert_bias=True) now gives model.safetensors sha256 "
            f"{digest}, the golden file was made from {recipe['model_safetensors_sha256']}. "
            f"Regenerate the golden file: {REGENERATE}.")
    return export_bundle(str(ckpt), tmp_path_factory.mktemp("oracle") / "routed")


def test_golden_file_is_consistent(golden):
    n = len(golden["texts"])
    assert n == len(golden["ids"]) == len(golden["embeddings"]) >= 20
    assert max(len(x) for x in golden["ids"]) == 512  # far rotary positions are covered
    emb = np.asarray(golden["embeddings"], dtype=np.float64)
    assert emb.shape == (n, golden["dim"])
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_golden_ids_are_the_tokenizers(golden, oracle_bundle):
    tok = Tokenizer(Path(oracle_bundle) / "tokenizer.json")
    ids = tok.encode(golden["texts"], task_named(golden["task"]))
    assert [x.tolist() for x in ids] == golden["ids"]


@pytest.mark.parametrize("batched", [False, True], ids=["one-at-a-time", "batched"])
def test_runtime_matches_llama_cpp(golden, oracle_bundle, batched):
    ours = embed_ids(oracle_bundle, golden["ids"], batched)
    theirs = np.asarray(golden["embeddings"], dtype=np.float32)
    assert ours.shape == theirs.shape
    cos = (ours.astype(np.float64) * theirs).sum(axis=1) / np.linalg.norm(theirs, axis=1)
    worst = int(cos.argmin())
    assert cos.min() >= MIN_COS, (
        f"text {worst} ({golden['texts'][worst][:40]!r}): cos {cos[worst]:.7f} to llama.cpp")
    err = np.abs(ours - theirs)
    row = int(err.max(axis=1).argmax())
    assert err.max() <= MAX_ABS, (
        f"text {row} ({golden['texts'][row][:40]!r}): max abs {err.max():.2e} > {MAX_ABS}")
