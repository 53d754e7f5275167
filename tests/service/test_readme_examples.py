"""README's examples of calling the service run as written (but for the ports) against a real
server on the demo-sized model: each Python block of "Calling the service" as its own process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from moe_embed.testing.service import ServerThread, free_port

README = Path(__file__).resolve().parents[2] / "README.md"


def _blocks() -> list[str]:
    text = README.read_text()
    section = text.split("## Calling the service", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def server(tiny_bundle):
    srv = ServerThread(tiny_bundle, http_port=free_port()).start()
    yield srv
    srv.stop()


def test_the_section_has_its_examples() -> None:
    blocks = _blocks()
    assert len(blocks) >= 4
    assert any("from openai import OpenAI" in b for b in blocks)
    assert any("EmbedStream" in b for b in blocks)


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_each_python_example_runs_as_written(server, tmp_path, index) -> None:
    code = _blocks()[index].replace("localhost:8080", f"localhost:{server.server.http_port}")
    code = code.replace("localhost:50051", f"localhost:{server.server.port}")
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, f"{code}\n{proc.stderr[-3000:]}"
