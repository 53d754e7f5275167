"""Reads the Dockerfile's instructions, so tests can check what the image runs.

No docker engine runs in the tests: the Dockerfile is read, not built. A stage built
`FROM` an earlier stage starts with that stage's instructions, as the image it builds does.
"""

from __future__ import annotations

import re

from .helm_chart import REPO


def dockerfile_named_stages() -> dict[str, list[tuple[str, str]]]:
    """Stages by name (`FROM ... AS name`; unnamed stages by index), in file order, each a
    list of (INSTRUCTION, arguments) including those inherited from an earlier stage."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            words = rest.split()
            base = next(w for w in words if not w.startswith("--"))
            name = words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else str(len(stages))
            current = stages[name] = list(stages.get(base, []))
        if current is not None:
            current.append((instruction, rest))
    return stages


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Stages of the Dockerfile in file order; the last one is what `docker build .` builds."""
    return list(dockerfile_named_stages().values())


def last(stage: list[tuple[str, str]], instruction: str) -> str:
    found = [rest for ins, rest in stage if ins == instruction]
    assert found, f"stage has no {instruction}"
    return found[-1]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker reads it: `*` and `?` stop at `/`, `**` does not."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):  # `**/` may also match no directory at all
                out = out[:-2] + "(?:.*/)?"
                i += 1
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + "$")


def dockerignored(path: str) -> bool:
    """Whether `path` (relative to the build context) is left out of it by .dockerignore: the
    last pattern matching the path or one of its parent directories decides (`!` re-includes)."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((negated, _pattern_regex(line.lstrip("!").strip("/"))))
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for negated, regex in rules:
        if any(regex.match(p) for p in prefixes):
            ignored = not negated
    return ignored
