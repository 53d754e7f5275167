"""The checkpoint's config.json check (workers/bundle/config.py): every field the forward pass
depends on is taken at its limit and refused one past it, naming the field; every field we do
not implement is refused unless it holds the value we do implement."""

from __future__ import annotations

import dataclasses
import json

import pytest

from moe_embed.workers.bundle.config import (
    ConfigError,
    ModelConfig,
    expected_shapes,
    parse_config,
)

# the upstream nomic-embed-text-v2-moe config.json, shape fields shrunk
UPSTREAM = {
    "architectures": ["NomicBertModel"], "model_type": "nomic_bert",
    "activation_function": "gelu", "vocab_size": 250048, "pad_vocab_size_multiple": 64,
    "type_vocab_size": 1, "n_positions": 2048, "max_trained_positions": 2048,
    "n_embd": 64, "n_head": 4, "n_inner": 128, "n_layer": 4, "layer_norm_epsilon": 1e-5,
    "prenorm": False, "parallel_block": False, "causal": False, "qkv_proj_bias": True,
    "mlp_fc1_bias": True, "mlp_fc2_bias": True, "rotary_emb_base": 10000,
    "rotary_emb_fraction": 1.0, "rotary_emb_interleaved": False, "rotary_emb_scale_base": None,
    "rotary_scaling_factor": None, "scale_attn_weights": True, "num_experts": 8, "moe_top_k": 2,
    "moe_every_n_layers": 2, "moe_normalize_expert_weights": False, "moe_impl": "megablocks",
    "num_shared_experts": 0, "expert_choice_router": False, "router_aux_loss_coef": 0.1,
    "pad_token_id": 1, "torch_dtype": "float32",
}


def _parse(**change: object) -> ModelConfig:
    return parse_config({**UPSTREAM, **change})


def _refused(field: str, **change: object) -> None:
    with pytest.raises(ConfigError, match=f"'{field}'"):
        _parse(**change)


def test_the_upstream_config_parses_to_its_fields() -> None:
    cfg = parse_config(dict(UPSTREAM), max_tokens=256)
    assert cfg == ModelConfig(vocab_size=250048, n_embd=64, n_head=4, n_inner=128, n_layer=4,
                              num_experts=8, moe_top_k=2, moe_every_n_layers=2,
                              type_vocab_size=1, layer_norm_epsilon=1e-5,
                              rotary_emb_base=10000.0, max_tokens=256, pad_token_id=1)
    assert type(cfg.rotary_emb_base) is float and type(cfg.layer_norm_epsilon) is float
    assert parse_config(dict(UPSTREAM)).max_tokens == 512


@pytest.mark.parametrize(("field", "implemented", "other"), [
    ("prenorm", False, True), ("rotary_emb_fraction", 1.0, 0.5),
    ("rotary_emb_interleaved", False, True), ("expert_choice_router", False, True),
    ("num_shared_experts", 0, 1), ("moe_normalize_expert_weights", False, True),
    ("parallel_block", False, True), ("causal", False, True), ("qkv_proj_bias", True, False),
    ("mlp_fc1_bias", True, False), ("mlp_fc2_bias", True, False),
])
def test_a_field_we_do_not_implement_is_taken_only_at_our_value(field: str, implemented: object,
                                                                  other: object) -> None:
    _parse(**{field: implemented})
    without = {k: v for k, v in UPSTREAM.items() if k != field}
    parse_config(without)  # absent: the upstream default, which is ours
    _refused(field, **{field: other})


@pytest.mark.parametrize("field", ["rotary_emb_scale_base", "rotary_scaling_factor",
                                   "use_rms_norm"])
def test_an_off_switch_is_taken_as_none_or_zero(field: str) -> None:
    _parse(**{field: None})
    _parse(**{field: 0})
    _refused(field, **{field: 2.0})
    _refused(field, **{field: True})


def test_rotary_over_no_dimension_is_refused() -> None:
    _refused("rotary_emb_fraction", rotary_emb_fraction=0)


def test_only_the_exact_gelu_is_taken() -> None:
    for name in ("gelu", "gelu_python"):
        _parse(activation_function=name, moe_act=name, moe_activation=name)
    without = {k: v for k, v in UPSTREAM.items() if k != "activation_function"}
    assert parse_config(without).n_embd == 64  # gelu by default
    _parse(moe_act=None, moe_activation=None)
    _refused("activation_function", activation_function="gelu_new")
    _refused("activation_function", activation_function="relu")
    _refused("moe_act", moe_act="gelu_new")
    _refused("moe_activation", moe_activation="silu")
    _refused("model_type", model_type="bert")
    with pytest.raises(ConfigError, match="'model_type'"):
        parse_config({k: v for k, v in UPSTREAM.items() if k != "model_type"})


@pytest.mark.parametrize("field", ["vocab_size", "n_embd", "n_head", "n_layer", "num_experts",
                                   "moe_top_k", "moe_every_n_layers"])
def test_a_required_integer_is_named_when_missing_or_not_a_positive_integer(field: str) -> None:
    with pytest.raises(ConfigError, match=f"required field '{field}' is missing"):
        parse_config({k: v for k, v in UPSTREAM.items() if k != field})
    for bad in (0, -1, 2.0, "8", True, None):
        with pytest.raises(ConfigError, match=f"'{field}' must be an integer >= 1, got"):
            _parse(**{field: bad})


