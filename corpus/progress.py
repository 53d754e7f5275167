"""A job's progress: a tqdm bar on a terminal, JSON lines on stderr otherwise, or nothing.

Rows and tokens count this run's committed work; the ETA comes from how far through the input
file the reader is (bytes, or rows for Parquet), so it needs no row count up front.
"""

from __future__ import annotations

import sys
import time

from moe_embed.workers.logs import json_logger

JSON_INTERVAL_S = 10.0


class JobProgress:
    def __init__(self, mode: str, done_rows: int = 0, start_fraction: float = 0.0,
                 interval_s: float = JSON_INTERVAL_S) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "json"
        self.mode = mode
        self.interval_s = interval_s
        self.t0 = time.monotonic()
        self.start_fraction = start_fraction
        self.resumed_rows = done_rows
        self.rows = self.output_rows = self.tokens = 0
        self.fraction = start_fraction
        self._last_json = self.t0
        self.log = json_logger("moe_embed.batch")
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=100.0, initial=round(100 * start_fraction, 1), unit="%",
                            bar_format="{l_bar}{bar}| {n:.1f}% [{elapsed}<{remaining}"
                                       "{postfix}]", file=sys.stderr)

    def _figures(self) -> dict:
        elapsed = time.monotonic() - self.t0
        done = self.fraction - self.start_fraction
        eta = elapsed / done * (1 - self.fraction) if done > 0 else None
        return {"rows": self.resumed_rows + self.rows, "rows_this_run": self.rows,
                "output_rows": self.output_rows, "tokens": self.tokens,
                "tokens_per_s": round(self.tokens / elapsed, 1) if elapsed > 0 else 0.0,
                "percent": round(100 * self.fraction, 2), "elapsed_s": round(elapsed, 2),
                "eta_s": round(eta, 1) if eta is not None else None}

    def update(self, rows: int, output_rows: int, tokens: int, fraction: float) -> None:
        """Add one committed shard's figures; `fraction` of the input has been read."""
        self.rows += rows
        self.output_rows += output_rows
        self.tokens += tokens
        self.fraction = max(self.fraction, fraction)
        if self.bar is not None:
            f = self._figures()
            self.bar.set_postfix_str(f"{f['rows']} rows, {f['tokens_per_s']:.0f} tok/s",
                                     refresh=False)
            self.bar.update(round(100 * self.fraction, 1) - self.bar.n)
        elif self.mode == "json" and time.monotonic() - self._last_json >= self.interval_s:
            self._last_json = time.monotonic()
            self.log.info("batch.progress", **self._figures())

    def close(self, outcome: str) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.mode != "quiet":
            self.log.info("batch." + outcome, **self._figures())
