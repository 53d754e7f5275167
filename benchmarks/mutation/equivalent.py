"""Survivors of the mutation run (run.py) that no behaviour can observe, each with its reason.

module -> [(the line as the mutant removes it, the line it puts instead, why it is equivalent)],
lines stripped of their indentation. run.py matches every survivor's diff against these; one
that matches none is reported NOT EXPLAINED: it needs a test that kills it, or a reason here.
"""

from __future__ import annotations

EQUIVALENT: dict[str, list[tuple[str, str, str]]] = {
}
