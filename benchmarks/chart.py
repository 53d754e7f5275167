"""ratios.png: every target ratio of the run as a bar against its target line."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from targets import Target, evaluate  # noqa: E402


def _context(res: dict) -> list[tuple[str, float]]:
    """The peers' own fractions of peak/roofline, for scale (no target)."""
    out = []
    for w, key, what in (("W1", "frac_bandwidth", "of roofline"),
                         ("W2", "frac_sgemm_peak", "of sgemm peak"),
                         ("W3", "frac_sgemm_peak", "of sgemm peak")):
        for peer in ("all-experts", "torch"):
            v = res.get(w, {}).get(peer, {}).get(key)
            if v is not None:
                out.append((f"{w} {peer} {what}", v))
    return out


def write_chart(res: dict, path: Path) -> None:
    targets: list[Target] = [t for t in evaluate(res) if t.unit != "ms"]
    bars = [(f"{t.workload} {t.what}", t.value, t.threshold, t.passed) for t in targets]
    bars += [(label, v, None, None) for label, v in _context(res)]
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(bars) + 1.5))
    colors = {True: "#2e8b57", False: "#c0392b", None: "#999999"}
    for i, (_, value, threshold, passed) in enumerate(bars):
        v = value or 0.0
        ax.barh(i, v, color=colors[passed] if value is not None else "#dddddd")
        ax.text(v, i, f" {v:.2f}" if value is not None else " n/a", va="center", fontsize=8)
        if threshold is not None:
            ax.plot([threshold, threshold], [i - 0.4, i + 0.4], color="black", lw=2)
    ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ratio (fractions of peak/roofline as 0..1); black tick = target")
    m = res["meta"]
    ax.set_title(f"moe-embed vs peers, {m['threads']} threads, load {m['load_start']['1m']:.2f}"
                 f"{' (quick)' if m['quick'] else ''}: green PASS, red MISS", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
