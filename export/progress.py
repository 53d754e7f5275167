"""Progress of long operations (export of a 475M model) as structured JSON lines on stderr."""

from __future__ import annotations

import time

from ..workers.logs import json_logger


class Progress:
    """Callable `(step, total, what)` that logs each step with elapsed seconds."""

    def __init__(self, name: str, event: str) -> None:
        self.log = json_logger(name)
        self.event = event
        self.t0 = time.perf_counter()

    def __call__(self, step: int, total: int, what: str) -> None:
        self.log.info(self.event, step=step, total=total, file=what,
                      percent=round(100.0 * step / max(total, 1), 1),
                      elapsed_s=round(time.perf_counter() - self.t0, 2))
