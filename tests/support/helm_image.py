"""Reads the Dockerfile's instructions, so tests can check what the image runs."""

from __future__ import annotations

import re

from .helm_chart import REPO


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Stages of the Dockerfile, each a list of (INSTRUCTION, arguments)."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, rest.strip()))
    return stages


def last(stage: list[tuple[str, str]], instruction: str) -> str:
    found = [rest for ins, rest in stage if ins == instruction]
    assert found, f"stage has no {instruction}"
    return found[-1]
