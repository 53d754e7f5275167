"""The MoE router, in torch: fp32 softmax over all experts, top-k, weights NOT renormalized.

It also plans the dispatch: for each expert, which of the N routed tokens it gets and with
what weight, so each token is computed by exactly its k experts and padding by none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ExpertAssignment:
    """The tokens routed to one expert and each token's gate weight."""

    expert: int
    tokens: np.ndarray  # int64 [n], indices into the routed rows, ascending
    weights: np.ndarray  # float32 [n, 1]


class Router:
    """Top-k routing of packed [N, H] rows and the per-expert dispatch plan."""

    def __init__(self, weight: torch.Tensor, expert_bias: torch.Tensor, top_k: int) -> None:
        self.weight_t = weight.to(torch.float32).T.contiguous()  # [H, E]
        self.expert_bias = expert_bias.to(torch.float32).numpy()  # [H], added once per token
        self.num_experts = weight.shape[0]
        self.top_k = top_k

    def route(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x [N, H] -> top-k weights [N, k] (fp32, sum < 1) and expert ids [N, k]."""
        logits = torch.from_numpy(x) @ self.weight_t
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        top_w, top_e = torch.topk(probs, self.top_k, dim=-1)
        return top_w.numpy(), top_e.numpy()

    def plan(self, top_w: np.ndarray, top_e: np.ndarray) -> list[ExpertAssignment]:
        """Group tokens by expert (ascending expert id); experts with no token are left out."""
        n, k = top_e.shape
        flat_e = top_e.reshape(-1)
        order = np.argsort(flat_e, kind="stable")  # stable: tokens stay ascending within an expert
        counts = np.bincount(flat_e, minlength=self.num_experts)
        token_of = order // k
        weight_of = top_w.reshape(-1)[order]
        out, start = [], 0
        for e, c in enumerate(counts):
            if c:
                sl = slice(start, start + c)
                out.append(ExpertAssignment(e, token_of[sl], weight_of[sl, None]))
            start += c
        return out
