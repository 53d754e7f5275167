"""The bundle manifest (workers/bundle/format.py) on a bundle written here by hand: what is
recorded, what round-trips, and each refusal (wrong format or version, malformed, precision
and recipe that disagree, a file missing, resized or changed) naming what is wrong. No graph is
run, so no ONNX import: the manifest check is what stands between a tampered file and a
session."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from moe_embed.workers.bundle.config import ModelConfig
from moe_embed.workers.bundle.format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    Bundle,
    BundleError,
    DimensionRange,
    Graphs,
    Manifest,
    SegmentEntry,
    sha256_file,
    write_manifest,
)
from moe_embed.workers.bundle.recipes import RECIPES, TensorStorage

CONFIG = ModelConfig(vocab_size=100, n_embd=8, n_head=2, n_inner=16, n_layer=4, num_experts=2,
                     moe_top_k=1, moe_every_n_layers=2)
FILES = {"segments/s0.onnx": b"segment zero" * 50, "segments/s1.onnx": b"one",
         "segments/s2.onnx": b"segment two" * 3, "experts/l1_e0.onnx": b"e10" * 7,
         "experts/l1_e1.onnx": b"e11" * 9, "experts/l3_e0.onnx": b"e30",
         "experts/l3_e1.onnx": b"e31" * 2, "router.safetensors": b"\0router" * 11,
         "tokenizer.json": b'{"model": {}}'}
GRAPHS = Graphs(
    segments=(SegmentEntry("segments/s0.onnx", None, (0,), 1, True),
              SegmentEntry("segments/s1.onnx", 1, (2,), 3, True),
              SegmentEntry("segments/s2.onnx", 3, (), None, False)),
    experts={1: ("experts/l1_e0.onnx", "experts/l1_e1.onnx"),
             3: ("experts/l3_e0.onnx", "experts/l3_e1.onnx")},
    router="router.safetensors")


def _manifest(**change: object) -> Manifest:
    m = Manifest(model_id="test/tiny", source={"kind": "local", "path": "/ckpt"},
                 created="2026-01-01T00:00:00Z", precision="fp32", moe_mode="routed",
                 config=CONFIG, max_tokens=512, dimensions=DimensionRange(4, 8),
                 tokenizer="tokenizer.json", graphs=GRAPHS, exporter={"version": "t"})
    return replace(m, **change)


def _write(directory: Path, manifest: Manifest | None = None) -> Path:
    for rel, data in FILES.items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(data)
    write_manifest(directory, manifest or _manifest(), list(FILES))
    return directory


def _int8(**change: object) -> Manifest:
    tensors = (TensorStorage("w1", (8, 16), "int8-rowwise", 200, "expert.w1", 1,
                             "experts/l1_e0.onnx"),
               TensorStorage("w2", (16, 8), "int8-rowwise", 150, "expert.w2", 1,
                             "experts/l1_e0.onnx"),
               TensorStorage("qkv", (8, 24), "nbits8-block32", 300, "attn.qkv", 0,
                             "segments/s0.onnx"),
               TensorStorage("ids", (2,), "int64", 16, None, None, "segments/s0.onnx"))
    return _manifest(precision="int8", recipe=RECIPES["int8"], tensors=tensors, **change)


def _raw(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text())


def _rewrite(directory: Path, raw: object) -> None:
    (directory / MANIFEST).write_text(json.dumps(raw))


def test_sha256_of_a_file_read_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = bytes(range(256)) * 41
    path.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == sha256_file(path, chunk=7) == sha256_file(path, chunk=1) == want


def test_write_manifest_records_every_file_and_load_reads_it_back(tmp_path: Path) -> None:
    path = write_manifest(_write(tmp_path), _manifest(), list(FILES))
    assert path == tmp_path / MANIFEST
    raw = _raw(tmp_path)
    assert raw["format"] == FORMAT == "moe-embed-bundle"
    assert raw["format_version"] == FORMAT_VERSION == 2
    assert list(raw["files"]) == sorted(FILES)
    for rel, data in FILES.items():
        assert raw["files"][rel] == {"sha256": hashlib.sha256(data).hexdigest(),
                                     "bytes": len(data)}
    assert "recipe" not in raw and "tensors" not in raw  # an fp32 bundle of format 2
    b = Bundle.load(tmp_path)
    assert b.path == tmp_path
    assert b.digest == hashlib.sha256((tmp_path / MANIFEST).read_bytes()).hexdigest()
    assert b.manifest == replace(_manifest(), files=b.manifest.files)
    assert b.config == CONFIG and b.manifest.graphs == GRAPHS
    assert b.manifest.to_json() == raw  # typed round trip, key for key
    assert b.file("router.safetensors") == tmp_path / "router.safetensors"
    with pytest.raises(BundleError, match="'nope.onnx' is not listed in the manifest"):
        b.file("nope.onnx")


def test_graphs_round_trip_routed_and_all_experts() -> None:
    d = GRAPHS.to_json()
    assert d["segments"][1] == {"file": "segments/s1.onnx", "moe_residual": 1,
                                "full_layers": [2], "attn_layer": 3, "needs_mask": True}
    assert d["experts"] == {"1": ["experts/l1_e0.onnx", "experts/l1_e1.onnx"],
                            "3": ["experts/l3_e0.onnx", "experts/l3_e1.onnx"]}
    assert d["router"] == "router.safetensors"
    back = Graphs.from_json(json.loads(json.dumps(d)))
    assert back == GRAPHS and back.model is None
    single = Graphs(model="model.onnx")
    assert single.to_json() == {"model": "model.onnx"}
    assert Graphs.from_json({"model": "model.onnx"}) == single


def test_a_quantized_manifest_records_its_recipe_and_tensors(tmp_path: Path) -> None:
    m = _int8()
    _write(tmp_path, m)
    raw = _raw(tmp_path)
    assert raw["recipe"] == RECIPES["int8"].to_dict()
    assert raw["tensors"][0] == {"name": "w1", "shape": [8, 16], "format": "int8-rowwise",
                                 "bytes": 200, "role": "expert.w1", "layer": 1,
                                 "file": "experts/l1_e0.onnx"}
    loaded = Bundle.load(tmp_path).manifest
    assert loaded.recipe == RECIPES["int8"] and loaded.tensors == m.tensors
    assert loaded.to_json() == raw
    assert loaded.stored_bytes() == {"int8-rowwise": 350, "nbits8-block32": 300, "int64": 16}
    assert _manifest().stored_bytes() == {}


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(format="onnx-bundle"), "'format' is 'onnx-bundle', not 'moe-embed-bundle'"),
    (lambda d: d.pop("format"), "'format' is None"),
    (lambda d: d.update(format_version=FORMAT_VERSION + 1),
     f"format_version {FORMAT_VERSION + 1} is not supported"),
    (lambda d: d.update(format_version=FORMAT_VERSION - 1), "format_version 1 is not supported"),
    (lambda d: d.pop("format_version"), "format_version None"),
    (lambda d: d.pop("graphs"), "malformed manifest.*'graphs'"),
    (lambda d: d.pop("files"), "malformed manifest"),
    (lambda d: d["dimensions"].update(step=2), "malformed manifest.*TypeError"),
    (lambda d: d["graphs"]["segments"][0].pop("needs_mask"), "malformed manifest"),
    (lambda d: d["files"]["tokenizer.json"].pop("bytes"), "malformed manifest"),
    (lambda d: d.update(precision="int3"), "precision 'int3' is not one this build serves "
                                           r"\(fp32, int8, int4\)"),
    (lambda d: d.update(precision="int8"), "a int8 bundle must record its recipe"),
])
def test_a_bad_manifest_is_refused_naming_what(tmp_path: Path, change, message: str) -> None:
    _write(tmp_path)
    raw = _raw(tmp_path)
    change(raw)
    _rewrite(tmp_path, raw)
    with pytest.raises(BundleError, match=message) as exc:
        Bundle.load(tmp_path)
    assert str(tmp_path / MANIFEST) in str(exc.value)


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(precision="int4"), "precision 'int4' but recipe 'int8'"),
    (lambda d: d.update(precision="fp32"), "precision 'fp32' but recipe 'int8'"),
    (lambda d: d.update(recipe=RECIPES["int4"].to_dict()), "precision 'int8' but recipe 'int4'"),
    (lambda d: d["recipe"]["formats"].update({"mlp.fc1": "int9"}),
     "malformed manifest.*unknown storage format"),
    (lambda d: d["recipe"].pop("name"), "malformed manifest"),
    (lambda d: d.pop("tensors"), "malformed manifest"),
    (lambda d: d["tensors"][0].update(shape=8), "malformed manifest.*not a tensor storage"),
    (lambda d: d["tensors"][1].update(file="experts/gone.onnx"),
     r"tensor records name files the manifest does not list: \['experts/gone.onnx'\]"),
])
def test_a_bad_quantized_manifest_is_refused_naming_what(tmp_path: Path, change,
                                                         message: str) -> None:
    _write(tmp_path, _int8())
    raw = _raw(tmp_path)
    change(raw)
    _rewrite(tmp_path, raw)
    with pytest.raises(BundleError, match=message):
        Bundle.load(tmp_path)


def test_a_manifest_that_is_not_a_json_object_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=f"{tmp_path}: not a bundle \\(manifest.json not found"):
        Bundle.load(tmp_path)
    (tmp_path / MANIFEST).mkdir()
    with pytest.raises(BundleError, match="not a bundle"):
        Bundle.load(tmp_path)
    (tmp_path / MANIFEST).rmdir()
    (tmp_path / MANIFEST).write_text('{"format": ')
    with pytest.raises(BundleError, match="manifest.json: not valid JSON"):
        Bundle.load(tmp_path)
    _rewrite(tmp_path, ["moe-embed-bundle"])
    with pytest.raises(BundleError, match="manifest.json: not a JSON object"):
        Bundle.load(tmp_path)


@pytest.mark.parametrize("threads", [None, 1, 3])
def test_every_listed_file_is_checked_before_use(tmp_path: Path, threads: int | None) -> None:
    """Missing, resized, or changed in place at the same size: each refused, naming the file;
    load(verify=False) reads the manifest only."""
    b = Bundle.load(_write(tmp_path))
    b.verify(threads)
    for rel in FILES:  # every file, the largest and the smallest included
        path = tmp_path / rel
        data = path.read_bytes()
        path.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size, other bytes
        with pytest.raises(BundleError, match=f"file '{rel}' does not match its sha256"):
            b.verify(threads)
        path.write_bytes(data + b"\0")
        with pytest.raises(BundleError, match=f"file '{rel}' does not match its sha256"):
            b.verify(threads)
        path.unlink()
        with pytest.raises(BundleError, match=f"file '{rel}' listed in the manifest is missing"):
            b.verify(threads)
        assert Bundle.load(tmp_path, verify=False).manifest == b.manifest
        with pytest.raises(BundleError, match=rel):
            Bundle.load(tmp_path)
        path.write_bytes(data)
        b.verify(threads)


def test_a_loaded_manifest_cannot_be_changed_in_place(tmp_path: Path) -> None:
    """Every reader shares the one typed manifest: none of its parts can be altered."""
    m = Bundle.load(_write(tmp_path)).manifest
    entry = m.files["router.safetensors"]
    for obj, name, value in ((m, "precision", "int8"), (entry, "sha256", "0" * 64),
                             (m.graphs, "router", "other"), (m.graphs.segments[0], "file", "x"),
                             (m.dimensions, "min", 1)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, value)
