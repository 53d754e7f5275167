"""Evaluates the PromQL the Grafana dashboard uses over /metrics scrapes kept in memory.

No Grafana or Prometheus can run here, so benchmarks/dashboard_snapshot.py plots the
dashboard's own queries with this: the subset they use (selectors with =, !=, =~, !~; rate,
increase, histogram_quantile, scalar, *_over_time; sum/avg/min/max/count by or without;
arithmetic between vectors and scalars). `rate` is (last - first) / (their time apart) over
the window, without Prometheus' extrapolation to the window's edges; a counter reset is
taken as Prometheus takes it (the new value counts from zero).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import promql_parser as pp
from prometheus_client.parser import text_string_to_metric_families

Labels = frozenset[tuple[str, str]]
Vector = dict[Labels, float]
Value = Vector | float

_ARITHMETIC: dict[str, Callable[[float, float], float]] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul,
    "/": lambda a, b: a / b if b else (math.nan if a == 0 else math.copysign(math.inf, a)),
}


@dataclass
class Scrapes:
    """Samples by series, (name, labels) -> [(t, value)], in scrape order."""

    series: dict[tuple[str, Labels], list[tuple[float, float]]] = field(default_factory=dict)

    def add(self, t: float, text: str) -> None:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                key = (s.name, frozenset(s.labels.items()))
                self.series.setdefault(key, []).append((t, s.value))

    def select(self, selector: pp.VectorSelector) -> list[tuple[Labels, list]]:
        out = []
        for (name, labels), points in self.series.items():
            if name == selector.name and all(_matches(m, dict(labels))
                                             for m in selector.matchers.matchers):
                out.append((labels, points))
        return out


def _matches(m: pp.Matcher, labels: dict[str, str]) -> bool:
    value = labels.get(m.name, "")
    if m.op == pp.MatchOp.Equal:
        return value == m.value
    if m.op == pp.MatchOp.NotEqual:
        return value != m.value
    found = re.fullmatch(m.value, value) is not None
    return found if m.op == pp.MatchOp.Re else not found


def evaluate(promql: str, scrapes: Scrapes, t: float) -> Value:
    """The query's value at time t (the latest scrape at or before t, as an instant query)."""
    return _eval(pp.parse(promql), scrapes, t)


def _eval(node: pp.Expr, s: Scrapes, t: float) -> Value:
    if isinstance(node, pp.NumberLiteral):
        return float(node.val)
    if isinstance(node, pp.ParenExpr):
        return _eval(node.expr, s, t)
    if isinstance(node, pp.VectorSelector):
        out = {}
        for labels, points in s.select(node):
            before = [v for (ts, v) in points if ts <= t]
            if before:
                out[labels] = before[-1]
        return out
    if isinstance(node, pp.Call):
        return _call(node, s, t)
    if isinstance(node, pp.AggregateExpr):
        return _aggregate(node, _eval(node.expr, s, t))
    if isinstance(node, pp.BinaryExpr):
        return _binary(str(node.op), _eval(node.lhs, s, t), _eval(node.rhs, s, t))
    raise NotImplementedError(f"{type(node).__name__}: {node}")


def _window(node: pp.MatrixSelector, s: Scrapes, t: float) -> list[tuple[Labels, list]]:
    width = node.range.total_seconds()
    return [(labels, [(ts, v) for ts, v in points if t - width < ts <= t])
            for labels, points in s.select(node.vector_selector)]


def _increase(points: list[tuple[float, float]]) -> float:
    total = 0.0
    for (_, a), (_, b) in zip(points, points[1:], strict=False):
        total += b - a if b >= a else b  # a reset: the counter started again from 0
    return total


def _call(node: pp.Call, s: Scrapes, t: float) -> Value:
    name = node.func.name
    if name in ("rate", "increase", "avg_over_time", "max_over_time"):
        out = {}
        for labels, points in _window(node.args[0], s, t):
            if name.endswith("_over_time") and points:
                values = [v for _, v in points]
                out[labels] = max(values) if name == "max_over_time" else sum(values) / len(values)
            elif len(points) >= 2:
                grew = _increase(points)
                out[labels] = grew if name == "increase" else grew / (points[-1][0] - points[0][0])
        return out
    if name == "scalar":
        vector = _eval(node.args[0], s, t)
        return next(iter(vector.values())) if len(vector) == 1 else math.nan
    if name == "histogram_quantile":
        return _quantile(float(_eval(node.args[0], s, t)), _eval(node.args[1], s, t))
    raise NotImplementedError(f"function {name}")


def _aggregate(node: pp.AggregateExpr, vector: Vector) -> Vector:
    modifier = node.modifier
    labels = set(modifier.labels) if modifier else set()
    without = modifier is not None and modifier.type == pp.AggModifierType.Without
    groups: dict[Labels, list[float]] = {}
    for key, value in vector.items():
        kept = frozenset((k, v) for k, v in key if (k not in labels) == without)
        groups.setdefault(kept, []).append(value)
    op = str(node.op)
    reduce = {"sum": sum, "max": max, "min": min, "count": len,
              "avg": lambda vs: sum(vs) / len(vs)}[op]
    return {key: float(reduce(values)) for key, values in groups.items()}


def _binary(op: str, lhs: Value, rhs: Value) -> Value:
    fn = _ARITHMETIC[op]
    if isinstance(lhs, float) and isinstance(rhs, float):
        return fn(lhs, rhs)
    if isinstance(rhs, float):
        return {k: fn(v, rhs) for k, v in lhs.items()}
    if isinstance(lhs, float):
        return {k: fn(lhs, v) for k, v in rhs.items()}
    return {k: fn(v, rhs[k]) for k, v in lhs.items() if k in rhs}  # one-to-one, same labels


def _quantile(q: float, buckets: Vector) -> Vector:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding rank q."""
    series: dict[Labels, list[tuple[float, float]]] = {}
    for key, value in buckets.items():
        labels = dict(key)
        le = float(labels.pop("le"))
        series.setdefault(frozenset(labels.items()), []).append((le, value))
    out = {}
    for key, points in series.items():
        points.sort()
        total = points[-1][1]
        if total <= 0:
            continue
        rank = q * total
        lower_bound, lower_count = 0.0, 0.0
        for bound, count in points:
            if count >= rank:
                if math.isinf(bound):
                    out[key] = lower_bound
                else:
                    share = ((rank - lower_count) / (count - lower_count)
                             if count > lower_count else 1.0)
                    out[key] = lower_bound + (bound - lower_bound) * share
                break
            lower_bound, lower_count = bound, count
    return out
