"""Mutation testing with cosmic-ray on the modules that decide correctness, each against its
own fast tests (`make mutation`; not part of `make test`).

Each target below is mutated in place, one mutation at a time, and its tests run; a mutant
that no test fails on is a survivor. Every survivor needs either a test that kills it or, if no
behaviour can observe it, a one-line reason in equivalent.py. The report
(benchmarks/mutation/REPORT.md) lists per module the mutants, the killed, the kill rate and
every survivor's diff with its reason (or NOT EXPLAINED). Each target's figures are kept in
results/NAME.json, so `--only` reruns some and the report still shows them all. The tree must
be clean for the mutated files: they are restored from git at the end, also after Ctrl-C.

    .venv/bin/python benchmarks/mutation/run.py [--only NAME ...] [--recheck] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from equivalent import ANY_MODULE, EQUIVALENT, REMOVED  # beside this script: sys.path[0]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

RESULTS = HERE / "results"
SESSIONS = HERE / "sessions"  # cosmic-ray databases: a stopped run resumes (ignored by git)
REPORT = HERE / "REPORT.md"
COMMAND = ".venv/bin/python benchmarks/mutation/run.py"
# the fast tests need no pytest plugin; loading the installed ones (schemathesis, hypothesis,
# anyio, ...) takes ~2.5 s, several times a mutant's own tests
TEST_ENV = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}


@dataclass(frozen=True)
class Target:
    """A module and the fast tests (files or node ids) that must notice any change to it."""

    module: str
    tests: tuple[str, ...]
    timeout_s: float = 60.0  # per mutant: a mutant that hangs its tests counts as killed


TARGETS: dict[str, Target] = {
    "policy": Target("workers/process/policy.py", ("tests/workers/test_policy.py",)),
    "pooling": Target("workers/runtime/pooling.py", ("tests/workers/test_pooling.py",)),
    "router": Target("workers/runtime/router.py", ("tests/workers/test_router.py",)),
    "chunks": Target("workers/runtime/chunks.py", ("tests/workers/test_chunks.py",)),
    "sessions": Target("workers/runtime/sessions.py", ("tests/workers/test_sessions.py",)),
    "protocol": Target("workers/process/protocol.py", ("tests/workers/test_protocol.py",)),
    "recipes": Target("workers/bundle/recipes.py", ("tests/workers/test_recipes.py",)),
    "format": Target("workers/bundle/format.py", ("tests/workers/test_bundle_format.py",)),
    "config": Target("workers/bundle/config.py", ("tests/workers/test_bundle_config.py",)),
    "security": Target("service/security.py", ("tests/service/test_security_files.py",)),
    "errors": Target("service/errors.py", ("tests/service/test_errors.py",)),
    "model_info": Target("service/model_info.py", ("tests/service/test_model_info.py",), 180.0),
    "batching": Target("service/batching.py", ("tests/service/test_service_batching.py",)),
}
CONFIG = """[cosmic-ray]
module-path = "{module}"
timeout = {timeout}
excluded-modules = []
test-command = "{python} -m pytest -x -q -p no:cacheprovider {tests}"

[cosmic-ray.distributor]
name = "local"
"""


def _outcomes(db: Path) -> tuple[int, int, int, list[str]]:
    """(mutants, killed, incompetent, survivors' diffs) of a finished cosmic-ray session."""
    with sqlite3.connect(db) as c:
        rows = c.execute("select test_outcome, diff from work_results").fetchall()
        total = c.execute("select count(*) from work_items").fetchone()[0]
    killed = sum(1 for outcome, _ in rows if outcome == "KILLED")
    incompetent = sum(1 for outcome, _ in rows if outcome == "INCOMPETENT")
    diffs = [diff for outcome, diff in rows if outcome == "SURVIVED"]
    return total, killed, incompetent, diffs


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()


def run(name: str, target: Target, work: Path) -> dict:
    """Mutate one module against its tests; the module is restored from git whatever happens.
    The tests must pass on the real code first, or every mutant would count as killed. A run
    stopped part way (Ctrl-C, a lost session) resumes where it was when started again, as long
    as the module and its tests are unchanged: cosmic-ray runs only the mutants not yet done."""
    test_cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                *target.tests]
    base = subprocess.run(test_cmd, cwd=REPO, capture_output=True, text=True, env=TEST_ENV)
    if base.returncode != 0:
        raise SystemExit(f"{name}: the tests fail on the real code:\n{base.stdout[-3000:]}")
    config, db = work / f"{name}.toml", work / f"{name}.sqlite"
    config.write_text(CONFIG.format(module=target.module, tests=" ".join(target.tests),
                                    python=sys.executable, timeout=target.timeout_s))
    cli = [sys.executable, "-m", "cosmic_ray.cli"]
    start = time.monotonic()
    stamp_path = work / f"{name}.stamp.json"
    stamp = {"sources": _git("hash-object", target.module, *_test_files(target)),
             "tests": list(target.tests)}
    done_before = 0.0
    if db.exists() and stamp_path.exists() and \
            json.loads(stamp_path.read_text())["stamp"] == stamp:
        done_before = json.loads(stamp_path.read_text())["seconds"]
        print(f"{name}: resuming the stopped run ({_pending(db)} mutants left)", flush=True)
    else:
        db.unlink(missing_ok=True)
        subprocess.run([*cli, "init", str(config), str(db)], cwd=REPO, check=True)
    try:
        subprocess.run([*cli, "exec", str(config), str(db)], cwd=REPO, check=True, env=TEST_ENV)
    finally:
        subprocess.run(["git", "checkout", "--", target.module], cwd=REPO, check=True)
        stamp_path.write_text(json.dumps({"stamp": stamp,
                                          "seconds": done_before + time.monotonic() - start}))
    total, killed, incompetent, diffs = _outcomes(db)
    return {"module": target.module, "tests": list(target.tests), "mutants": total,
            "killed": killed, "incompetent": incompetent, "survivors": diffs,
            "seconds": round(done_before + time.monotonic() - start),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "commit": _git("rev-parse", "--short", "HEAD")}


