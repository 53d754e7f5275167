"""Traces, checked against a real OTLP/gRPC receiver (a TraceService server built from the
opentelemetry-proto stubs): the span tree of a unary call, a stream's requests and an HTTP call,
each continuing the caller's W3C trace, with the batch linked both ways."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest
import requests
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from moe_embed.testing.service import TASKS, ServerThread, free_port
from moe_embed.v1 import embedder_pb2 as pb

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def traceparent(trace_id: str, parent: str) -> str:
    return f"00-{trace_id}-{parent}-01"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects every exported span."""

    def __init__(self) -> None:
        self.spans: list = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 (the generated name)
        with self.lock:
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    self.spans.extend(ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture(scope="module")
def receiver():
    server = grpc.server(futures.ThreadPoolExecutor(2))
    collected = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collected, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield collected, port
    server.stop(0)


@pytest.fixture(scope="module")
def traced(tiny_bundle, receiver):
    """A server exporting to the receiver; its spans, once it has stopped (and flushed)."""
    collected, port = receiver
    srv = ServerThread(tiny_bundle, http_port=free_port(),
                       otlp_endpoint=f"http://127.0.0.1:{port}").start()
    unary_parent, http_parent = "00f067aa0ba902b7", "00f067aa0ba902b8"
    srv.stub().Embed(pb.EmbedRequest(inputs=["unary one", "unary two"], task=TASKS["none"]),
                     metadata=(("traceparent", traceparent(TRACE_ID, unary_parent)),),
                     timeout=60)
    stream = list(srv.stub().EmbedStream(
        iter([pb.EmbedRequest(id=f"s{i}", inputs=[f"stream {i}"], task=TASKS["none"])
              for i in range(2)]), timeout=60))
    assert [r.id for r in stream] and not any(r.HasField("error") for r in stream)
    r = requests.post(f"{srv.url}/v1/embeddings", json={"input": ["over http"]}, timeout=60,
                      headers={"traceparent": traceparent(TRACE_ID, http_parent)})
    assert r.status_code == 200
    srv.stop()  # flushes the exporter
    return collected.spans, unary_parent, http_parent


def _hex(b: bytes) -> str:
    return b.hex()


def _attrs(span) -> dict:
    out = {}
    for kv in span.attributes:
        v = kv.value
        out[kv.key] = v.string_value or v.int_value or v.bool_value or v.double_value
    return out


def _children(spans, parent) -> dict[str, list]:
    out: dict[str, list] = {}
    for s in spans:
        if s.parent_span_id == parent.span_id and s.trace_id == parent.trace_id:
            out.setdefault(s.name, []).append(s)
    return out


def _check_request(spans, request_span, inputs: int) -> None:
    """tokenize and queue under the request; a batch linked both ways, with its compute."""
    kids = _children(spans, request_span)
    assert set(kids) >= {"tokenize", "queue"}, set(kids)
    assert _attrs(kids["tokenize"][0])["inputs"] == inputs
    (queue,) = kids["queue"]
    assert queue.start_time_unix_nano >= request_span.start_time_unix_nano
    assert queue.end_time_unix_nano <= request_span.end_time_unix_nano
    linked = {link.span_id for link in request_span.links}
    batches = [s for s in spans if s.name == "batch" and s.span_id in linked]
    assert batches, "the request span links to its batch"
    for batch in batches:
        assert request_span.span_id in {link.span_id for link in batch.links}
        assert batch.parent_span_id == b"" and batch.trace_id != request_span.trace_id
        a = _attrs(batch)
        assert a["precision"] == "fp32" and a["inputs"] >= 1 and a["tokens"] >= a["inputs"]
        assert a["worker"] == 0 and a["attempts"] == 1 and a["requests"] >= 1
        (compute,) = _children(spans, batch)["worker.compute"]
        assert batch.start_time_unix_nano <= compute.start_time_unix_nano <= \
            compute.end_time_unix_nano <= batch.end_time_unix_nano


def _server_span_under(spans, parent: str):
    """The one server span continuing the caller's trace from span `parent`."""
    (server,) = [s for s in spans if _hex(s.trace_id) == TRACE_ID
                 and _hex(s.parent_span_id) == parent]
    assert server.kind == server.SPAN_KIND_SERVER
    return server


@pytest.mark.parametrize(("protocol", "name", "inputs"), [("grpc", "Embed", 2),
                                                          ("http", "/v1/embeddings", 1)])
def test_a_call_continues_the_callers_trace(traced, protocol, name, inputs) -> None:
    spans, unary_parent, http_parent = traced
    server = _server_span_under(spans, unary_parent if protocol == "grpc" else http_parent)
    assert name in server.name
    _check_request(spans, server, inputs=inputs)


def test_each_stream_request_has_its_own_span(traced) -> None:
    spans, _, _ = traced
    (stream,) = [s for s in spans if s.name.endswith("EmbedStream")]
    requests_ = _children(spans, stream)["EmbedStream.request"]
    assert sorted(_attrs(r)["request_id"] for r in requests_) == ["s0", "s1"]
    for r in requests_:
        _check_request(spans, r, inputs=1)


def test_off_by_default_nothing_is_exported(tiny_bundle, receiver) -> None:
    collected, _ = receiver
    before = len(collected.spans)
    srv = ServerThread(tiny_bundle).start()
    assert not srv.server.tracing.enabled
    srv.stub().Embed(pb.EmbedRequest(inputs=["x"], task=TASKS["none"]), timeout=60)
    srv.stop()
    assert len(collected.spans) == before
