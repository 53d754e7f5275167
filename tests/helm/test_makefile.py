"""`make install` (and so `make serve`, `make test`) installs torch's CPU-only build on Linux.

The install recipe runs for real under make, with a stand-in `pip` first in its bin directory
that records its arguments (installing torch here would take minutes and the network): once
as on this machine, where pip finds a CPU wheel of the pinned torch itself, once as on a user's
machine, where only PyTorch's CPU index has one.
"""

from __future__ import annotations

import platform
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

from moe_embed.testing.helm_image import dockerfile_stages

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

RECORDING_PIP = """#!/bin/sh
echo "$*" >> "$PIP_LOG"
case "$*" in
  *+cpu*) [ -z "$NO_LOCAL_CPU_WHEEL" ] ;;
esac
"""


def run_install(tmp_path: Path, *make_args: str, local_cpu_wheel: bool) -> list[list[str]]:
    """The pip commands `make install` runs, in order."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to("/bin/true")  # the venv "exists": make skips creating it
    (bin_dir / "pip").write_text(RECORDING_PIP)
    (bin_dir / "pip").chmod(0o755)
    log = tmp_path / "pip.log"
    env = {"PATH": "/usr/bin:/bin", "PIP_LOG": str(log)}
    if not local_cpu_wheel:
        env["NO_LOCAL_CPU_WHEEL"] = "1"
    proc = subprocess.run(
        ["make", "-B", "install", f"BIN={bin_dir}", f"STAMP={tmp_path / 'stamp'}", *make_args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [shlex.split(line) for line in log.read_text().splitlines()]


def torch_pin() -> str:
    (pin,) = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch")]
    return pin.replace(" ", "")


def dockerfile_torch_index() -> str:
    (line,) = [rest for stage in dockerfile_stages()[:1] for ins, rest in stage
               if ins == "RUN" and "torch" in rest]
    args = shlex.split(line)
    return args[args.index("--index-url") + 1]


pytestmark = pytest.mark.skipif(platform.system() != "Linux", reason="the CPU index is for Linux")


def test_cpu_wheel_pip_finds_is_taken_without_the_index(tmp_path: Path) -> None:
    calls = run_install(tmp_path, local_cpu_wheel=True)
    assert len(calls) == 2, calls
    torch, package = calls
    assert f"{torch_pin()}+cpu" in torch and "--index-url" not in torch
    assert "-e" in package and package[-1].startswith(".[")


def test_without_a_cpu_wheel_torch_comes_from_the_cpu_index(tmp_path: Path) -> None:
    calls = run_install(tmp_path, local_cpu_wheel=False)
    assert len(calls) == 3, calls
    local, torch, package = calls
    assert f"{torch_pin()}+cpu" in local
    assert torch[torch.index("--index-url") + 1] == dockerfile_torch_index()  # as the image
    assert torch_pin() in torch
    assert "-e" in package  # after torch: the package's own torch pin is then satisfied


def test_empty_torch_index_leaves_torch_to_pip(tmp_path: Path) -> None:
    (package,) = run_install(tmp_path, "TORCH_INDEX=", local_cpu_wheel=False)
    assert "-e" in package
