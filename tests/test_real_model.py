"""Opt-in: the real checkpoint reproduces the model card's example (0.48 and 0.19 within 0.03).

Set MOE_EMBED_REAL_MODEL to a local HF checkpoint directory or a hub id (needs network).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from moe_embed.export.split import export_bundle
from moe_embed.workers.runtime.embedder import LocalEmbedder

REAL = os.environ.get("MOE_EMBED_REAL_MODEL")
pytestmark = pytest.mark.skipif(not REAL, reason="set MOE_EMBED_REAL_MODEL to a checkpoint")


def test_model_card_example(tmp_path):
    bundle = export_bundle(REAL, tmp_path / "real")
    emb = LocalEmbedder(bundle)
    assert (emb.limits.dims_min, emb.limits.dims_max) == (256, 768)
    q = emb.embed(["跟我讲讲嵌入"], "search_query").vectors[0]
    docs = emb.embed(["嵌入很酷", "骆驼很酷"], "search_document").vectors
    sims = docs @ q
    assert abs(sims[0] - 0.48) <= 0.03, sims
    assert abs(sims[1] - 0.19) <= 0.03, sims
    short = emb.embed(["嵌入很酷"], "search_document", dimensions=256).vectors[0]
    assert np.isclose(np.linalg.norm(short), 1.0, atol=1e-5)
