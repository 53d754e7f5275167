"""Synthetic checkpoint options (export/synthetic.py): outlier channels, weight scale, layer count.
Each option changes exactly what it says and leaves every other value of the checkpoint as the
default of the same seed has it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moe_embed.export.checkpoint import load_checkpoint
from moe_embed.export.synthetic import LAYER_NORM_WEIGHTS, outlier_dims, write_synthetic
from moe_embed.service.cli import main


@pytest.fixture(scope="module")
def default(tmp_path_factory) -> dict[str, torch.Tensor]:
    return load_file(write_synthetic(tmp_path_factory.mktemp("s") / "d", "tiny", seed=5)
                     / "model.safetensors")


def test_outlier_channels_scale_only_layer_norm_gains_on_those_dims(default, tmp_path) -> None:
    out = write_synthetic(tmp_path / "o", "tiny", seed=5, outlier_channels=3, outlier_gain=25.0)
    got = load_file(out / "model.safetensors")
    dims = outlier_dims(64, 3, 5)
    assert len(set(dims)) == 3 and dims != outlier_dims(64, 3, 6)
    norms = [n for n in got if n.endswith(LAYER_NORM_WEIGHTS)]
    assert len(norms) == 1 + 2 * 4  # emb_ln and both norms of the tiny model's 4 layers
    for name, t in got.items():
        if name in norms:
            others = [i for i in range(64) if i not in dims]
            assert torch.equal(t[dims], default[name][dims] * 25.0)
            assert torch.equal(t[others], default[name][others])
        else:
            assert torch.equal(t, default[name]), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["synthetic_options"]["outlier_dims"] == dims
    assert load_checkpoint(str(out)).config.n_embd == 64  # still the upstream format


def test_default_config_has_no_options_recorded(tmp_path) -> None:
    out = write_synthetic(tmp_path / "d", "tiny", seed=1, zero_expert_bias=True)
    assert "synthetic_options" not in json.loads((out / "config.json").read_text())


def test_weight_scale_scales_linear_weights_only(default, tmp_path) -> None:
    got = load_file(write_synthetic(tmp_path / "w", "tiny", seed=5, weight_scale=2.0)
                    / "model.safetensors")
    linear = ("Wqkv.weight", "out_proj.weight", "fc1.weight", "fc2.weight", "mlp.w1", "mlp.w2")
    for name, t in got.items():
        factor = 2.0 if name.endswith(linear) else 1.0
        assert torch.allclose(t, default[name] * factor, rtol=1e-6, atol=0), name


def test_layers_override_and_cli_flags(tmp_path) -> None:
    out = tmp_path / "c"
    assert main(["synthetic", "--size", "tiny", "--out", str(out), "--seed", "2", "--layers",
                 "2", "--outlier-channels", "2", "--outlier-gain", "40", "--weight-scale",
                 "0.5"]) == 0
    ck = load_checkpoint(str(out))
    assert ck.config.n_layer == 2 and ck.config.moe_layers == [1]
    opts = json.loads((out / "config.json").read_text())["synthetic_options"]
    assert opts == {"seed": 2, "weight_scale": 0.5, "outlier_dims": outlier_dims(64, 2, 2),
                    "outlier_gain": 40.0}
    gains = ck.tensors["emb_ln.weight"]
    assert gains[opts["outlier_dims"]].abs().min() > 10 * gains.abs().median()
