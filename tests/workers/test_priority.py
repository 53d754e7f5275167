"""Workers run a few nice steps below the frontend (workers/process/priority.py): every thread
of the process, the ones started before the call and after it, in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from moe_embed.workers.process import priority

_SCRIPT = textwrap.dedent("""
    import json, os, sys, threading
    from moe_embed.workers.process.priority import lower_priority
    stop = threading.Event()
    before = threading.Thread(target=stop.wait)
    before.start()
    base = os.getpriority(os.PRIO_PROCESS, 0)
    now = lower_priority(int(sys.argv[1]))
    after = threading.Thread(target=stop.wait)
    after.start()
    nice = {t: int(open(f"/proc/self/task/{t}/stat").read().rsplit(")", 1)[1].split()[16])
            for t in os.listdir("/proc/self/task")}
    stop.set()
    print(json.dumps({"base": base, "now": now, "nice": sorted(nice.values())}))
""")


def _run(steps: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(steps)], capture_output=True,
                         text=True, check=True, timeout=60)
    return json.loads(out.stdout)


@pytest.mark.parametrize("steps", [0, 3])
def test_every_thread_runs_steps_below(steps: int) -> None:
    r = _run(steps)
    want = min(priority.MAX_NICE, r["base"] + steps)
    assert r["now"] == want
    assert r["nice"] == [want] * 3, r  # main, the thread from before, the one from after


def test_niceness_stops_at_the_kernels_limit() -> None:
    r = _run(50)
    assert r["now"] == priority.MAX_NICE and set(r["nice"]) == {priority.MAX_NICE}


def test_a_negative_step_is_refused() -> None:
    with pytest.raises(ValueError):
        priority.lower_priority(-1)
