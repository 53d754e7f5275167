"""The routed runtime equals the PyTorch reference, token by token and vector by vector."""

from __future__ import annotations

import numpy as np
import pytest

from moe_embed.export.reference import pad_batch
from moe_embed.service.local import LocalEmbedder
from moe_embed.service.tasks import task_named
from moe_embed.workers.runtime.chunks import chunks
from moe_embed.workers.runtime.errors import MalformedBatch
from moe_embed.workers.runtime.runtime import Runtime, pack


@pytest.fixture(scope="module")
def runtime(tiny_bundle) -> Runtime:
    return Runtime(tiny_bundle, threads=2)


@pytest.fixture(scope="module")
def embedder(tiny_bundle) -> LocalEmbedder:
    return LocalEmbedder(tiny_bundle, threads=2)


@pytest.fixture(scope="module")
def batch_ids(embedder, multilingual_texts) -> list[list[int]]:
    long_text = " ".join(multilingual_texts) * 3  # > 512 tokens: exercises truncation too
    return [x.tolist() for x in embedder.tokenizer.encode(multilingual_texts + [long_text],
                                                           task_named("search_document"))]


def embed_ids(rt, ids, dimensions=0, normalize=True):
    """The runtime's vectors [B, d] for id lists, and its whole result."""
    r = rt.embed(*pack(ids), dimensions, normalize)
    return np.stack(r.vectors), r


def _reference(reference, ids):
    input_ids, mask = pad_batch(ids)
    hidden, routing = reference(input_ids, mask)
    return hidden.numpy(), mask.numpy().astype(bool), routing


def test_batch_has_mixed_lengths_up_to_512(batch_ids):
    lengths = sorted(len(x) for x in batch_ids)
    assert lengths[0] <= 10 and lengths[-1] == 512 and len(set(lengths)) > 10


def test_hidden_states_and_expert_choices_match_reference(runtime, reference, batch_ids):
    r = runtime.forward(*pack(batch_ids))
    ref_hidden, mask, routing = _reference(reference, batch_ids)
    assert np.abs(r.hidden - ref_hidden[mask]).max() <= 1e-4
    for layer, ref_experts in routing.items():
        ours = r.expert_ids[layer]
        theirs = ref_experts.numpy()[mask]
        mismatched = np.flatnonzero((ours != theirs).any(axis=1))
        assert mismatched.size == 0, f"layer {layer}: tokens {mismatched[:10]} routed differently"


@pytest.mark.parametrize("chunk_tokens", [1, 100, 10**6])
def test_chunked_segments_match_reference(tiny_bundle, reference, batch_ids, chunk_tokens):
    """Dense segments run in whole-sequence chunks (one per sequence, a few, or one for the
    whole batch); the result is the reference's either way."""
    rt = Runtime(tiny_bundle, threads=2)
    rt.chunk_tokens = chunk_tokens
    ids = sorted(batch_ids, key=len)[::3]  # mixed lengths, the 512-token text among them
    r = rt.forward(*pack(ids))
    ref_hidden, mask, _ = _reference(reference, ids)
    assert r.hidden.shape == (mask.sum(), 64)  # packed: real tokens only, no padding rows
    assert np.abs(r.hidden - ref_hidden[mask]).max() <= 1e-4


def test_chunks_are_whole_sequences_within_budget():
    lengths = np.array([3, 4, 600, 2, 2, 2, 9])
    parts = chunks(lengths, budget=8)
    assert [(p.rows.start, p.rows.stop) for p in parts] == [(0, 7), (7, 607), (607, 613),
                                                          (613, 622)]
    assert [p.layout["attention_mask"].shape for p in parts] == [(2, 4), (1, 600), (3, 2),
                                                                (1, 9)]
    for p in parts:
        n = p.rows.stop - p.rows.start
        assert p.layout["unpad_index"].size == n and p.layout["attention_mask"].sum() == n
        assert p.layout["pad_index"].max() == n - 1


def test_pooled_embeddings_match_reference(runtime, reference, batch_ids):
    ours, _ = embed_ids(runtime, batch_ids)
    input_ids, mask = pad_batch(batch_ids)
    theirs = reference.embed(input_ids, mask).numpy()
    assert ours.shape == (len(batch_ids), 64)
    assert np.abs(ours - theirs).max() <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)


def test_padding_is_never_routed_and_each_token_reaches_top_k_experts(runtime, batch_ids):
    _, r = embed_ids(runtime, batch_ids)
    real_tokens = sum(len(x) for x in batch_ids)
    assert r.expert_tokens.shape == (2, 8)
    assert (r.expert_tokens.sum(axis=1) == 2 * real_tokens).all()


