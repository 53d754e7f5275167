"""Useful work of a forward call, from the config and the routing actually taken.

FLOPs count real tokens only (the same numerator for every peer, padded or not): per token,
dense layers 2*(H*3H + H*H + 2*H*F); MoE layers 2*(H*3H + H*H) + router 2*H*E + 2*2*H*F per
routed (token, expert) pair; attention 2*2*S*H per token per layer with S the real length.
Weight bytes are the fp32 weights the call touches: the embedding rows gathered, every
attention / dense-FFN / LayerNorm weight, and per MoE layer the experts that got >= 1 token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moe_embed.workers.bundle.config import ModelConfig

FP32 = 4


@dataclass
class Cost:
    tokens: int
    flops: float
    weight_bytes: float
    routed_pairs: int
    experts_touched: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.tokens + other.tokens, self.flops + other.flops,
                    self.weight_bytes + other.weight_bytes,
                    self.routed_pairs + other.routed_pairs,
                    self.experts_touched + other.experts_touched)


ZERO = Cost(0, 0.0, 0.0, 0, 0)


def call_cost(cfg: ModelConfig, ids: Sequence[Sequence[int]],
              expert_tokens: np.ndarray | None = None) -> Cost:
    """Cost of one forward over the batch `ids`; `expert_tokens` [n_moe, E] is the routing
    taken (None: every token to top_k experts, every expert touched, i.e. an upper bound)."""
    h, f, e, k = cfg.n_embd, cfg.n_inner, cfg.num_experts, cfg.moe_top_k
    lengths = np.array([len(x) for x in ids], dtype=np.float64)
    n = int(lengths.sum())
    attn_flops = cfg.n_layer * float((2 * 2 * lengths**2 * h).sum())
    proj = 2 * (h * 3 * h + h * h)
    flops = attn_flops
    n_moe = len(cfg.moe_layers)
    if expert_tokens is None:
        pairs = np.full(n_moe, k * n)
        touched = np.full(n_moe, e)
    else:
        pairs = expert_tokens.sum(axis=1)
        touched = (expert_tokens > 0).sum(axis=1)
    flops += (cfg.n_layer - n_moe) * n * (proj + 2 * 2 * h * f)
    flops += n_moe * n * (proj + 2 * h * e) + float(pairs.sum()) * 2 * 2 * h * f
    unique = len({t for x in ids for t in x})
    params = unique * h + cfg.type_vocab_size * h + 2 * h  # rows gathered, type emb, emb_ln
    params += cfg.n_layer * (3 * h * h + 3 * h + h * h + h + 4 * h)  # attention + 2 LayerNorms
    params += (cfg.n_layer - n_moe) * (2 * h * f + f + h)  # dense fc1, fc2
    params += n_moe * (e * h + h) + int(touched.sum()) * 2 * h * f  # router, bias, experts
    return Cost(n, flops, float(params * FP32), int(pairs.sum()), int(touched.sum()))


def total(costs: Sequence[Cost]) -> Cost:
    out = ZERO
    for c in costs:
        out = out + c
    return out
