"""The benchmark targets, evaluated on one run's results (ratios measured in the same run)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Target:
    workload: str
    what: str  # the figure, in words
    target: str  # the target, in words
    value: float | None
    threshold: float
    higher_is_better: bool = True
    unit: str = "x"  # "x" ratio, "%" fraction shown as percent, "ms" absolute

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        return (self.value >= self.threshold if self.higher_is_better
                else self.value <= self.threshold)

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "MISS", None: "n/a"}[self.passed]


def _get(res: dict, *keys: str) -> Any:
    for k in keys:
        if not isinstance(res, dict) or k not in res:
            return None
        res = res[k]
    return res


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _worst_text_ratio(res: dict) -> float | None:
    """min over texts of (all-experts p50 / routed p50): >= 1 means never slower."""
    fast = _get(res, "W1", "routed", "per_text_p50_ms")
    slow = _get(res, "W1", "all-experts", "per_text_p50_ms")
    if not fast or not slow:
        return None
    return min(s / f for f, s in zip(fast, slow, strict=True))


def _service_vs_inprocess(res: dict) -> float | None:
    """W4's adjacent blocks of short queries: service p50 / in-process p50."""
    return _ratio(_get(res, "W4", "overhead", "service", "p50_ms"),
                  _get(res, "W4", "overhead", "inprocess", "p50_ms"))


def evaluate(res: dict) -> list[Target]:
    tps = lambda w, p: _get(res, w, p, "tokens_per_s")  # noqa: E731
    out = [
        Target("W1", "service time at the per-text bound max(bytes / bandwidth, FLOPs / "
               "peak) / measured", ">= 60% of the per-text bound",
               _get(res, "W1", "service", "roofline", "frac_of_bound"), 0.60, unit="%"),
        Target("W1", "service / llama.cpp F32 (tokens/s)", ">= 1.8x",
               _ratio(tps("W1", "service"), tps("W1", "llama.cpp")), 1.8),
        Target("W1", "routed weight-bytes rate / read bandwidth", ">= 70% of the memory "
               "roofline", _get(res, "W1", "routed", "frac_bandwidth"), 0.70, unit="%"),
        Target("W1", "routed / PyTorch eager (tokens/s)", ">= 2.0x",
               _ratio(tps("W1", "routed"), tps("W1", "torch")), 2.0),
        Target("W1", "all-experts p50 / routed p50, worst text", ">= 1.0x (never slower "
               "than all-experts)", _worst_text_ratio(res), 1.0),
    ]
    for w in ("W2", "W3"):
        out += [
            Target(w, "routed FLOP rate / sgemm peak", ">= 85% of sgemm peak",
                   _get(res, w, "routed", "frac_sgemm_peak"), 0.85, unit="%"),
            Target(w, "routed / all-experts (tokens/s)", ">= 2.5x",
                   _ratio(tps(w, "routed"), tps(w, "all-experts")), 2.5),
            Target(w, "routed / PyTorch eager (tokens/s)", "> 1.0x (faster)",
                   _ratio(tps(w, "routed"), tps(w, "torch")), 1.0 + 1e-9),
        ]
    out += [
        Target("W4", "service p50 - in-process p50, 1 client (median over adjacent blocks)",
               "<= 2 ms",
               _get(res, "W4", "overhead", "overhead_ms"), 2.0, higher_is_better=False,
               unit="ms"),
        Target("W4", "service p50 / in-process p50, short queries (adjacent blocks)",
               "<= 1.2x", _service_vs_inprocess(res), 1.2, higher_is_better=False),
        Target("W4", "service tokens/s at 32 clients / W3 in-process tokens/s", ">= 90%",
               _ratio(_get(res, "W4", "service", "levels", "32", "tokens_per_s"),
                      tps("W3", "routed")), 0.90, unit="%"),
    ]
    out += [  # issue 24's: against the same short texts in process in batches of that size
        Target("W4", f"service tokens/s at {n} clients / in-process tokens/s, the same texts "
               f"in batches of {n}", f">= {round(100 * want)}%",
               _ratio(_get(res, "W4", "service", "levels", str(n), "tokens_per_s"),
                      _get(res, "W4", "inprocess", "batched_tokens_per_s", str(n))),
               want, unit="%")
        for n, want in ((8, 0.85), (32, 0.90))]
    return out


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "%":
        return f"{100 * value:.1f}%"
    if unit == "ms":
        return f"{value:+.2f} ms"
    return f"{value:.2f}x"