def _test_files(target: Target) -> list[str]:
    return sorted({t.split("::")[0] for t in target.tests})


def _pending(db: Path) -> int:
    with sqlite3.connect(db) as c:
        return c.execute("select count(*) from work_items where job_id not in "
                         "(select job_id from work_results)").fetchone()[0]


def _mutated(text: str, diff: str) -> str:
    """`text` with a survivor's one change (cosmic-ray's diffs have a trailing context line
    that `git apply` refuses at the end of a file, so the changed lines are put in by hand)."""
    lines = diff.splitlines()
    hunk = next(i for i, line in enumerate(lines) if line.startswith("@@"))
    first_line = int(lines[hunk].split()[1].split(",")[0].lstrip("-"))
    body = lines[hunk + 1:]
    offset = next(i for i, line in enumerate(body) if line[:1] in "+-")
    old = [line[1:] for line in body if line.startswith("-")]
    new = [line[1:] for line in body if line.startswith("+")]
    src = text.split("\n")
    at = first_line - 1 + offset
    if src[at:at + len(old)] != old:
        raise SystemExit(f"this survivor's lines are not in the module any more:\n{diff}")
    src[at:at + len(old)] = new
    return "\n".join(src)


def recheck(name: str, target: Target) -> dict:
    """Run the target's tests (as they are now) on each stored survivor again, the module
    mutated by the survivor's own diff: a quick confirmation that new tests kill them, without
    re-running the mutants already killed (tests are only ever added, so a killed mutant stays
    killed while the module is unchanged). The module must be unchanged since the full run."""
    path = RESULTS / f"{name}.json"
    r = json.loads(path.read_text())
    changed = _git("log", "--oneline", f"{r['commit']}..HEAD", "--", target.module)
    if changed:
        raise SystemExit(f"{name}: {target.module} changed since the full run; run it again")
    test_cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                *target.tests]
    left, start = [], time.monotonic()
    original = (REPO / target.module).read_text()
    for diff in r["survivors"]:
        try:
            (REPO / target.module).write_text(_mutated(original, diff))
            try:
                proc = subprocess.run(test_cmd, cwd=REPO, capture_output=True, text=True,
                                      env=TEST_ENV, timeout=target.timeout_s)
                killed = proc.returncode != 0
            except subprocess.TimeoutExpired:
                killed = True
        finally:
            subprocess.run(["git", "checkout", "--", target.module], cwd=REPO, check=True)
        if not killed:
            left.append(diff)
    r["killed"] += len(r["survivors"]) - len(left)
    r["survivors"] = left
    r["tests"] = list(target.tests)
    r["rechecked"] = (f"{time.strftime('%Y-%m-%d %H:%M')} @{_git('rev-parse', '--short', 'HEAD')}"
                      f", {round(time.monotonic() - start)} s")
    return r


def _changed_lines(diff: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    lines = diff.splitlines()
    old = tuple(x[1:].strip() for x in lines if x.startswith("-") and not x.startswith("---"))
    new = tuple(x[1:].strip() for x in lines if x.startswith("+") and not x.startswith("+++"))
    return old, new


def explanation(module: str, diff: str) -> str | None:
    """The reason equivalent.py gives for this survivor (matched on its changed lines)."""
    old, new = _changed_lines(diff)
    for e_old, e_new, why in EQUIVALENT.get(module, ()):
        if (e_old,) == old and (e_new,) == new:
            return why
    for e_old, why in REMOVED.get(module, ()):  # a line taken out (a decorator)
        if not new and tuple(x for x in old if x) == (e_old,):
            return why
    if len(old) == len(new) == 1:
        for rule, why in ANY_MODULE:
            if rule(module, old[0], new[0]):
                return why
    return None


def _cpu() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                  if ln.startswith("model name")), platform.processor() or "?")
    flags = next((set(ln.split(":", 1)[1].split()) for ln in info.splitlines()
                  if ln.startswith("flags")), set())
    have = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8")
            if f in flags]
    return f"{model}, {len(os.sched_getaffinity(0))} cores, flags: {', '.join(have) or 'none'}"


def _in_annotation(module: str, diff: str) -> bool:
    old, new = _changed_lines(diff)
    return len(old) == len(new) == 1 and ANY_MODULE[0][0](module, old[0], new[0])


