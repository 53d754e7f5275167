"""The end of a script that checks targets: the report as JSON, one PASS/MISS line a verdict,
the report written to --out, and the exit status (1 when any target is missed)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


def finish(report: dict, verdicts: Iterable[tuple[str, str, bool]], out: Path | None) -> int:
    print(json.dumps(report, indent=1))
    ok = True
    for name, value, passed in verdicts:
        ok &= passed
        print(f"{'PASS' if passed else 'MISS':>4}  {name}: {value}")
    if out:
        out.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if ok else 1
