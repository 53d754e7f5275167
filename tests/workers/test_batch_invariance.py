"""A text's vector does not depend on its batch-mates, at every precision: bit-identical alone, in
random batches (with other texts' options mixed in, across chunk and expert-piece boundaries), in
a process with another thread count, and through the service with two workers under concurrent
load.

Why it can hold: every weight GEMM's output row depends on its input row alone (fp32: ONNX
Runtime's prepacked sgemm; int8-rowwise: per-row activation scales and integer sums;
MatMulNBits at accuracy level 4: per-block-of-a-row scales), attention's padding adds exact
zeros, and LayerNorm, pooling and the router work row by row. A per-call activation scale (ONNX
Runtime's dynamic int8, the int8 recipe before issue 27) breaks every test here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest

from moe_embed.export.commands import PRECISIONS
from moe_embed.export.split import export_bundle
from moe_embed.service.tasks import task_named
from moe_embed.service.tokenizer import Tokenizer
from moe_embed.testing.service import ServerThread, vectors
from moe_embed.v1 import embedder_pb2 as pb
from moe_embed.workers.bundle.format import Bundle
from moe_embed.workers.bundle.recipes import LAST_MOE_LAYER, RECIPES, Recipe
from moe_embed.workers.runtime.runtime import Runtime, pack, run_expert_rows
from moe_embed.workers.runtime.sessions import session_options

DIMS = (0, 16, 32, 48)  # the tiny model's Matryoshka range is 16..64
PARTITIONS = 5  # each text lands in this many random batches
# The shipped int4 recipe names the full model's last MoE layer (11), which the tiny model (4
# layers, MoE on 1 and 3) does not have: this variant puts that override on the tiny model's
# last MoE layer, so its format is checked here too.
LAST_W2 = "int4-last-moe-layer-w2"
VARIANTS = (*PRECISIONS, LAST_W2)


@pytest.fixture(scope="module")
def bundles(tiny_bundles, tiny_checkpoint, tmp_path_factory) -> dict:
    """The tiny model at every precision, and LAST_W2."""
    shipped = RECIPES["int4"]
    moved = {k.replace(f"layers.{LAST_MOE_LAYER}.", "layers.3."): v
             for k, v in shipped.overrides.items()}
    assert moved and all(k.startswith("layers.3.") for k in moved)
    recipe = Recipe("int4", dict(shipped.formats), moved, shipped.accuracy_level).validate()
    out = export_bundle(str(tiny_checkpoint), tmp_path_factory.mktemp("bundle") / LAST_W2,
                        precision="int4", recipe=recipe)
    formats = {t.format for t in Bundle.load(out).manifest.tensors if t.layer == 3}
    assert set(moved.values()) <= formats  # the override took effect
    return {**tiny_bundles, LAST_W2: out}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _verdict(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[int, int, float]:
    """(pairs, bit-identical pairs, worst cosine)."""
    same = sum(1 for a, b in pairs if a.shape == b.shape and np.array_equal(a, b))
    worst = min((_cos(a, b) for a, b in pairs if a.shape == b.shape), default=1.0)
    return len(pairs), same, worst


@pytest.fixture(scope="module")
def cases(tiny_bundle, multilingual_texts) -> list[dict]:
    """Each multilingual text as a query and as a document (and one text over 512 tokens), each
    with its own dimensions and normalize option."""
    tok = Tokenizer.from_bundle(Bundle.load(tiny_bundle))
    long_text = " ".join(multilingual_texts) * 3
    rng = np.random.default_rng(27)
    out = []
    for task, texts in (("search_query", multilingual_texts),
                        ("search_document", multilingual_texts + [long_text])):
        for text, ids in zip(texts, tok.encode(texts, task_named(task)), strict=True):
            out.append({"text": text, "task": task, "ids": ids.tolist(),
                        "dims": int(rng.choice(DIMS)), "normalize": bool(rng.random() < 0.75)})
    return out


def _embed(rt: Runtime, batch: list[dict]) -> list[np.ndarray]:
    r = rt.embed(*pack([c["ids"] for c in batch]),
                 np.asarray([c["dims"] for c in batch], dtype=np.int64),
                 np.asarray([c["normalize"] for c in batch]))
    return r.vectors


def _alone(rt: Runtime, cases: list[dict]) -> list[np.ndarray]:
    return [_embed(rt, [c])[0] for c in cases]


@pytest.mark.parametrize("precision", VARIANTS)
def test_alone_equals_inside_random_batches(bundles, cases, precision) -> None:
    """Every text alone vs inside PARTITIONS random batches of 2..14 texts; one partition
    with 24-token dense chunks and one with 3-row expert calls, so a text's rows also cross
    chunk and expert-piece boundaries that they never cross alone."""
    rt = Runtime(bundles[precision], threads=2)
    alone = _alone(rt, cases)
    rng = np.random.default_rng(VARIANTS.index(precision))
    pairs = []
    for p in range(PARTITIONS):
        rt.chunk_tokens, rt.expert_rows = (24 if p == 3 else 512), (3 if p == 4 else 1024)
        order = rng.permutation(len(cases))
        cuts = np.cumsum(rng.integers(2, 15, size=len(cases)))
        for members in np.split(order, cuts[cuts < len(cases)]):
            got = _embed(rt, [cases[i] for i in members])
            pairs += [(alone[i], v) for i, v in zip(members, got, strict=True)]
    n, same, worst = _verdict(pairs)
    assert n == PARTITIONS * len(cases)
    assert same == n, f"{precision}: {same} of {n} pairs bit-identical, worst cosine {worst:.6f}"


@pytest.mark.parametrize("precision", VARIANTS)
def test_expert_rows_ignore_loud_batch_mates(bundles, precision) -> None:
    """Each expert graph of the bundle, run as the runtime runs experts (run_expert_rows):
    rows alone vs beside rows 50x louder, vs one row at a time, and inside 129 rows (ORT
    computes a last block of one row apart). A per-call activation scale (one scale for the
    whole input) cannot pass this: the loud rows set it."""
    b = Bundle.load(bundles[precision])
    rng = np.random.default_rng(3)
    h = b.manifest.config.n_embd
    x = rng.standard_normal((5, h)).astype(np.float32)
    loud = 50 * rng.standard_normal((11, h)).astype(np.float32)
    many_rows = rng.standard_normal((124, h)).astype(np.float32)  # + 5 = 129 rows
    Runtime(b, threads=2)  # sizes the process's ONNX Runtime pool, which session_options shares
    for files in b.manifest.graphs.experts.values():
        for rel in files[:2]:
            sess = ort.InferenceSession(str(b.file(rel)), session_options(),
                                        providers=["CPUExecutionProvider"])
            ref = run_expert_rows(sess, x)
            mixed = run_expert_rows(sess, np.concatenate([loud[:6], x, loud[6:]]))
            singles = np.concatenate([run_expert_rows(sess, x[i:i + 1]) for i in range(5)])
            many = run_expert_rows(sess, np.concatenate([many_rows, x]))[-5:]
            moved = float(np.abs(mixed[6:11] - ref).max())
            assert np.array_equal(mixed[6:11], ref), (precision, rel, moved)
            assert np.array_equal(singles, ref), (precision, rel)
            assert np.array_equal(many, ref), (precision, rel)


_THREADS_SCRIPT = """
import json, sys
import numpy as np
from moe_embed.workers.runtime.runtime import Runtime, pack, run_expert_rows
cases = json.load(open(sys.argv[2]))
rt = Runtime(sys.argv[1], threads=int(sys.argv[3]))
r = rt.embed(*pack([c["ids"] for c in cases]), np.asarray([c["dims"] for c in cases]),
             np.asarray([c["normalize"] for c in cases]))
