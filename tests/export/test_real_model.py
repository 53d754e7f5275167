"""Opt-in: the real checkpoint reproduces the model card's example (0.48 and 0.19) at every
precision: within 0.03 in fp32 and int4, within 0.02 in int8.

Set MOE_EMBED_REAL_MODEL to a local HF checkpoint directory or a hub id (needs network). The fp32
bundle is exported from the checkpoint, int8 and int4 from that fp32 bundle (as
`moe-embed export BUNDLE --precision ...` does).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from moe_embed.export.split import export_bundle
from moe_embed.service.local import LocalEmbedder
from moe_embed.workers.bundle.format import Bundle

REAL = os.environ.get("MOE_EMBED_REAL_MODEL")
pytestmark = pytest.mark.skipif(not REAL, reason="set MOE_EMBED_REAL_MODEL to a checkpoint")

CARD = (0.48, 0.19)  # query vs the two documents, dot product of normalized embeddings
TOLERANCE = {"fp32": 0.03, "int8": 0.02, "int4": 0.03}


@pytest.fixture(scope="module")
def real_bundles(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("real")
    fp32 = export_bundle(REAL, root / "fp32")
    out = {"fp32": fp32}
    for precision in ("int8", "int4"):
        out[precision] = export_bundle(fp32, root / precision, precision=precision)
    return out


@pytest.mark.parametrize("precision", list(TOLERANCE))
def test_model_card_example(real_bundles, precision):
    bundle = real_bundles[precision]
    assert Bundle.load(bundle).manifest.precision == precision
    emb = LocalEmbedder(bundle)
    assert (emb.limits.dims_min, emb.limits.dims_max) == (256, 768)
    q = emb.embed(["跟我讲讲嵌入"], "search_query").vectors[0]
    docs = emb.embed(["嵌入很酷", "骆驼很酷"], "search_document").vectors
    sims = docs @ q
    tol = TOLERANCE[precision]
    assert abs(sims[0] - CARD[0]) <= tol, (precision, sims)
    assert abs(sims[1] - CARD[1]) <= tol, (precision, sims)
    short = emb.embed(["嵌入很酷"], "search_document", dimensions=256).vectors[0]
    assert np.isclose(np.linalg.norm(short), 1.0, atol=1e-5)
