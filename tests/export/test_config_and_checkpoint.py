"""Every config field or tensor we do not implement is refused with an error that names it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_embed.export.checkpoint import CheckpointError, load_checkpoint
from moe_embed.export.split import export_bundle
from moe_embed.export.synthetic import upstream_config
from moe_embed.workers.bundle.config import ConfigError, parse_config

REFUSALS = [
    ("prenorm", True),
    ("rotary_emb_interleaved", True),
    ("rotary_emb_fraction", 0.5),
    ("rotary_emb_scale_base", 512),
    ("rotary_scaling_factor", 2.0),
    ("expert_choice_router", True),
    ("num_shared_experts", 1),
    ("moe_normalize_expert_weights", True),
    ("activation_function", "gelu_new"),
    ("activation_function", "swiglu"),
    ("moe_act", "silu"),
    ("parallel_block", True),
    ("model_type", "bert"),
    ("moe_every_n_layers", 1),
    ("moe_top_k", 9),
    ("n_head", 5),
]


def test_full_and_tiny_configs_parse_to_the_real_layout():
    full = parse_config(upstream_config("full"))
    assert (full.n_embd, full.n_head, full.n_inner, full.n_layer) == (768, 12, 3072, 12)
    assert full.moe_layers == [1, 3, 5, 7, 9, 11]
    assert (full.num_experts, full.moe_top_k, full.vocab_size) == (8, 2, 250048)
    assert parse_config(upstream_config("tiny")).moe_layers == [1, 3]


@pytest.mark.parametrize(("field", "value"), REFUSALS, ids=[f"{f}={v}" for f, v in REFUSALS])
def test_unsupported_config_is_refused_naming_the_field(field, value):
    cfg = upstream_config("tiny")
    cfg[field] = value
    with pytest.raises(ConfigError, match=field):
        parse_config(cfg)


@pytest.mark.parametrize("field", ["n_embd", "num_experts", "moe_top_k", "vocab_size"])
def test_missing_required_field_is_refused(field):
    cfg = upstream_config("tiny")
    del cfg[field]
    with pytest.raises(ConfigError, match=field):
        parse_config(cfg)


def _copy(ckpt: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt, dst)
    return dst


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path)
    t = load_file(d / "model.safetensors")
    del t["encoder.layers.3.mlp.experts.bias"]
    save_file(t, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.3\.mlp\.experts\.bias"):
        load_checkpoint(str(d))


def test_misshaped_tensor_is_named(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path)
    t = load_file(d / "model.safetensors")
    w2 = t["encoder.layers.1.mlp.experts.mlp.w2"]
    t["encoder.layers.1.mlp.experts.mlp.w2"] = w2.reshape(8, 128, 64)  # [E,F,H] not [E*F,H]
    save_file(t, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.experts\.mlp\.w2.*shape"):
        load_checkpoint(str(d))


def test_config_refusal_comes_through_the_loader(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rotary_emb_interleaved"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="rotary_emb_interleaved"):
        load_checkpoint(str(d))


def test_sharded_checkpoint_with_prefixed_names_loads_identically(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path)
    t = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(t)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half],
              "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({"model." + k: t[k] for k in keys}, d / shard)
        weight_map.update({"model." + k: shard for k in keys})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ck = load_checkpoint(str(d))
    assert set(ck.tensors) == set(t)
    assert all(torch.equal(ck.tensors[k], t[k]) for k in t)


def test_pickled_weights_are_never_loaded(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="safetensors are required"):
        load_checkpoint(str(d))


def test_missing_tokenizer_is_refused(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path)
    (d / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_checkpoint(str(d))


def test_hub_id_offline_fails_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="Hugging Face hub"):
        export_bundle("nomic-ai/nomic-embed-text-v2-moe", tmp_path / "out")
    assert not (tmp_path / "out").exists()
