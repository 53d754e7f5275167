"""The MoE router (workers/runtime/router.py) against a plain numpy statement of the rules:
fp32 softmax over all experts, top-2, weights NOT renormalized, each token to exactly its
experts, experts without tokens left out."""

from __future__ import annotations

import numpy as np
import torch

from moe_embed.workers.runtime.router import Router


def _router(seed: int = 0, experts: int = 8, hidden: int = 16) -> Router:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(experts, hidden, generator=g) * 2.0  # a clear margin between experts
    return Router(weight, torch.zeros(hidden), top_k=2)


def test_route_is_softmax_top2_without_renormalizing() -> None:
    router = _router()
    x = np.random.default_rng(0).standard_normal((9, 16)).astype(np.float32)
    top_w, top_e = router.route(x)
    logits = x @ router.weight_t.numpy()
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    want_e = np.argsort(-probs, axis=1)[:, :2]
    np.testing.assert_array_equal(top_e, want_e)
    np.testing.assert_allclose(top_w, np.take_along_axis(probs, want_e, 1), rtol=1e-5)
    assert (top_w.sum(1) < 1.0).all()  # not renormalized


def test_plan_sends_each_token_to_exactly_its_experts_with_its_weight() -> None:
    top_e = np.array([[3, 0], [0, 5], [3, 5], [7, 3]])
    top_w = np.array([[0.5, 0.2], [0.4, 0.3], [0.6, 0.1], [0.7, 0.2]], dtype=np.float32)
    plan = _router().plan(top_w, top_e)
    assert [a.expert for a in plan] == [0, 3, 5, 7]  # ascending; experts 1, 2, 4, 6 get none
    got = {(a.expert, int(t)): float(w) for a in plan for t, w in zip(a.tokens, a.weights[:, 0],
                                                                       strict=True)}
    want = {(int(e), n): float(top_w[n, j]) for n in range(4) for j, e in enumerate(top_e[n])}
    assert got == want
    for a in plan:
        assert (np.diff(a.tokens) > 0).all()  # ascending within an expert
        assert a.weights.shape == (len(a.tokens), 1)


def test_the_plan_gathers_and_scatters_rows_to_the_dense_mixture() -> None:
    """Used as the runtime uses it (rows gathered by `tokens`, results scattered back times
    `weights`), the plan gives each token the weighted sum of its own top-k experts' outputs."""
    router = _router(seed=2, experts=8, hidden=16)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((11, 16)).astype(np.float32)
    scale = rng.standard_normal((8, 16)).astype(np.float32)  # expert e: x * scale[e]
    top_w, top_e = router.route(x)
    out = np.zeros_like(x)
    for a in router.plan(top_w, top_e):
        assert a.tokens.dtype == np.int64
        out[a.tokens] += x[a.tokens] * scale[a.expert] * a.weights
    want = np.stack([sum(top_w[n, j] * x[n] * scale[top_e[n, j]] for j in range(2))
                     for n in range(11)])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
