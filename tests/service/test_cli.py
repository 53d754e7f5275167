"""The `moe-embed` console script, run as a user runs it: synthetic -> export -> embed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_embed.service.local import LocalEmbedder

EXE = Path(sys.executable).parent / "moe-embed"


def run(*args: str, stdin: str | None = None, env: dict | None = None):
    return subprocess.run([str(EXE), *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def cli_bundle(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    r = run("synthetic", "--size", "tiny", "--out", str(d / "ckpt"), "--seed", "3")
    assert r.returncode == 0, r.stderr
    r = run("export", str(d / "ckpt"), "--out", str(d / "bundle"))
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stderr.splitlines()]
    progress = [e for e in events if e["event"] == "export.progress"]
    assert len(progress) == 3 + 16 + 1 and progress[-1]["percent"] == 100.0
    assert events[-1]["event"] == "export.done"
    return d / "bundle"


def test_embed_prints_json_equal_to_in_process(cli_bundle):
    r = run("embed", "--bundle", str(cli_bundle), "--task", "search_query",
            "tell me about embeddings", "嵌入很酷")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["dimensions"] == 64 and len(out["embeddings"]) == 2
    ref = LocalEmbedder(cli_bundle).embed(["tell me about embeddings", "嵌入很酷"], "search_query")
    assert out["tokens"] == ref.tokens
    assert np.abs(np.asarray(out["embeddings"]) - ref.vectors).max() <= 1e-6


def test_embed_reads_json_from_stdin_and_truncates_dimensions(cli_bundle):
    r = run("embed", "--bundle", str(cli_bundle), "--task", "none", "--dimensions", "16",
            "--input-json", "-", stdin=json.dumps(["a", "b", "c"]))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["dimensions"] == 16 and len(out["embeddings"]) == 3
    ref = LocalEmbedder(cli_bundle).embed(["a", "b", "c"], "none", dimensions=16)
    assert out["tokens"] == ref.tokens
    assert np.abs(np.asarray(out["embeddings"]) - ref.vectors).max() <= 1e-6


def test_embed_bad_dimensions_is_a_clear_error(cli_bundle):
    r = run("embed", "--bundle", str(cli_bundle), "--task", "none", "--dimensions", "9", "x")
    assert r.returncode == 2 and "dimensions" in r.stderr and "16..64" in r.stderr


def test_export_refusal_names_the_field(tmp_path, cli_bundle):
    ckpt = tmp_path / "ckpt"
    assert run("synthetic", "--out", str(ckpt)).returncode == 0
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["moe_normalize_expert_weights"] = True
    (ckpt / "config.json").write_text(json.dumps(cfg))
    r = run("export", str(ckpt), "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "moe_normalize_expert_weights" in r.stderr


def test_embed_without_bundle_builds_the_demo_model_once(tmp_path):
    env = {"MOE_EMBED_CACHE_DIR": str(tmp_path)}
    first = run("embed", "--task", "none", "hello", env=env)
    assert first.returncode == 0, first.stderr
    assert "demo.build" in first.stderr
    second = run("embed", "--task", "none", "hello", env=env)
    assert second.returncode == 0 and "demo.build" not in second.stderr
    assert json.loads(first.stdout) == json.loads(second.stdout)


def test_synthetic_zero_expert_bias_zeroes_only_that_tensor(tiny_checkpoint, tmp_path):
    """`--zero-expert-bias` (for llama.cpp comparisons) changes every mlp.experts.bias to zero
    and leaves every other tensor bit-identical to the default checkpoint of the same seed."""
    from safetensors.torch import load_file

    r = run("synthetic", "--out", str(tmp_path / "z"), "--zero-expert-bias")
    assert r.returncode == 0, r.stderr
    zero = load_file(tmp_path / "z" / "model.safetensors")
    default = load_file(tiny_checkpoint / "model.safetensors")
    assert set(zero) == set(default)
    biases = {k for k in default if k.endswith("mlp.experts.bias")}
    assert biases == {"encoder.layers.1.mlp.experts.bias", "encoder.layers.3.mlp.experts.bias"}
    for k in biases:
        assert default[k].abs().min() > 0 and not zero[k].any(), k
    changed = {k for k in default if not (zero[k] == default[k]).all()}
    assert changed == biases
    assert ((tmp_path / "z" / "config.json").read_text()
            == (tiny_checkpoint / "config.json").read_text())


def test_help_names_the_synthetic_sizes_without_importing_them():
    from moe_embed.export import commands, synthetic

    assert sorted(commands.SIZES) == sorted(synthetic.SIZES)
