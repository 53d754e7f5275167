"""Mutation testing with cosmic-ray on the modules that decide correctness, each against its
own fast tests (`make mutation`; not part of `make test`).

Each target below is mutated in place, one mutation at a time, and its tests run; a mutant
that no test fails on is a survivor. The report (benchmarks/mutation/REPORT.md) lists the kill
rate per module and every survivor's diff, for a new test or an explanation of why it is
equivalent. The tree must be clean for the mutated files: they are restored from git at the end,
also after Ctrl-C.

    .venv/bin/python benchmarks/mutation/run.py [--only NAME ...]
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# name: (module, its fast tests)
TARGETS = {
    "policy": ("workers/process/policy.py", "tests/workers/test_policy.py"),
    "pooling": ("workers/runtime/pooling.py", "tests/workers/test_pooling.py"),
    "router": ("workers/runtime/router.py", "tests/workers/test_router.py"),
    "protocol": ("workers/process/protocol.py", "tests/workers/test_protocol.py"),
    "errors": ("service/errors.py", "tests/service/test_errors.py"),
    "model_info": ("service/model_info.py", "tests/service/test_model_info.py"),
    "batching": ("service/batching.py", "tests/service/test_service_batching.py"),
}
CONFIG = """[cosmic-ray]
module-path = "{module}"
timeout = 120.0
excluded-modules = []
test-command = "{python} -m pytest -x -q -p no:cacheprovider {tests}"

[cosmic-ray.distributor]
name = "local"
"""


def _survivors(db: Path) -> tuple[int, int, list[str]]:
    with sqlite3.connect(db) as c:
        rows = c.execute("select test_outcome, diff from work_results").fetchall()
    killed = sum(1 for outcome, _ in rows if outcome == "KILLED")
    diffs = [diff for outcome, diff in rows if outcome == "SURVIVED"]
    return killed, len(rows), diffs


def run(name: str, module: str, tests: str, work: Path) -> tuple[int, int, list[str]]:
    config, db = work / f"{name}.toml", work / f"{name}.sqlite"
    config.write_text(CONFIG.format(module=module, tests=tests, python=sys.executable))
    cli = [sys.executable, "-m", "cosmic_ray.cli"]
    subprocess.run([*cli, "init", str(config), str(db)], cwd=REPO, check=True)
    try:
        subprocess.run([*cli, "exec", str(config), str(db)], cwd=REPO, check=True)
    finally:
        subprocess.run(["git", "checkout", "--", module], cwd=REPO, check=True)
    return _survivors(db)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", choices=sorted(TARGETS))
    args = p.parse_args(argv)
    names = args.only or list(TARGETS)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *[TARGETS[n][0] for n in names]],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout
    if dirty:
        print(f"commit or stash these first (they are restored from git):\n{dirty}")
        return 2
    lines = ["# Mutation testing report", "",
             f"`.venv/bin/python benchmarks/mutation/run.py` (cosmic-ray), "
             f"{time.strftime('%Y-%m-%d')}.", "",
             "| module | tests | mutants | killed | kill rate |", "|---|---|---|---|---|"]
    survivors = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            module, tests = TARGETS[name]
            killed, total, diffs = run(name, module, tests, Path(tmp))
            rate = killed / total if total else 1.0
            lines.append(f"| `{module}` | `{tests}` | {total} | {killed} | {rate:.1%} |")
            survivors += [(module, d) for d in diffs]
            print(f"{module}: {killed}/{total} killed", flush=True)
    lines += ["", "## Survivors", ""]
    for module, diff in survivors:
        lines += [f"`{module}`:", "", "```diff", diff.strip(), "```", ""]
    (REPO / "benchmarks" / "mutation" / "REPORT.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
