"""The PyTorch reference model: upstream NomicBert-MoE semantics, read top to bottom.

This is the oracle every other part is checked against, and a benchmark peer. The MoE layer
keeps the upstream per-expert loop (route, then for each expert gather its tokens, run it,
scatter-add the weighted output), and, like upstream, routes every position including padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..workers.bundle.config import ModelConfig


def rotary_tables(cfg: ModelConfig, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [S, head_dim] for GPT-NeoX 'rotate half' rotary, angles computed in fp32."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rotary_emb_base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    t = torch.arange(seq_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # [S, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # lane j and lane j+d/2 share an angle
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.Wqkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.out_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        qkv = self.Wqkv(x).view(b, s, 3, self.n_head, self.head_dim)  # rows: q, then k, then v
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, nh, S, hd]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim) + key_bias  # [B,nh,S,S]
        out = scores.softmax(dim=-1) @ v
        return self.out_proj(out.transpose(1, 2).reshape(b, s, h))


class DenseMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.n_embd, cfg.n_inner)
        self.fc2 = nn.Linear(cfg.n_inner, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact erf GELU


class MoEMLP(nn.Module):
    """Token-choice top-k MoE; weights stored the upstream (megablocks) way: w1, w2 as [E*F, H]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.ffn = cfg.num_experts, cfg.moe_top_k, cfg.n_inner
        self.router = nn.Linear(cfg.n_embd, cfg.num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(cfg.num_experts * cfg.n_inner, cfg.n_embd))
        self.w2 = nn.Parameter(torch.empty(cfg.num_experts * cfg.n_inner, cfg.n_embd))
        self.bias = nn.Parameter(torch.zeros(cfg.n_embd))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> top-k weights [N, k] (NOT renormalized) and expert ids [N, k]."""
        probs = self.router(x).softmax(dim=-1, dtype=torch.float32)
        return torch.topk(probs, self.top_k, dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, H]
        top_w, top_e = self.route(x)
        w1 = self.w1.view(self.num_experts, self.ffn, -1)  # [E, F, H]
        w2 = self.w2.view(self.num_experts, self.ffn, -1)  # [E, F, H], applied NOT transposed
        out = torch.zeros_like(x)
        expert_mask = F.one_hot(top_e, self.num_experts).permute(2, 1, 0)  # [E, k, N]
        for e in range(self.num_experts):
            slot, token = torch.where(expert_mask[e])
            if token.numel() == 0:
                continue
            y = F.gelu(x[token] @ w1[e].T) @ w2[e]
            out.index_add_(0, token, y * top_w[token, slot, None])
        out = out + self.bias  # once, not per expert
        return out.view(shape), top_e.view(*shape[:-1], self.top_k)


class Block(nn.Module):
    """Post-norm: x = norm1(x + attn(x)); x = norm2(x + ffn(x))."""

    def __init__(self, cfg: ModelConfig, moe: bool) -> None:
        super().__init__()
        self.attn = Attention(cfg)
        self.norm1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.norm2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp: nn.Module = MoEMLP(cfg) if moe else DenseMLP(cfg)

    def forward(self, x, key_bias, cos, sin):
        x = self.norm1(x + self.attn(x, key_bias, cos, sin))
        if isinstance(self.mlp, MoEMLP):
            y, experts = self.mlp(x)
        else:
            y, experts = self.mlp(x), None
        return self.norm2(x + y), experts


class ReferenceModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.n_embd)
        self.emb_ln = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.layers = nn.ModuleList(Block(cfg, cfg.is_moe(i)) for i in range(cfg.n_layer))

    @classmethod
    def from_tensors(cls, cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> ReferenceModel:
        """Build from upstream tensor names (see config.expected_shapes)."""
        model = cls(cfg)
        state = {}
        for name, t in tensors.items():
            key = name.removeprefix("embeddings.").replace("encoder.layers.", "layers.")
            key = key.replace("mlp.router.layer.", "mlp.router.")
            key = key.replace("mlp.experts.mlp.", "mlp.").replace("mlp.experts.bias", "mlp.bias")
            state[key] = t
        model.load_state_dict(state, strict=True)
        return model.eval()

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """ids, mask [B, S] -> last hidden [B, S, H] and expert ids [B, S, k] per MoE layer."""
        b, s = input_ids.shape
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        x = self.emb_ln(x)
        key_bias = torch.zeros(b, 1, 1, s)
        key_bias.masked_fill_(attention_mask[:, None, None, :] == 0, torch.finfo(torch.float32).min)
        cos, sin = rotary_tables(self.cfg, s)
        routing = {}
        for i, layer in enumerate(self.layers):
            x, experts = layer(x, key_bias, cos, sin)
            if experts is not None:
                routing[i] = experts  # [B, S, k]
        return x, routing

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              dimensions: int = 0) -> torch.Tensor:
        """Mean-pool real tokens, L2-normalize, optional Matryoshka truncation + re-normalize."""
        hidden, _ = self.forward(input_ids, attention_mask)
        m = attention_mask[..., None].to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1)
        pooled = F.normalize(pooled, dim=-1)
        if dimensions:
            pooled = F.normalize(pooled[:, :dimensions], dim=-1)
        return pooled


def pad_batch(ids: list[list[int]], pad_id: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into [B, S] ids and mask tensors."""
    s = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), s), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), s), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return input_ids, mask
