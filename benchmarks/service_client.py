"""Clients of the service as a user runs it (`moe-embed serve` in its own process, started by
moe_embed.testing.service.ServeProcess): closed-loop unary callers, a burst of concurrent
requests and a windowed bidi stream, every response checked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from moe_embed.service.wire import PROTO_OF_TASK
from moe_embed.v1 import embedder_pb2 as pb
from moe_embed.v1 import embedder_pb2_grpc as pb_grpc

TASKS = PROTO_OF_TASK  # API name -> proto enum (the one map, beside the gRPC adapter)


def request(text: str, task: str, rid: str = "") -> pb.EmbedRequest:
    return pb.EmbedRequest(id=rid, inputs=[text], task=TASKS[task])


def _check(resp: pb.EmbedResponse, expect_tokens: int | None) -> int:
    if resp.HasField("error") and resp.error.code:
        raise RuntimeError(f"request {resp.id} failed: {resp.error.code} {resp.error.message}")
    if expect_tokens is not None and resp.total_tokens != expect_tokens:
        raise RuntimeError(f"request {resp.id}: the service saw {resp.total_tokens} tokens, "
                           f"the in-process peers {expect_tokens}: inputs differ")
    return resp.total_tokens


def unary_stub(target: str) -> tuple[grpc.Channel, pb_grpc.EmbedderStub]:
    ch = grpc.insecure_channel(target)
    return ch, pb_grpc.EmbedderStub(ch)


@dataclass
class LoadResult:
    wall_s: float
    latencies_s: list[float] = field(default_factory=list)
    tokens: int = 0

    @property
    def requests(self) -> int:
        return len(self.latencies_s)


async def _burst(target: str, reqs: Sequence[pb.EmbedRequest], tokens: Sequence[int]) -> LoadResult:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.EmbedderStub(ch)

        async def one(r: pb.EmbedRequest, n: int) -> tuple[float, int]:
            t = time.perf_counter()
            resp = await stub.Embed(r, timeout=600)
            return time.perf_counter() - t, _check(resp, n)

        t0 = time.perf_counter()
        done = await asyncio.gather(*(one(r, n) for r, n in zip(reqs, tokens, strict=True)))
        wall = time.perf_counter() - t0
    return LoadResult(wall, [d[0] for d in done], sum(d[1] for d in done))


def burst(target: str, reqs: Sequence[pb.EmbedRequest], tokens: Sequence[int]) -> LoadResult:
    """Every request in flight at once; wall time from the first send to the last reply."""
    return asyncio.run(_burst(target, reqs, tokens))


async def _closed_loop(target: str, clients: int, reqs: Sequence[pb.EmbedRequest],
                       tokens: Sequence[int], warmup_s: float, duration_s: float) -> LoadResult:
    channels = [grpc.aio.insecure_channel(target) for _ in range(clients)]
    start = time.perf_counter()
    t_measure, t_end = start + warmup_s, start + warmup_s + duration_s
    result = LoadResult(duration_s)

    async def client(c: int) -> None:
        stub = pb_grpc.EmbedderStub(channels[c])
        i = c
        while True:
            j = i % len(reqs)
            t = time.perf_counter()
            if t >= t_end:
                return
            resp = await stub.Embed(reqs[j], timeout=600)
            done = time.perf_counter()
            n = _check(resp, tokens[j])
            if t_measure <= done <= t_end:
                result.latencies_s.append(done - t)
                result.tokens += n
            i += clients

    try:
        await asyncio.gather(*(client(c) for c in range(clients)))
    finally:
        for ch in channels:
            await ch.close()
    return result


def closed_loop(target: str, clients: int, reqs: Sequence[pb.EmbedRequest],
                tokens: Sequence[int], warmup_s: float, duration_s: float) -> LoadResult:
    """`clients` callers, each on its own channel, sending the next request when the last one
    returns; the requests that complete inside the measuring window (after the warm-up) count."""
    return asyncio.run(_closed_loop(target, clients, reqs, tokens, warmup_s, duration_s))


async def _stream(target: str, n: int, window: int, reqs: Sequence[pb.EmbedRequest],
                  tokens: Sequence[int]) -> LoadResult:
    async with grpc.aio.insecure_channel(target) as ch:
        call = pb_grpc.EmbedderStub(ch).EmbedStream(timeout=600)
        slots = asyncio.Semaphore(window)
        sent: dict[str, tuple[float, int]] = {}
        result = LoadResult(0.0)

        async def writer() -> None:
            for i in range(n):
                await slots.acquire()
                r = pb.EmbedRequest()
                r.CopyFrom(reqs[i % len(reqs)])
                r.id = str(i)
                sent[r.id] = (time.perf_counter(), tokens[i % len(reqs)])
                await call.write(r)
            await call.done_writing()

        t0 = time.perf_counter()
        w = asyncio.create_task(writer())
        for _ in range(n):
            resp = await call.read()
            if resp is grpc.aio.EOF:
                raise RuntimeError(f"stream ended after {result.requests} of {n} responses")
            t_sent, expect = sent.pop(resp.id)
            result.latencies_s.append(time.perf_counter() - t_sent)
            result.tokens += _check(resp, expect)
            slots.release()
        result.wall_s = time.perf_counter() - t0
        await w
    return result


def stream(target: str, n: int, window: int, reqs: Sequence[pb.EmbedRequest],
           tokens: Sequence[int]) -> LoadResult:
    """One EmbedStream carrying `n` requests with at most `window` in flight; every response is
    matched to its request by id."""
    return asyncio.run(_stream(target, n, window, reqs, tokens))
