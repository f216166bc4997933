"""The Pareto front over (task metric, size, peak RSS, latency) and the choice of the model.

Pure functions over `Measurement`s, so they are tested on numbers alone.

>>> a = Measurement(metric=0.99, size_mb=10, peak_rss_mb=30, p50_ms=5)
>>> b = Measurement(metric=0.98, size_mb=12, peak_rss_mb=35, p50_ms=6)    # worse than a everywhere
>>> c = Measurement(metric=1.00, size_mb=20, peak_rss_mb=50, p50_ms=9)    # more accurate, larger
>>> pareto_front({"a": a, "b": b, "c": c})
['a', 'c']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgepack.auto.budgets import Budget, Measurement

#: (field, sign): the front maximises the task metric and minimises the rest
AXES: tuple[tuple[str, int], ...] = (("metric", 1), ("size_mb", -1), ("peak_rss_mb", -1), ("p50_ms", -1))


def _vector(m: Measurement) -> tuple[float, ...] | None:
    values = [getattr(m, name) for name, _ in AXES]
    if any(v is None for v in values):
        return None
    return tuple(sign * float(v) for (_, sign), v in zip(AXES, values, strict=True))


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a is at least as good as b on every axis (larger is better after the signs) and better on one."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))


def pareto_front(measured: Mapping[str, Measurement]) -> list[str]:
    """Keys of the candidates no other candidate dominates (those missing an axis are left out), in input order."""
    vectors = {key: v for key, m in measured.items() if (v := _vector(m)) is not None}
    return [key for key, v in vectors.items()
            if not any(dominates(w, v) for other, w in vectors.items() if other != key)]


@dataclass(frozen=True)
class Choice:
    """The chosen candidate (None when no candidate meets every budget), or the closest and what it misses."""

    chosen: str | None
    closest: str | None
    missed: tuple[str, ...]  # budgets the closest misses (descriptions)


def total_violation(m: Measurement, budgets: Sequence[Budget]) -> float:
    """Sum of the fractions by which `m` misses each budget; an unmeasured budget counts as missed by 1."""
    return sum(1.0 if (v := b.violation(m)) is None else v for b in budgets)


def choose(measured: Mapping[str, Measurement], budgets: Sequence[Budget], *, objective: str) -> Choice:
    """The candidate with the smallest `objective` among those meeting every budget; otherwise the one that misses
    them by the least (then the smallest), and the budgets it misses."""
    def cost(key: str) -> float:
        value = getattr(measured[key], objective)
        return float("inf") if value is None else float(value)

    feasible = [k for k, m in measured.items() if all(b.met(m) for b in budgets)]
    if feasible:
        return Choice(min(feasible, key=cost), None, ())
    if not measured:
        return Choice(None, None, tuple(b.describe() for b in budgets))
    closest = min(measured, key=lambda k: (total_violation(measured[k], budgets), cost(k)))
    missed = tuple(b.describe() for b in budgets if not b.met(measured[closest]))
    return Choice(None, closest, missed)


__all__ = ["AXES", "Choice", "choose", "dominates", "pareto_front", "total_violation"]
