"""The packages' layers point one way: protos -> service -> workers <- export, with no import
circle, and the protocol adapters beside the engine, not inside it. Read from the source (every
import, lazy ones inside functions included), so the test needs nothing installed but the code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"moe_embed.service": "service", "moe_embed.workers": "workers",
            "moe_embed.export": "export", "moe_embed.batch": "corpus",
            "moe_embed.testing": "tests/support"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports, resolved to absolute names (lazy imports included)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - node.level + 1]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    return {name: {m for m in _imports(name, path) if m in MODULES and m != name}
            for name, path in MODULES.items()}


GRAPH = _graph()


def _importers_of(target_prefix: str, within: str) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in GRAPH.items() if m.startswith(within)
                  for d in deps if d.startswith(target_prefix))


def test_the_graph_is_read():
    """A parser that resolved nothing would pass every rule below."""
    assert "moe_embed.workers.bundle.format" in GRAPH["moe_embed.service.engine"]
    assert "moe_embed.service.errors" in GRAPH["moe_embed.service.grpc_api"]
    assert "moe_embed.workers.runtime.router" in GRAPH["moe_embed.workers.runtime.runtime"]


@pytest.mark.parametrize("lower, upper", [
    ("moe_embed.workers", "moe_embed.service"),
    ("moe_embed.workers", "moe_embed.export"),
    ("moe_embed.workers", "moe_embed.batch"),
    ("moe_embed.service", "moe_embed.export"),
    ("moe_embed.service", "moe_embed.batch"),
    ("moe_embed.export", "moe_embed.service"),
    ("moe_embed.export", "moe_embed.batch"),
])
def test_a_layer_never_imports_one_above_or_beside_it(lower, upper):
    assert _importers_of(upper, lower) == []


@pytest.mark.parametrize("product", ["moe_embed.service", "moe_embed.workers",
                                     "moe_embed.export", "moe_embed.batch"])
def test_the_product_never_imports_the_test_helpers(product):
    """moe_embed.testing drives the product from outside (tests, benchmarks), never from in it."""
    assert _importers_of("moe_embed.testing", product) == []


def test_the_adapters_never_import_each_other():
    assert _importers_of("moe_embed.service.http", "moe_embed.service.grpc_api") == []
    assert _importers_of("moe_embed.service.grpc_api", "moe_embed.service.http") == []


@pytest.mark.parametrize("module", ["engine", "scheduler", "batching", "validation", "errors",
                                    "worker_pool", "tokenizer", "local"])
def test_the_engine_knows_no_protocol(module):
    name = f"moe_embed.service.{module}"
    imported = _imports(name, MODULES[name])
    assert not {m for m in imported if m.split(".")[0] in ("grpc", "fastapi", "starlette")
                or m.startswith(("moe_embed.v1", "moe_embed.service.http",
                                 "moe_embed.service.grpc_api", "moe_embed.service.wire"))}


def test_workers_speak_no_network_protocol():
    """A worker talks to its frontend over a pipe; it never loads grpc or the web stack."""
    assert sorted(f"{name} -> {m}" for name, path in MODULES.items()
                  if name.startswith("moe_embed.workers") for m in _imports(name, path)
                  if m.split(".")[0] in ("grpc", "fastapi", "starlette", "uvicorn")) == []


def test_no_import_circle():
    """Depth-first search over the whole project's module graph."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(GRAPH):
        if m not in state:
            assert (cycle := visit(m)) is None, " -> ".join(cycle)
