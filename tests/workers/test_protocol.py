"""The frontend <-> worker wire messages (workers/process/protocol.py): every field survives
encode/decode, row 0 and empty inputs included; and the gRPC response built from float32 bytes
equals the one protobuf builds float by float."""

from __future__ import annotations

import numpy as np
import pytest

from moe_embed.service.engine import EmbedOutcome
from moe_embed.service.grpc_api import to_response
from moe_embed.v1 import embedder_pb2 as pb
from moe_embed.workers.process import protocol


def test_a_batch_keeps_every_field() -> None:
    ids = np.array([0, 5, 2, 0, 7, 8, 9, 2], dtype=np.int32)
    batch = protocol.Batch(2**40 + 3, ids, np.array([0, 3, 8], dtype=np.int32),
                           np.array([16, 64], dtype=np.int32), np.array([False, True]))
    back = protocol.decode(batch.encode())
    assert isinstance(back, protocol.Batch) and back.batch_id == 2**40 + 3
    for name in ("ids", "offsets", "dims", "normalize"):
        np.testing.assert_array_equal(getattr(back, name), getattr(batch, name))
    assert len(back) == 2


@pytest.mark.parametrize("n", [1, 3])
def test_a_batch_of_an_odd_number_of_inputs_keeps_every_field(n: int) -> None:
    """n + 1 offsets: an odd n, where n | 1 is not n + 1."""
    lengths = [2, 5, 1][:n]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    ids = np.arange(offsets[-1], dtype=np.int32) * 7
    dims = np.array([768, 256, 512][:n], dtype=np.int32)
    normalize = np.array([True, False, True][:n])
    back = protocol.decode(protocol.Batch(0, ids, offsets, dims, normalize).encode())
    assert back.batch_id == 0 and len(back) == n
    for name, want in (("ids", ids), ("offsets", offsets), ("dims", dims),
                       ("normalize", normalize)):
        np.testing.assert_array_equal(getattr(back, name), want)


@pytest.mark.parametrize("shape", [(3, 4), (4, 3), (3, 3), (6, 8), (1, 1)])
def test_expert_counts_of_every_shape_travel(shape: tuple[int, int]) -> None:
    """More MoE layers than experts, as many, fewer: every count in its place."""
    counts = np.arange(shape[0] * shape[1], dtype=np.int64).reshape(shape) * 3
    layers = list(range(1, 2 * shape[0], 2))
    back = protocol.decode(protocol.Result.of(5, 2.0, [np.ones(3, np.float32)], layers,
                                              counts).encode())
    assert back.moe_layers == layers
    np.testing.assert_array_equal(back.expert_tokens, counts)


def test_a_result_without_expert_counts_travels_as_zero_layers() -> None:
    result = protocol.Result.of(0, 1.0, [np.ones(2, np.float32)], [], np.zeros(0, np.int64))
    back = protocol.decode(result.encode())
    assert back.moe_layers == [] and back.expert_tokens.shape == (0, 0)
    assert [v.tolist() for v in back.vectors()] == [[1.0, 1.0]]


@pytest.mark.parametrize("widths", [[3, 1], [1], [], [3, 1, 2, 4]])
def test_a_result_keeps_every_vector_and_the_expert_counts(widths: list[int]) -> None:
    vectors = [np.arange(w, dtype=np.float32) + 10 * i for i, w in enumerate(widths)]
    counts = np.arange(12, dtype=np.int64).reshape(3, 4)
    result = protocol.Result.of(7, 12.5, vectors, [1, 3, 5], counts)
    back = protocol.decode(result.encode())
    assert isinstance(back, protocol.Result)
    assert (back.batch_id, back.compute_ms, back.moe_layers) == (7, 12.5, [1, 3, 5])
    assert [v.tolist() for v in back.vectors()] == [v.tolist() for v in vectors]
    np.testing.assert_array_equal(back.expert_tokens, counts)


def test_failed_ready_fork_and_load_failed_round_trip() -> None:
    failed = protocol.decode(protocol.Failed(9, "ValueError('row 0: bad')").encode())
    assert failed == protocol.Failed(9, "ValueError('row 0: bad')")
    assert protocol.decode(protocol.Ready(1234, 2.5).encode()) == protocol.Ready(1234, 2.5)
    assert protocol.decode(protocol.Fork(0).encode()) == protocol.Fork(0)
    assert protocol.decode(protocol.LoadFailed("no such file").encode()) == \
        protocol.LoadFailed("no such file")
    assert protocol.decode(protocol.Stop().encode()) == protocol.Stop()


def test_the_grpc_response_from_float32_bytes_equals_protobufs_own() -> None:
    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal(d).astype(np.float32) for d in (768, 16, 1)]
    out = EmbedOutcome(vectors, [5, 512, 3], [False, True, False], 768, 1.5, 2.5, 4.0)
    got = to_response("req-0", "m", out)
    want = pb.EmbedResponse(id="req-0", token_counts=[5, 512, 3], truncated=[False, True, False],
                            total_tokens=520, dimensions=768, model="m",
                            timing=pb.Timing(queue_ms=1.5, compute_ms=2.5, total_ms=4.0))
    for v in vectors:
        want.embeddings.add().values.extend(v.tolist())
    assert got == want
    assert [np.array(e.values, dtype=np.float32).tobytes() for e in got.embeddings] == \
        [v.tobytes() for v in vectors]
