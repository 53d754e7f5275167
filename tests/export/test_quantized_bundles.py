"""Quantized bundles as a product: `export --precision`, the manifest's records, serving over
gRPC, refusal of corrupted files, and export from an fp32 bundle.

The tiny synthetic model (hidden 64) is exported at every precision once per session
(conftest.py: `tiny_bundles`). Quality thresholds are cosine to the fp32 PyTorch reference over
the multilingual texts; measured on this model (seed 0, ORT 1.32, AVX-512 VNNI/AMX machine):
int8 min 0.99890, int4 min 0.99569 (24 texts, search_query, one text per call). The thresholds
leave about 4x that distance to 1 as margin: a recipe or kernel change that doubles the error
still passes, a broken layout (wrong block order, dropped zero points, a mis-wired op) does not.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import requests

from moe_embed.export.commands import PRECISIONS
from moe_embed.export.quantize import RECIPES, Recipe, RecipeError
from moe_embed.export.reference import pad_batch
from moe_embed.export.split import export_bundle
from moe_embed.service.local import LocalEmbedder
from moe_embed.service.tasks import task_named
from moe_embed.testing.service import ServerThread, free_port, vectors
from moe_embed.v1 import embedder_pb2 as pb
from moe_embed.workers.bundle.format import Bundle, BundleError, Manifest
from moe_embed.workers.runtime.runtime import Runtime

MIN_COS = {"fp32": 0.99999, "int8": 0.995, "int4": 0.98}
QUANTIZED = ("int8", "int4")


def _reference_vectors(reference, ids: list[list[int]]) -> np.ndarray:
    out = []
    for x in ids:  # one text per forward: the reference's own answer for that text
        input_ids, mask = pad_batch([x])
        out.append(reference.embed(input_ids, mask)[0].numpy())
    return np.stack(out)


@pytest.fixture(scope="module")
def reference_query_vectors(reference, tiny_bundle, multilingual_texts) -> np.ndarray:
    tok = LocalEmbedder(tiny_bundle, threads=2).tokenizer
    ids = [x.tolist() for x in tok.encode(multilingual_texts, task_named("search_query"))]
    return _reference_vectors(reference, ids)


def _graph_files(m: Manifest) -> set[str]:
    return {s.file for s in m.graphs.segments} | {f for fs in m.graphs.experts.values()
                                                  for f in fs}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_manifest_records_precision_recipe_and_every_tensor(tiny_bundles, precision) -> None:
    path = tiny_bundles[precision]
    b = Bundle.load(path)
    m = b.manifest
    recipe = RECIPES[precision]
    assert m.precision == precision and m.recipe == recipe
    raw = json.loads((path / "manifest.json").read_text())
    assert raw["recipe"] == recipe.to_dict() and len(raw["tensors"]) == len(m.tensors)
    assert Manifest.from_json(raw, path).to_json() == raw  # typed round trip, exact

    graphs = _graph_files(m)
    assert {t.file for t in m.tensors} == graphs  # every graph described, nothing else
    weights = [t for t in m.tensors if t.role]
    assert {t.role for t in weights} == set(recipe.formats)
    for t in weights:
        assert t.format == recipe.format_for(t.role, t.layer), t
    # expert weights carry their MoE layer, dense ones the layer their name says
    assert {t.layer for t in weights if t.role.startswith("expert.")} == set(m.config.moe_layers)
    assert all(f"layers.{t.layer}." in t.name for t in weights if t.role.startswith(("attn",
                                                                                     "mlp")))
    # the recorded bytes are what a graph's files hold (the graph and the weights beside it),
    # less the graph structure and the alignment of the weights
    def graph_bytes(rel: str) -> int:
        data = m.files.get(rel + ".data")
        return m.files[rel].bytes + (data.bytes if data else 0)

    for rel in graphs:
        recorded = sum(t.bytes for t in m.tensors if t.file == rel)
        size = graph_bytes(rel)
        assert 0.5 * size < recorded <= size, (rel, recorded, size)
    total = sum(t.bytes for t in m.tensors)
    assert total >= 0.95 * sum(graph_bytes(f) for f in graphs)
    assert m.stored_bytes() and sum(m.stored_bytes().values()) == total


def test_quantized_bundles_are_smaller(tiny_bundles) -> None:
    size = {p: sum(e.bytes for e in Bundle.load(tiny_bundles[p]).manifest.files.values())
            for p in PRECISIONS}
    table = {p: next(t.bytes for t in Bundle.load(tiny_bundles[p]).manifest.tensors
                     if t.role == "word_embeddings") for p in PRECISIONS}
    assert size["fp32"] > 2 * size["int8"] > 2 * 1.15 * size["int4"], size
    # bits per value: fp32 32; int8's table (8-bit, block 256, fp32 scale + zero point) ~8.2;
    # int4's (4-bit, block 32, fp32 scale + 4-bit zero point) ~5.1, plus any outlier columns
    assert table["fp32"] > 3.5 * table["int8"] > 3.5 * 1.5 * table["int4"], table


@pytest.mark.parametrize("precision", QUANTIZED)
def test_served_end_to_end_over_grpc(tiny_bundles, reference_query_vectors, multilingual_texts,
                                     precision) -> None:
    path = tiny_bundles[precision]
    server = ServerThread(path, workers=1, http_port=free_port()).start()
    try:
        stub = server.stub()
        info = stub.Info(pb.InfoRequest())
        assert (info.precision, info.bundle_hash) == (precision, Bundle.load(path).digest)
        card = requests.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]
        assert card["precision"] == precision
        got = np.concatenate([vectors(stub.Embed(pb.EmbedRequest(
            inputs=[t], task=pb.TASK_SEARCH_QUERY))) for t in multilingual_texts])
        short = vectors(stub.Embed(pb.EmbedRequest(inputs=multilingual_texts[:3],
                                                   task=pb.TASK_SEARCH_QUERY, dimensions=16)))
    finally:
        server.stop()
    cos = (got * reference_query_vectors).sum(axis=1)
    assert cos.min() >= MIN_COS[precision], (precision, cos.min())
    assert cos.min() < 0.999999  # really quantized: not the fp32 graphs under another name
    assert short.shape == (3, 16) and np.allclose(np.linalg.norm(short, axis=1), 1, atol=1e-5)


def test_fp32_bundle_still_equals_the_reference(tiny_bundles, reference_query_vectors,
                                                multilingual_texts) -> None:
    emb = LocalEmbedder(tiny_bundles["fp32"], threads=2)
    got = np.stack(emb.embed(multilingual_texts, "search_query").vectors)
    assert ((got * reference_query_vectors).sum(axis=1)).min() >= MIN_COS["fp32"]


@pytest.mark.parametrize("rel", ["segments/segment_00.onnx", "experts/layer_01/expert_3.onnx"])
def test_corrupted_quantized_file_is_refused(tiny_bundles, tmp_path, rel) -> None:
    path = tmp_path / "b"
    shutil.copytree(tiny_bundles["int4"], path)
    f = path / rel
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside the quantized weights
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{rel}.*sha256"):
        Bundle.load(path)
    with pytest.raises(BundleError, match=f"{rel}.*sha256"):
        Runtime(path)


@pytest.mark.parametrize("precision", QUANTIZED)
def test_export_from_fp32_bundle_equals_export_from_checkpoint(tiny_bundles, tiny_bundle,
                                                               tmp_path, multilingual_texts,
                                                               precision) -> None:
    from_bundle = export_bundle(tiny_bundle, tmp_path / precision, precision=precision)
    a, b = Bundle.load(tiny_bundles[precision]).manifest, Bundle.load(from_bundle).manifest
    assert b.tensors == a.tensors and b.recipe == a.recipe and b.graphs == a.graphs
    assert (b.model_id, b.source, b.config, b.dimensions) == (a.model_id, a.source, a.config,
                                                              a.dimensions)
    assert b.files == a.files  # byte for byte the same graphs, router, tokenizer and config
    assert b.exporter["from_bundle"]["manifest_sha256"] == Bundle.load(tiny_bundle).digest
    texts = multilingual_texts[:6]
    va = LocalEmbedder(tiny_bundles[precision], threads=2).embed(texts, "search_document")
    vb = LocalEmbedder(from_bundle, threads=2).embed(texts, "search_document")
    assert np.array_equal(np.stack(va.vectors), np.stack(vb.vectors))


def test_export_refusals(tiny_bundles, tiny_all_experts_bundle, tiny_checkpoint,
                         tmp_path) -> None:
    with pytest.raises(BundleError, match="already quantized \\(int8\\)"):
        export_bundle(tiny_bundles["int8"], tmp_path / "x", precision="int4")
    with pytest.raises(BundleError, match="all-experts bundle cannot be re-exported"):
        export_bundle(tiny_all_experts_bundle, tmp_path / "x", precision="int8")
    with pytest.raises(BundleError, match="exported from the checkpoint"):
        export_bundle(tiny_bundles["fp32"], tmp_path / "x", moe_mode="all-experts")
    with pytest.raises(ValueError, match="all-experts .* fp32 only"):
        export_bundle(str(tiny_checkpoint), tmp_path / "x", moe_mode="all-experts",
                      precision="int8")
    with pytest.raises(RecipeError, match="precision must be one of"):
        export_bundle(str(tiny_checkpoint), tmp_path / "x", precision="int3")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_cli_precision_flag(tiny_bundles, tmp_path, capsys) -> None:
    from moe_embed.service.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["export", str(tiny_bundles["fp32"]), "--out", str(tmp_path / "a"),
              "--moe-mode", "all-experts", "--precision", "int8"])
    assert exc.value.code == 2 and "fp32 only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(tiny_bundles["fp32"]), "--out", str(tmp_path / "a"),
              "--precision", "int2"])
    assert "invalid choice: 'int2'" in capsys.readouterr().err
    assert main(["export", str(tiny_bundles["int8"]), "--out", str(tmp_path / "a"),
                 "--precision", "int4"]) == 2
    assert "already quantized" in capsys.readouterr().err


@pytest.fixture
def fp32_copy(tiny_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    return dst


def _rewrite(path, change) -> None:
    m = json.loads((path / "manifest.json").read_text())
    change(m)
    (path / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")


def test_format_2_fp32_bundle_without_records_still_loads(fp32_copy, tiny_bundle,
                                                          multilingual_texts) -> None:
    """Bundles written before quantization existed have no recipe and no tensor records."""
    _rewrite(fp32_copy, lambda m: (m.pop("recipe"), m.pop("tensors")))
    b = Bundle.load(fp32_copy)
    assert b.manifest.precision == "fp32" and b.manifest.recipe is None
    assert b.manifest.tensors == () and b.manifest.stored_bytes() == {}
    raw = json.loads((fp32_copy / "manifest.json").read_text())
    assert Manifest.from_json(raw, fp32_copy).to_json() == raw
    texts = multilingual_texts[:4]
    old = LocalEmbedder(fp32_copy, threads=2).embed(texts, "none").vectors
    new = LocalEmbedder(tiny_bundle, threads=2).embed(texts, "none").vectors
    assert np.array_equal(np.stack(old), np.stack(new))


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m.update(precision="int3"), "precision 'int3' is not one this build serves"),
    (lambda m: (m.update(precision="int8"), m.pop("recipe"), m.pop("tensors")),
     "int8 bundle must record its recipe"),
    (lambda m: m.update(precision="int8"), "precision 'int8' but recipe 'fp32'"),
    (lambda m: m["tensors"][0].update(file="segments/segment_99.onnx"),
     "tensor records name files the manifest does not list"),
    (lambda m: m["recipe"]["formats"].pop("mlp.fc1"), "malformed manifest"),
    (lambda m: m["tensors"][0].pop("shape"), "malformed manifest"),
    (lambda m: m.pop("tensors"), "malformed manifest"),
])
def test_inconsistent_precision_records_are_refused(fp32_copy, change, message) -> None:
    _rewrite(fp32_copy, change)
    with pytest.raises(BundleError, match=message):
        Bundle.load(fp32_copy)


@pytest.mark.parametrize("recipe", [
    # every MatMul weight int8-rowwise
    Recipe("int8", {r: "int8-rowwise" for r in RECIPES["int8"].formats}
           | {"word_embeddings": "nbits8-block128"}).validate(),
    # the shipped ones: qkv and fc1 on 8-bit blocks (int8), the experts' w1 on 4-bit blocks (int4)
    RECIPES["int8"], RECIPES["int4"]], ids=["all-rowwise", "int8", "int4"])
def test_outlier_channels_stay_fp32_in_every_graph_that_reads_them(tmp_path, multilingual_texts,
                                                                   recipe: Recipe) -> None:
    """A checkpoint with outlier channels (LayerNorm gains x30 on 2 dims): the export keeps
    them in fp32 in every int8-rowwise or MatMulNBits MatMul that reads a LayerNorm's output,
    the experts included (their LayerNorm is in a segment graph, handed over by the exporter),
    and vectors stay batch-invariant."""
    import onnx

    from moe_embed.export.synthetic import write_synthetic
    from moe_embed.workers.runtime.runtime import pack

    ckpt = write_synthetic(tmp_path / "ckpt", "tiny", seed=3, outlier_channels=2)
    path = export_bundle(str(ckpt), tmp_path / recipe.name, precision=recipe.name, recipe=recipe)
    m = Bundle.load(path).manifest
    split = {}
    for rel in sorted(_graph_files(m)):
        names = {t.name for t in onnx.load(str(path / rel), load_external_data=False)
                 .graph.initializer}
        split[rel] = sorted(n.removesuffix(".T_outlier_index")
                            for n in names if n.endswith("_outlier_index"))
    experts = [r for r in split if r.startswith("experts/")]
    assert experts and all(split[r] == ["w1"] for r in experts), split
    ln_inputs = [f"encoder.layers.{i}.{r}.weight" for i in range(4)
                 for r in ("attn.Wqkv", "mlp.fc1")
                 if r != "mlp.fc1" or i not in m.config.moe_layers]
    assert sorted(n for r in split if r.startswith("segments/") for n in split[r]) == \
        sorted(ln_inputs)
    rt = Runtime(path, threads=2)
    tok = LocalEmbedder(path, threads=2).tokenizer
    ids = [x.tolist() for x in tok.encode(multilingual_texts[:8], task_named("search_query"))]
    together = rt.embed(*pack(ids)).vectors
    assert all(np.array_equal(rt.embed(*pack([x])).vectors[0], v)
               for x, v in zip(ids, together, strict=True))


def test_an_int4_table_keeps_its_outlier_columns_in_the_exported_segment(tmp_path,
                                                                         multilingual_texts
                                                                         ) -> None:
    """The exporter's own segment 0 (Gather + token-type row -> LayerNorm with gains x30 on 2
    dims): the int4 bundle holds those 2 columns in fp16 beside the 4-bit table, an int4 bundle
    of a checkpoint without outliers holds none, and the vectors stay batch-invariant."""
    import onnx

    from moe_embed.export.synthetic import outlier_dims, write_synthetic
    from moe_embed.workers.runtime.runtime import pack

    for outliers in (2, 0):
        ckpt = write_synthetic(tmp_path / f"ckpt{outliers}", "tiny", seed=3,
                               outlier_channels=outliers)
        path = export_bundle(str(ckpt), tmp_path / f"int4-{outliers}", precision="int4")
        m = Bundle.load(path).manifest
        seg0 = next(r for r in sorted(_graph_files(m)) if r.startswith("segments/"))
        inits = {t.name: t for t in onnx.load(str(path / seg0)).graph.initializer}
        columns = inits.get("word_embeddings_outlier_columns")
        if not outliers:
            assert columns is None
            continue
        hidden = m.config.n_embd
        assert columns is not None and list(columns.dims) == [m.config.vocab_size, 2]
        assert columns.data_type == onnx.TensorProto.FLOAT16
        onehot = onnx.numpy_helper.to_array(inits["word_embeddings_outlier_onehot"])
        assert np.flatnonzero(onehot.sum(axis=0)).tolist() == outlier_dims(hidden, 2, 3)
    rt = Runtime(tmp_path / "int4-2", threads=2)
    tok = LocalEmbedder(tmp_path / "int4-2", threads=2).tokenizer
    ids = [x.tolist() for x in tok.encode(multilingual_texts[:8], task_named("search_query"))]
    together = rt.embed(*pack(ids)).vectors
    assert all(np.array_equal(rt.embed(*pack([x])).vectors[0], v)
               for x, v in zip(ids, together, strict=True))
