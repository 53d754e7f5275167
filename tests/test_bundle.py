"""The bundle manifest: versions, hashes, and refusal of anything tampered with."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from moe_embed.export.bundle import FORMAT_VERSION, Bundle, BundleError, Manifest
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