def test_unused_experts_are_not_run(runtime):
    # one short text cannot reach all 16 (layer, expert) pairs with 2 experts per token
    _, r = embed_ids(runtime, [[0, 35378, 2]])
    assert (r.expert_tokens.sum(axis=1) == 6).all()
    assert (r.expert_tokens == 0).sum() >= 2 * (8 - 6)
    # the session of an expert with no token is never called; one with tokens, once
    assert ((r.expert_calls == 0) == (r.expert_tokens == 0)).all()
    assert (r.expert_calls[r.expert_tokens > 0] == 1).all()


def test_batch_invariance(runtime, batch_ids):
    together, _ = embed_ids(runtime, batch_ids)
    for i in (0, 3, len(batch_ids) - 1):
        alone = embed_ids(runtime, [batch_ids[i]])[0][0]
        assert np.abs(alone - together[i]).max() <= 1e-5


def test_matryoshka_is_renormalized_prefix(runtime, batch_ids):
    full, _ = embed_ids(runtime, batch_ids[:6])
    short, _ = embed_ids(runtime, batch_ids[:6], dimensions=16)
    assert short.shape == (6, 16)
    expected = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    assert np.abs(short - expected).max() <= 1e-6


@pytest.mark.parametrize("dims", [8, 15, 65, 1000, -1])
def test_dimensions_outside_bundle_range_are_refused(runtime, dims):
    """The runtime trusts the validator, but a batch breaking its invariants is refused (a bug
    upstream), naming the row."""
    with pytest.raises(MalformedBatch, match=r"row 0: dimensions"):
        embed_ids(runtime, [[0, 5, 2]], dimensions=dims)


def test_token_ids_are_checked(runtime):
    with pytest.raises(MalformedBatch, match=r"row 1: token id"):
        embed_ids(runtime, [[0, 5, 2], [0, 250048, 2]])
    with pytest.raises(MalformedBatch, match=r"row 0: 513 tokens"):
        embed_ids(runtime, [list(range(513))])
    embed_ids(runtime, [[5] * 512])  # the limit itself is fine


def test_all_experts_bundle_agrees_with_routed(runtime, tiny_all_experts_bundle, batch_ids):
    all_rt = Runtime(tiny_all_experts_bundle, threads=2)
    assert np.abs(embed_ids(all_rt, batch_ids)[0] - embed_ids(runtime, batch_ids)[0]).max() \
        <= 1e-4
    ours, theirs = runtime.forward(*pack(batch_ids)), all_rt.forward(*pack(batch_ids))
    assert ours.hidden.shape == theirs.hidden.shape
    assert np.abs(ours.hidden - theirs.hidden).max() <= 1e-4


def test_embedder_prefixes_task_and_matches_reference(embedder, reference):
    out = embedder.embed(["tell me about embeddings"], "search_query")
    ids = [x.tolist() for x in embedder.tokenizer.encode(
        ["search_query: tell me about embeddings"], task_named("none"))]
    input_ids, mask = pad_batch(ids)
    assert out.tokens == [len(ids[0])]
    assert np.abs(out.vectors - reference.embed(input_ids, mask).numpy()).max() <= 1e-5
    plain = embedder.embed(["tell me about embeddings"], "none").vectors
    assert np.abs(plain - out.vectors).max() > 1e-3  # the prefix changes the vector



def test_raw_mean_pooling_matches_the_reference(runtime, reference, batch_ids):
    """normalize=False exposes the pooled mean itself: a wrong denominator (padding counted,
    or a constant) cannot hide behind normalization."""
    ids = batch_ids[::4]
    raw, _ = embed_ids(runtime, ids, normalize=False)
    input_ids, mask = pad_batch(ids)
    hidden, _ = reference(input_ids, mask)
    m = mask[..., None].to(hidden.dtype)
    theirs = ((hidden * m).sum(1) / m.sum(1)).numpy()
    assert np.abs(raw - theirs).max() <= 1e-5


def test_normalize_false_returns_the_raw_mean(runtime, batch_ids):
    ids = batch_ids[:4]
    r = runtime.forward(*pack(ids))
    spans = zip(r.offsets[:-1], r.offsets[1:], strict=True)
    mean = np.stack([r.hidden[a:b].mean(axis=0) for a, b in spans])
    raw, _ = embed_ids(runtime, ids, normalize=False)
    assert np.abs(raw - mean).max() <= 1e-6
    short, _ = embed_ids(runtime, ids, 16, normalize=False)
    assert np.abs(short - mean[:, :16]).max() <= 1e-6
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