def report() -> str:
    """REPORT.md from the stored results of every target."""
    lines = ["# Mutation testing report", "",
             f"Command: `{COMMAND}` (cosmic-ray; `--only NAME ...` for some targets). "
             f"Report written {time.strftime('%Y-%m-%d %H:%M %Z')}.", "",
             f"CPU: {_cpu()}.", "",
             "Each module is mutated against its own fast tests only. A run marked "
             "\"survivors rechecked\" ran every mutant once, then its survivors again "
             "(`--recheck`) after tests were added. cosmic-ray also mutates type annotations "
             "(`int | None` -> `int - None`), which these modules never evaluate (they import "
             "annotations from __future__): those are counted apart. Kill rate = killed / "
             "(mutants - in annotations); score = killed / (mutants - every equivalent), the "
             "usual mutation score. Every other survivor is listed with the reason no "
             "behaviour can observe it (benchmarks/mutation/equivalent.py), or NOT "
             "EXPLAINED.", "",
             "| module | tests | mutants | in annotations | killed | kill rate | "
             "other equivalent | score | not explained | seconds | run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    sections, missing = [], []
    sums = {"mutants": 0, "annotations": 0, "killed": 0, "equivalent": 0, "unexplained": 0}
    for name in TARGETS:
        path = RESULTS / f"{name}.json"
        if not path.exists():
            missing.append(name)
            continue
        r = json.loads(path.read_text())
        annotations = [d for d in r["survivors"] if _in_annotation(r["module"], d)]
        why = [(d, explanation(r["module"], d)) for d in r["survivors"]
               if not _in_annotation(r["module"], d)]
        equivalent = sum(1 for _, w in why if w)
        unexplained = len(why) - equivalent
        mutants = r["mutants"] - len(annotations)
        rate = r["killed"] / mutants if mutants else 1.0
        score = r["killed"] / (mutants - equivalent) if mutants > equivalent else 1.0
        tests = "<br>".join(f"`{t}`" for t in r["tests"])
        run_at = f"{r['date']} @{r['commit']}"
        if r.get("rechecked"):
            run_at += f"; survivors rechecked {r['rechecked']}"
        if r.get("not_run"):
            run_at += (f"; **stopped early: {r['not_run']} more mutants not run** (the "
                       "figures are of the mutants run)")
        lines.append(f"| `{r['module']}` | {tests} | {r['mutants']} | {len(annotations)} | "
                     f"{r['killed']} | {rate:.1%} | {equivalent} | {score:.1%} | "
                     f"{unexplained} | {r['seconds']} | {run_at} |")
        for key, value in (("mutants", r["mutants"]), ("annotations", len(annotations)),
                           ("killed", r["killed"]), ("equivalent", equivalent),
                           ("unexplained", unexplained)):
            sums[key] += value
        if annotations:
            changed = sorted({_changed_lines(d)[0][0] for d in annotations})
            sections += [f"`{r['module']}`: {len(annotations)} mutants of the type annotations "
                         f"on {len(changed)} line{'s' * (len(changed) != 1)} (never "
                         "evaluated):", "",
                         *[f"    {line}" for line in changed], ""]
        for diff, w in why:
            sections += [f"`{r['module']}`: {w or '**NOT EXPLAINED**'}", "", "```diff",
                         diff.strip(), "```", ""]
    mutants = sums["mutants"] - sums["annotations"]
    rate = sums["killed"] / mutants if mutants else 1.0
    score = sums["killed"] / (mutants - sums["equivalent"]) if mutants > sums["equivalent"] \
        else 1.0
    lines += ["", f"Overall: {sums['mutants']} mutants, {sums['annotations']} of them in type "
              f"annotations; of the other {mutants}, {sums['killed']} killed (kill rate "
              f"{rate:.1%}), {sums['equivalent']} explained as equivalent (score {score:.1%}), "
              f"{sums['unexplained']} not explained."]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}."]
    lines += ["", "## Survivors", "", *(sections or ["None."])]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", choices=sorted(TARGETS))
    p.add_argument("--report-only", action="store_true",
                   help="rewrite REPORT.md from the stored results, run nothing")
    p.add_argument("--recheck", action="store_true",
                   help="run only the stored survivors of the chosen targets again")
    args = p.parse_args(argv)
    names = [] if args.report_only else (args.only or list(TARGETS))
    dirty = _git("status", "--porcelain", "--", *[TARGETS[n].module for n in names]) \
        if names else ""
    if dirty:
        print(f"commit or stash these first (they are restored from git):\n{dirty}")
        return 2
    RESULTS.mkdir(exist_ok=True)
    SESSIONS.mkdir(exist_ok=True)
    for name in names:
        r = recheck(name, TARGETS[name]) if args.recheck else run(name, TARGETS[name], SESSIONS)
        (RESULTS / f"{name}.json").write_text(json.dumps(r, indent=1) + "\n")
        print(f"{r['module']}: {r['killed']}/{r['mutants']} killed, "
              f"{len(r['survivors'])} survived ({r['seconds']} s)", flush=True)
    REPORT.write_text(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
