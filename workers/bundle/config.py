"""Model configuration: parse an upstream NomicBert MoE `config.json`, refuse what we do not run.

Every refusal names the offending field, because a silently-ignored field (say, interleaved
rotary) still produces finite, plausible and wrong embeddings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


class ConfigError(ValueError):
    """The checkpoint's config asks for something this implementation does not implement."""


class CheckpointError(ValueError):
    """The checkpoint cannot be read: missing files, missing or mis-shaped tensors."""


@dataclass(frozen=True)
class ModelConfig:
    """The fields of the architecture that the forward pass depends on."""

    vocab_size: int
    n_embd: int
    n_head: int
    n_inner: int
    n_layer: int
    num_experts: int
    moe_top_k: int
    moe_every_n_layers: int
    type_vocab_size: int = 1
    layer_norm_epsilon: float = 1e-5
    rotary_emb_base: float = 10000.0
    max_tokens: int = 512
    pad_token_id: int = 1

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def moe_layers(self) -> list[int]:
        """Layers whose FFN is a mixture of experts: `i % moe_every_n_layers == 1`."""
        return [i for i in range(self.n_layer) if i % self.moe_every_n_layers == 1]

    def is_moe(self, layer: int) -> bool:
        return layer % self.moe_every_n_layers == 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict` (used for bundle manifests, already validated at export)."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# field -> (value we implement, why). A field that is absent takes the upstream default.
_REQUIRED_VALUES: dict[str, tuple[Any, str]] = {
    "prenorm": (False, "only post-norm blocks are implemented"),
    "rotary_emb_fraction": (1.0, "only full-head-dim rotary is implemented"),
    "rotary_emb_interleaved": (False, "only GPT-NeoX 'rotate half' rotary is implemented"),
    "rotary_emb_scale_base": (None, "rotary scaling (xPos) is not implemented"),
    "rotary_scaling_factor": (None, "rotary scaling (NTK/dynamic) is not implemented"),
    "expert_choice_router": (False, "only token-choice top-k routing is implemented"),
    "num_shared_experts": (0, "shared experts are not implemented"),
    "moe_normalize_expert_weights": (False, "renormalized top-k weights are not implemented"),
    "parallel_block": (False, "parallel attention/MLP blocks are not implemented"),
    "causal": (False, "the encoder is bidirectional"),
    "qkv_proj_bias": (True, "the Wqkv projection is expected to have a bias"),
    "mlp_fc1_bias": (True, "fc1 is expected to have a bias"),
    "mlp_fc2_bias": (True, "fc2 is expected to have a bias"),
    "use_rms_norm": (None, "only LayerNorm is implemented"),
}
_GELU_NAMES = ("gelu", "gelu_python")  # exact erf GELU; gelu_new/gelu_fast are the tanh forms


def _require_int(d: dict[str, Any], name: str, minimum: int = 1) -> int:
    if name not in d:
        raise ConfigError(f"config.json: required field '{name}' is missing")
    v = d[name]
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ConfigError(f"config.json: '{name}' must be an integer >= {minimum}, got {v!r}")
    return v


def parse_config(d: dict[str, Any], max_tokens: int = 512) -> ModelConfig:
    """Validate an upstream config dict and return the fields the forward pass needs."""
    model_type = d.get("model_type")
    if model_type != "nomic_bert":
        raise ConfigError(f"config.json: 'model_type' must be 'nomic_bert', got {model_type!r}")
    for name, (want, why) in _REQUIRED_VALUES.items():
        if name in d and d[name] != want and not (want is None and d[name] in (None, 0)):
            raise ConfigError(f"config.json: '{name}'={d[name]!r} is unsupported: {why}")
    act = d.get("activation_function", "gelu")
    if act not in _GELU_NAMES:
        raise ConfigError(
            f"config.json: 'activation_function'={act!r} is unsupported: "
            "the MoE and dense FFNs are implemented with exact (erf) GELU only"
        )
    for name in ("moe_act", "moe_activation"):
        if d.get(name) not in (None, *_GELU_NAMES):
            raise ConfigError(f"config.json: '{name}'={d[name]!r} is unsupported: "
                              "experts are implemented with exact (erf) GELU only")
    if d.get("rotary_emb_fraction", 1.0) == 0:
        raise ConfigError("config.json: 'rotary_emb_fraction'=0 (learned positions) is unsupported")

    n_embd = _require_int(d, "n_embd")
    n_head = _require_int(d, "n_head")
    if n_embd % n_head or (n_embd // n_head) % 2:
        raise ConfigError(
            f"config.json: 'n_embd'={n_embd} must split into 'n_head'={n_head} heads of even size"
        )
    num_experts = _require_int(d, "num_experts")
    top_k = _require_int(d, "moe_top_k")
    if top_k > num_experts:
        raise ConfigError(f"config.json: 'moe_top_k'={top_k} exceeds 'num_experts'={num_experts}")
    every = _require_int(d, "moe_every_n_layers")
    if every < 2:
        raise ConfigError(
            f"config.json: 'moe_every_n_layers'={every} is unsupported: MoE layers must alternate"
        )
    type_vocab = d.get("type_vocab_size", 1)
    if type_vocab < 1:
        raise ConfigError(f"config.json: 'type_vocab_size' must be >= 1, got {type_vocab!r}")
    n_inner = d.get("n_inner") or 4 * n_embd
    return ModelConfig(
        vocab_size=_require_int(d, "vocab_size"),
        n_embd=n_embd,
        n_head=n_head,
        n_inner=int(n_inner),
        n_layer=_require_int(d, "n_layer"),
        num_experts=num_experts,
        moe_top_k=top_k,
        moe_every_n_layers=every,
        type_vocab_size=int(type_vocab),
        layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-5)),
        rotary_emb_base=float(d.get("rotary_emb_base", 10000.0)),
        max_tokens=max_tokens,
        pad_token_id=int(d.get("pad_token_id", 1) if d.get("pad_token_id") is not None else 1),
    )


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of an upstream `model.safetensors` and its shape."""
    h, f, e = cfg.n_embd, cfg.n_inner, cfg.num_experts
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (cfg.vocab_size, h),
        "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, h),
        "emb_ln.weight": (h,),
        "emb_ln.bias": (h,),
    }
    for i in range(cfg.n_layer):
        p = f"encoder.layers.{i}."
        shapes.update({
            p + "attn.Wqkv.weight": (3 * h, h),
            p + "attn.Wqkv.bias": (3 * h,),
            p + "attn.out_proj.weight": (h, h),
            p + "attn.out_proj.bias": (h,),
            p + "norm1.weight": (h,),
            p + "norm1.bias": (h,),
            p + "norm2.weight": (h,),
            p + "norm2.bias": (h,),
        })
        if cfg.is_moe(i):
            shapes.update({
                p + "mlp.router.layer.weight": (e, h),
                p + "mlp.experts.mlp.w1": (e * f, h),
                p + "mlp.experts.mlp.w2": (e * f, h),
                p + "mlp.experts.bias": (h,),
            })
        else:
            shapes.update({
                p + "mlp.fc1.weight": (f, h),
                p + "mlp.fc1.bias": (f,),
                p + "mlp.fc2.weight": (h, f),
                p + "mlp.fc2.bias": (h,),
            })
    return shapes
