"""Large requests are tokenized in the frontend's one tokenizing thread in parts, each queued
when the last ends: a request of many long texts (a big Tokenize, ~0.2-0.8 s) does not hold
the thread while other large requests, their messages alive, wait behind it; and an error in
a later part still names the caller's own index."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from moe_embed.service.config import ServeConfig
from moe_embed.service.engine import TOKENIZE_JOB_CHARS, Engine
from moe_embed.service.metrics import Metrics
from moe_embed.service.tasks import task_named
from moe_embed.service.tokenizer import Tokenizer
from moe_embed.testing.service import ServeProcess
from moe_embed.v1 import embedder_pb2 as pb
from moe_embed.v1 import embedder_pb2_grpc as pb_grpc
from moe_embed.workers.bundle.format import Bundle

LONG = "word " * 700  # 3,500 characters, ~700 tokens


@pytest.fixture(scope="module")
def tok(tiny_bundle) -> Tokenizer:
    return Tokenizer.from_bundle(Bundle.load(tiny_bundle))


def test_parts_cut_at_the_character_budget(tok) -> None:
    """Consecutive ranges covering every input once; a part closes before the input that would
    take it past the budget (at the budget exactly it stays); an input over the budget alone is
    a part of its own; a text counts at most the tokenizer's window; token ids count nothing."""
    assert tok.job_parts(["a" * 10] * 5, 30) == [(0, 3), (3, 5)]
    assert tok.job_parts(["a" * 10] * 5, 29) == [(0, 2), (2, 4), (4, 5)]
    assert tok.job_parts(["a" * 100, "b", "c"], 30) == [(0, 1), (1, 3)]
    assert tok.job_parts(["x" * (tok.window * 3)] * 2, tok.window * 2) == [(0, 2)]
    assert tok.job_parts([[5] * 500] * 100, 5) == [(0, 100)]
    assert tok.job_parts([[5] * 500] * 100 + ["a" * 10], 5) == [(0, 100), (100, 101)]
    assert tok.job_parts(["a"], 1) == [(0, 1)]


def test_a_part_names_the_callers_index(tok) -> None:
    ok, bad = tok.encode_marked(["short"], task_named("none"), truncate=False, first=7)
    assert len(ok) == 1 and bad == [False]
    with pytest.raises(ValueError, match=r"inputs\[9\]"):
        tok.encode_marked(["short", LONG], task_named("none"), truncate=False, first=8)


def test_a_big_request_lets_another_through_between_its_parts(tiny_bundle) -> None:
    """The thread is held (a job waiting on a gate) while a 64-text Tokenize and then a
    one-text large one are queued: once it is free, the small one runs after the big one's
    first part, not after all of them."""
    async def run() -> list[str]:
        engine = Engine(ServeConfig(), tiny_bundle, Metrics())
        engine.tokenizer = Tokenizer.from_bundle(engine.bundle)
        gate, order = threading.Event(), []
        held = asyncio.ensure_future(engine._off_loop(gate.wait))
        big = asyncio.ensure_future(engine.tokenize(
            [LONG] * 64, "none", each=lambda ids, pieces: order.append("big")))
        for _ in range(3):
            await asyncio.sleep(0)  # big's first part is queued behind the gate
        small = asyncio.ensure_future(engine.tokenize(
            ["x" * 5000], "none", each=lambda ids, pieces: order.append("small")))
        for _ in range(3):
            await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(held, big, small)
        engine._tokenizing.shutdown()
        return order

    order = asyncio.run(run())
    first = Tokenizer.from_bundle(Bundle.load(tiny_bundle)).job_parts([LONG] * 64,
                                                                     TOKENIZE_JOB_CHARS)[0]
    assert first[1] < 64  # the big request has more than one part
    assert order == ["big"] * first[1] + ["small"] + ["big"] * (64 - first[1])


def test_an_error_in_a_later_part_names_the_input(tiny_bundle, tmp_path, tok) -> None:
    """Through the server: 38 texts of 450 characters, then one too long (truncate=false):
    its part is not the first, and the error still names inputs[38]."""
    inputs = ["word " * 90] * 38 + [LONG, "ok"]
    parts = tok.job_parts(inputs, TOKENIZE_JOB_CHARS)
    assert parts[0][1] <= 38 and len(parts) > 1
    with ServeProcess(tiny_bundle, tmp_path / "serve.log", "--workers", "1") as srv:
        srv.wait_serving()
        stub = pb_grpc.EmbedderStub(grpc.insecure_channel(srv.target))
        with pytest.raises(grpc.RpcError) as exc:
            stub.Embed(pb.EmbedRequest(inputs=inputs, task=pb.TASK_NONE, truncate=False),
                       timeout=60)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith("inputs[38]: is "), exc.value.details()