np.savez(sys.argv[4], *r.vectors)
"""


@pytest.mark.parametrize("precision", PRECISIONS)
def test_thread_count_does_not_change_a_vector(tiny_bundles, cases, precision, tmp_path) -> None:
    """A worker process with 1 thread, all texts in one batch, vs this process's 2-thread pool,
    each text alone (--threads-per-worker 1 vs 2)."""
    rt = Runtime(tiny_bundles[precision], threads=2)
    alone = _alone(rt, cases)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    out = tmp_path / "vectors.npz"
    subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(tiny_bundles[precision]),
                    str(tmp_path / "cases.json"), "1", str(out)], check=True, timeout=300)
    with np.load(out) as f:
        one_thread = [f[f"arr_{i}"] for i in range(len(cases))]
    n, same, worst = _verdict(list(zip(alone, one_thread, strict=True)))
    assert same == n, f"{precision}: {same} of {n} bit-identical, worst cosine {worst:.6f}"


_TASKS = {"search_query": pb.TASK_SEARCH_QUERY, "search_document": pb.TASK_SEARCH_DOCUMENT}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_service_with_two_workers_under_concurrent_load(tiny_bundles, cases, precision) -> None:
    """Eight clients at once, each request 1..5 texts of one task and one dimension setting: the
    service batches them with each other's texts as it likes; every vector must equal the text's
    in-process vector alone."""
    rt = Runtime(tiny_bundles[precision], threads=2)
    normalized = [dict(c, normalize=True) for c in cases]
    rng = np.random.default_rng(11)
    requests = []
    for task in _TASKS:
        mine = [i for i, c in enumerate(normalized) if c["task"] == task]
        for _ in range(3):
            order = rng.permutation(mine)
            cuts = np.cumsum(rng.integers(1, 6, size=len(order)))
            for members in np.split(order, cuts[cuts < len(order)]):
                requests.append((task, [int(i) for i in members], int(rng.choice(DIMS))))
    expected = {}
    for _, members, dims in requests:
        for i in members:
            if (i, dims) not in expected:
                expected[(i, dims)] = _embed(rt, [dict(normalized[i], dims=dims)])[0]
    server = ServerThread(tiny_bundles[precision], workers=2).start()
    try:
        def call(req: tuple[str, list[int], int]) -> np.ndarray:
            task, members, dims = req
            return vectors(server.stub().Embed(pb.EmbedRequest(
                inputs=[normalized[i]["text"] for i in members], task=_TASKS[task],
                dimensions=dims), timeout=120))

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(call, requests))
    finally:
        server.stop()
    pairs = [(expected[(i, dims)], v) for (_, members, dims), got in zip(requests, answers,
                                                                          strict=True)
             for i, v in zip(members, got, strict=True)]
    n, same, worst = _verdict(pairs)
    assert n == 3 * len(cases)
    assert same == n, f"{precision}: {same} of {n} bit-identical, worst cosine {worst:.6f}"