def test_the_smallest_model_shapes_are_taken() -> None:
    cfg = _parse(vocab_size=1, n_embd=2, n_head=1, n_inner=None, n_layer=1, num_experts=1,
                 moe_top_k=1, moe_every_n_layers=2, type_vocab_size=1)
    assert (cfg.vocab_size, cfg.n_embd, cfg.n_head, cfg.n_layer) == (1, 2, 1, 1)
    assert (cfg.num_experts, cfg.moe_top_k, cfg.moe_every_n_layers) == (1, 1, 2)
    assert cfg.n_inner == 8  # absent or null: 4 x n_embd
    assert parse_config({k: v for k, v in UPSTREAM.items() if k != "n_inner"}).n_inner == 256


def test_a_config_read_from_json_text_parses_as_the_dict_does() -> None:
    """config.json is read from a file: its strings are the JSON parser's, not literals."""
    assert parse_config(json.loads(json.dumps(UPSTREAM))) == parse_config(dict(UPSTREAM))


def test_a_parsed_config_cannot_be_changed_in_place() -> None:
    cfg = _parse()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_layer = 2  # type: ignore[misc]


def test_heads_split_the_width_into_even_sizes() -> None:
    assert _parse(n_embd=8, n_head=4).head_dim == 2
    assert type(_parse(n_embd=768, n_head=12).head_dim) is int  # 64: a shape, an integer
    _refused("n_embd", n_embd=12, n_head=4)  # heads of 3: rotate-half needs an even size
    _refused("n_embd", n_embd=10, n_head=4)  # does not split
    _refused("n_embd", n_embd=64, n_head=128)  # more heads than width


def test_top_k_at_the_number_of_experts_and_one_past_it() -> None:
    assert _parse(num_experts=4, moe_top_k=4).moe_top_k == 4
    _refused("moe_top_k", num_experts=4, moe_top_k=5)


def test_moe_layers_alternate() -> None:
    assert _parse(moe_every_n_layers=2).moe_every_n_layers == 2
    _refused("moe_every_n_layers", moe_every_n_layers=1)
    cfg = _parse(n_layer=7, moe_every_n_layers=3)
    assert cfg.moe_layers == [1, 4]
    assert [cfg.is_moe(i) for i in range(7)] == [False, True, False, False, True, False, False]
    assert _parse(n_layer=12).moe_layers == [1, 3, 5, 7, 9, 11]


def test_token_types_at_one_and_zero() -> None:
    assert _parse(type_vocab_size=1).type_vocab_size == 1
    assert _parse(type_vocab_size=2).type_vocab_size == 2
    assert parse_config({k: v for k, v in UPSTREAM.items()
                         if k != "type_vocab_size"}).type_vocab_size == 1
    _refused("type_vocab_size", type_vocab_size=0)


def test_optional_numbers_and_their_defaults() -> None:
    cfg = _parse(layer_norm_epsilon=1e-6, rotary_emb_base=1000, pad_token_id=0)
    assert (cfg.layer_norm_epsilon, cfg.rotary_emb_base, cfg.pad_token_id) == (1e-6, 1000.0, 0)
    bare = parse_config({k: v for k, v in UPSTREAM.items()
                         if k not in ("layer_norm_epsilon", "rotary_emb_base", "pad_token_id")})
    assert (bare.layer_norm_epsilon, bare.rotary_emb_base, bare.pad_token_id) == (1e-5, 1e4, 1)
    assert _parse(pad_token_id=None).pad_token_id == 1
    assert type(_parse(pad_token_id=3.0).pad_token_id) is int


def test_a_manifest_config_round_trips_and_ignores_unknown_keys() -> None:
    cfg = _parse(n_layer=6)
    d = cfg.to_dict()
    assert d["n_layer"] == 6 and d["max_tokens"] == 512 and len(d) == 13
    assert ModelConfig.from_dict({**d, "added_later": 1}) == cfg
    required = {k: d[k] for k in ("vocab_size", "n_embd", "n_head", "n_inner", "n_layer",
                                  "num_experts", "moe_top_k", "moe_every_n_layers")}
    old = ModelConfig.from_dict(required)
    assert (old.type_vocab_size, old.layer_norm_epsilon, old.rotary_emb_base, old.max_tokens,
            old.pad_token_id) == (1, 1e-5, 10000.0, 512, 1)


def test_expected_shapes_of_a_checkpoint() -> None:
    """Every tensor of an upstream model.safetensors and its shape: dense layers have fc1/fc2,
    MoE layers a router, the experts' stacked w1/w2 and one bias."""
    cfg = _parse(n_embd=8, n_head=2, n_inner=12, n_layer=3, vocab_size=50, num_experts=4,
                 type_vocab_size=2)
    shapes = expected_shapes(cfg)
    want = {"embeddings.word_embeddings.weight": (50, 8),
            "embeddings.token_type_embeddings.weight": (2, 8),
            "emb_ln.weight": (8,), "emb_ln.bias": (8,)}
    for i in range(3):
        p = f"encoder.layers.{i}."
        want.update({p + "attn.Wqkv.weight": (24, 8), p + "attn.Wqkv.bias": (24,),
                     p + "attn.out_proj.weight": (8, 8), p + "attn.out_proj.bias": (8,),
                     p + "norm1.weight": (8,), p + "norm1.bias": (8,),
                     p + "norm2.weight": (8,), p + "norm2.bias": (8,)})
        if i == 1:
            want.update({p + "mlp.router.layer.weight": (4, 8), p + "mlp.experts.mlp.w1": (48, 8),
                         p + "mlp.experts.mlp.w2": (48, 8), p + "mlp.experts.bias": (8,)})
        else:
            want.update({p + "mlp.fc1.weight": (12, 8), p + "mlp.fc1.bias": (12,),
                         p + "mlp.fc2.weight": (8, 12), p + "mlp.fc2.bias": (8,)})
    assert shapes == want
