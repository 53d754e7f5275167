"""The committed gRPC code is what `make protos` generates from protos/ right now."""

from __future__ import annotations

from pathlib import Path

from moe_embed.service import protogen


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    written = protogen.generate(tmp_path)
    assert len(written) == 3 * len(protogen.PROTO_FILES)
    for path in written:
        rel = path.relative_to(tmp_path)
        committed = protogen.PROTO_ROOT / rel
        assert committed.is_file(), f"{rel} is missing: run `make protos`"
        assert committed.read_bytes() == path.read_bytes(), \
            f"{rel} is out of date with its .proto: run `make protos`"


def test_contract_names() -> None:
    from moe_embed.v1 import embedder_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["Embedder"]
    assert service.full_name == "moe_embed.v1.Embedder"
    assert {m.name for m in service.methods} == {"Embed", "EmbedStream", "Tokenize", "Info"}
    stream = service.methods_by_name["EmbedStream"]
    assert stream.client_streaming and stream.server_streaming
