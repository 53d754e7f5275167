"""The bundle manifest: versions, hashes, and refusal of anything tampered with."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from moe_embed.workers.bundle.format import FORMAT_VERSION, Bundle, BundleError, Manifest
from moe_embed.workers.runtime.runtime import Runtime


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    return dst


def test_manifest_lists_every_graph_with_its_sha256(tiny_bundle):
    b = Bundle.load(tiny_bundle)
    m = b.manifest
    assert m.format_version == FORMAT_VERSION and m.precision == "fp32"
    assert m.source["kind"] == "local" and m.model_id == "synthetic-tiny"
    assert m.config.n_embd == 64 and (m.dimensions.min, m.dimensions.max) == (16, 64)
    assert len(m.graphs.segments) == 3  # cut at MoE layers 1 and 3
    assert {k: len(v) for k, v in m.graphs.experts.items()} == {1: 8, 3: 8}
    for rel, entry in m.files.items():
        assert hashlib.sha256((tiny_bundle / rel).read_bytes()).hexdigest() == entry.sha256
    on_disk = {p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*")
               if p.is_file()} - {"manifest.json"}
    assert on_disk == set(m.files)
    raw = json.loads((tiny_bundle / "manifest.json").read_text())
    assert Manifest.from_json(raw, tiny_bundle).to_json() == raw  # typed round trip


def test_tampered_graph_is_refused(bundle_copy):
    f = bundle_copy / "experts/layer_03/expert_5.onnx"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="expert_5.onnx.*sha256"):
        Runtime(bundle_copy)


def test_tampered_weights_file_is_refused(bundle_copy):
    f = bundle_copy / "segments/segment_00.onnx.data"  # the graph's initializers
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="segment_00.onnx.data.*sha256"):
        Runtime(bundle_copy)


def test_the_runtime_maps_the_weights_from_the_bundle_instead_of_copying_them(tiny_bundle):
    """Initializers are stored beside each graph at page-aligned offsets, so ONNX Runtime maps
    them: the embedding table is never read into fresh memory at start, and every process
    that maps the file shares its pages."""
    import onnx

    seg0 = tiny_bundle / Bundle.load(tiny_bundle).manifest.graphs.segments[0].file
    graph = onnx.load(str(seg0), load_external_data=False)
    table = max(graph.graph.initializer, key=lambda t: t.dims[0] * t.dims[-1] if t.dims else 0)
    assert table.data_location == onnx.TensorProto.EXTERNAL, table.name
    offsets = [int(e.value) for t in graph.graph.initializer for e in t.external_data
               if e.key == "offset"]
    assert offsets and all(o % 4096 == 0 for o in offsets), offsets  # what ORT maps
    runtime = Runtime(tiny_bundle)
    with open("/proc/self/maps") as maps:
        mapped = {line.split()[5] for line in maps if len(line.split()) >= 6}
    del runtime
    assert str(seg0) + ".data" in mapped, sorted(m for m in mapped if str(tiny_bundle) in m)


def test_weights_are_saved_page_aligned_and_read_back_exactly(tmp_path):
    """_save on a graph whose weights are not multiples of a page: each one starts on a page
    boundary of the data file (what lets ORT map it), and ORT computes with the same values."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from moe_embed.export.split import _save
    from moe_embed.workers.runtime.sessions import create_session

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((25, 30)).astype(np.float32)  # 3000 bytes
    w2 = rng.standard_normal((30, 41)).astype(np.float32)  # 4920 bytes
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"],
                                                                          ["y"])],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 25])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 41])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    path = tmp_path / "g.onnx"
    assert _save(helper.make_model(graph), path) == ["g.onnx", "g.onnx.data"]
    saved = onnx.load(str(path), load_external_data=False)
    offsets = [int(e.value) for t in saved.graph.initializer for e in t.external_data
               if e.key == "offset"]
    assert len(offsets) == 2 and all(o % 4096 == 0 for o in offsets), offsets
    x = rng.standard_normal((3, 25)).astype(np.float32)
    (y,) = create_session(path).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ w1 @ w2, rtol=1e-5, atol=1e-5)


def test_tampered_router_weights_are_refused(bundle_copy):
    f = bundle_copy / "router.safetensors"
    f.write_bytes(f.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(BundleError, match="router.safetensors"):
        Bundle.load(bundle_copy)


def test_missing_file_is_refused(bundle_copy):
    (bundle_copy / "segments/segment_01.onnx").unlink()
    with pytest.raises(BundleError, match="segment_01.onnx.*missing"):
        Bundle.load(bundle_copy)


def test_unknown_format_version_is_refused(bundle_copy):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["format_version"] = FORMAT_VERSION + 1
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format_version"):
        Bundle.load(bundle_copy)


def test_malformed_manifest_is_refused(bundle_copy):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    del m["graphs"]
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="malformed manifest"):
        Bundle.load(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="manifest.json"):
        Bundle.load(tmp_path)


@pytest.mark.parametrize(("named", "expected"), [
    ("nomic-ai/nomic-embed-text-v2-moe", "nomic-ai/nomic-embed-text-v2-moe"),  # a hub id
    ("/home/me/models/nomic", "my-checkpoint"),  # a local path: the folder name
    (None, "my-checkpoint"),
])
def test_model_id_is_the_hub_id_the_config_names_else_the_folder(tiny_checkpoint, tmp_path,
                                                                 named, expected):
    from moe_embed.export.split import export_bundle

    ck = tmp_path / "my-checkpoint"
    shutil.copytree(tiny_checkpoint, ck)
    config = json.loads((ck / "config.json").read_text())
    config.pop("synthetic")
    if named is not None:
        config["_name_or_path"] = named
    (ck / "config.json").write_text(json.dumps(config))
    assert Bundle.load(export_bundle(str(ck), tmp_path / "b")).manifest.model_id == expected
