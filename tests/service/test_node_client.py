"""Clients outside Python: the .proto is all another language needs.

A Node client (@grpc/grpc-js, with the code generated at run time from protos/ by
@grpc/proto-loader) calls a real `moe-embed serve` and must get what the Python client gets.
The npm packages are pinned in tests/node/package-lock.json and installed from the npm
registry into tests/node/node_modules (ignored by git) the first time this runs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from moe_embed.testing.service import ServeProcess, vectors
from moe_embed.v1 import embedder_pb2 as pb
from moe_embed.v1 import embedder_pb2_grpc as pb_grpc

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
INPUTS = ["hello world", "grpc from node", "ünïcödé 日本語"]


def npm_installed() -> Path:
    """`npm ci` into tests/node when node_modules is missing or older than the lock file."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not (node and npm):
        pytest.fail("node and npm are needed (apt-get install nodejs npm)", pytrace=False)
    stamp = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    if not stamp.exists() or stamp.stat().st_mtime < lock.stat().st_mtime:
        proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR,
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, f"npm ci failed:\n{proc.stdout}{proc.stderr}"
    return Path(node)


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    log = tmp_path_factory.mktemp("node") / "serve.log"
    with ServeProcess(tiny_bundle, log) as serving:
        yield serving.wait_serving()


def test_node_client_generated_from_the_proto_calls_the_service(server: ServeProcess) -> None:
    node = npm_installed()
    request = {"inputs": INPUTS, "task": "TASK_SEARCH_DOCUMENT", "dimensions": 0}
    proc = subprocess.run([str(node), str(NODE_DIR / "embed_client.js"), server.target,
                           json.dumps(request)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)

    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        info = stub.Info(pb.InfoRequest(), timeout=30)
        expected = stub.Embed(pb.EmbedRequest(inputs=INPUTS, task=pb.TASK_SEARCH_DOCUMENT),
                              timeout=60)

    for field in pb.InfoResponse.DESCRIPTOR.fields:  # every field, as Python reads it
        assert got["info"][field.name] == getattr(info, field.name), field.name
    embed = got["embed"]
    assert embed["dimensions"] == expected.dimensions == info.dimensions
    assert embed["token_counts"] == list(expected.token_counts)
    node_vectors = np.array([e["values"] for e in embed["embeddings"]], dtype=np.float32)
    np.testing.assert_allclose(node_vectors, vectors(expected), rtol=0, atol=1e-5)
    # the stream answers every request by its id, one input each
    streamed = {r["id"]: r for r in got["streamed"]}
    assert sorted(streamed) == [f"n{i}" for i in range(len(INPUTS))]
    for i in range(len(INPUTS)):
        reply = streamed[f"n{i}"]
        assert reply["error"] is None and len(reply["embeddings"]) == 1
        np.testing.assert_allclose(reply["embeddings"][0]["values"], node_vectors[i], atol=1e-5)
    # a request without a task is refused as the contract says
    assert got["refused"]["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_proto_declares_packages_for_go_and_java() -> None:
    """`protoc --go_out` and `--java_out` need these to place the code; Java gets one file per
    message, enum and service."""
    options = pb.DESCRIPTOR.GetOptions()
    package = pb.DESCRIPTOR.package
    assert options.go_package.split(";")[0].endswith(package.replace(".", "/"))
    assert options.go_package.split(";")[1].isidentifier()  # the Go package name
    assert options.java_package.endswith(package)
    assert options.java_multiple_files is True
    assert options.java_outer_classname
