"""Budgets: what a candidate must meet (`--budget accuracy_drop=0.5`), read from one `Measurement` each.

A budget kind is data in the `BUDGETS` registry: its unit, what it means and which `Measurement` field it reads;
every kind is an upper limit (lower is better) except the fidelity budget `min_cosine`, a lower limit on the mean
cosine of the primary output to the FP32 reference's on the same samples (a task metric that saturates does not
see a model whose outputs changed). A new kind is one `register` line and, if it reads something not measured yet,
one field of `Measurement`.

>>> parse_budget("accuracy_drop=0.5")
Budget(name='accuracy_drop', limit=0.5)
>>> Budget("size_mb", 10.0).violation(Measurement(size_mb=12.5))
0.25
>>> Budget("min_cosine", 0.99).violation(Measurement(cosine_mean=0.495))
0.5
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from edgepack.errors import BadInputError, did_you_mean
from edgepack.registry import Registry

#: how a figure was obtained: analytic (before any run), evaluation split in a fresh process (a rung), harness
How = Literal["proxy", "rung", "harness"]


@dataclass
class Measurement:
    """A candidate's figures as far as they have been measured (None: not yet)."""

    size_mb: float | None = None
    #: the task metric (the family's, e.g. paraphrase R@1) on `samples` evaluation samples, and its drop in points
    #: (x100) below the FP32 reference on the same samples
    metric: float | None = None
    accuracy_drop: float | None = None
    #: MiB the model adds to a fresh process at its peak: VmHWM minus the RSS after importing onnxruntime + numpy
    #: (on a phone the app's runtime baseline is not Python's), and the process's whole VmHWM (the report's
    #: "peak RSS MB")
    peak_rss_mb: float | None = None
    process_peak_rss_mb: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    #: fidelity: cosine of the primary output to the FP32 reference's on the same samples, mean and worst sample
    #: (None: not measured, or the output's shape differs from the reference's, e.g. a narrower student)
    cosine_mean: float | None = None
    cosine_min: float | None = None
    samples: int = 0
    how: How = "proxy"
    #: fields that are analytic estimates, not measurements (e.g. peak_rss_mb before the first run)
    estimated: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


@dataclass(frozen=True)
class BudgetKind:
    name: str
    unit: str
    meaning: str
    #: the `Measurement` field it reads (default: the budget's name)
    reads: str | None = None
    #: True: the value must be at least the limit (fidelity); False: at most
    lower_limit: bool = False


BUDGETS: Registry[BudgetKind] = Registry("budget")
for _kind in (
    BudgetKind("accuracy_drop", "points", "task metric below the FP32 reference, in points (x100), on the "
               "evaluation split"),
    BudgetKind("size_mb", "MB", "model file size (with external data), 10^6 bytes"),
    BudgetKind("peak_rss_mb", "MiB", "the model's peak memory: VmHWM of a fresh process that loads and runs it, "
               "minus that process's RSS after importing onnxruntime + numpy"),
    BudgetKind("process_peak_rss_mb", "MiB", "VmHWM of that whole process, Python and onnxruntime included"),
    BudgetKind("p50_ms", "ms", "median latency, batch 1, on the budget EP"),
    BudgetKind("p90_ms", "ms", "90th-percentile latency, batch 1, on the budget EP"),
    BudgetKind("min_cosine", "cosine", "lower limit: mean cosine of the primary output (e.g. the sentence embedding) "
               "to the FP32 reference's on the same evaluation samples", reads="cosine_mean", lower_limit=True),
):
    BUDGETS.register(_kind.name)(_kind)


@dataclass(frozen=True)
class Budget:
    name: str
    limit: float

    @property
    def kind(self) -> BudgetKind:
        return BUDGETS.get(self.name)

    def value(self, measured: Measurement) -> float | None:
        return getattr(measured, self.kind.reads or self.name)

    def violation(self, measured: Measurement) -> float | None:
        """How far past the limit, as a fraction of it (0: met); None when not measured yet."""
        value = self.value(measured)
        if value is None:
            return None
        scale = abs(self.limit) if self.limit else 1.0
        past = self.limit - value if self.kind.lower_limit else value - self.limit
        return max(0.0, past / scale)

    def met(self, measured: Measurement) -> bool | None:
        violation = self.violation(measured)
        return None if violation is None else violation == 0.0

    def describe(self) -> str:
        if self.kind.lower_limit:
            return f"{self.name} >= {self.limit:g}"
        return f"{self.name} <= {self.limit:g} {self.kind.unit}"


def parse_budget(text: str, *, where: str = "--budget") -> Budget:
    """'NAME=VALUE' -> Budget; a one-line BadInputError naming the fix otherwise (`where`: what the user wrote)."""
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    known = ", ".join(BUDGETS.names())
    if not sep or not name or not value:
        raise BadInputError(f"{where} '{text}': write NAME=VALUE, e.g. accuracy_drop=0.5 (budgets: {known})")
    if name not in BUDGETS:
        raise BadInputError(f"{where} '{text}': unknown budget '{name}'{did_you_mean(name, BUDGETS.names())}; "
                            f"budgets: {known}")
    try:
        limit = float(value)
    except ValueError:
        raise BadInputError(f"{where} '{text}': '{value}' is not a number; write e.g. {name}=0.5") from None
    if not limit == limit or limit in (float("inf"), float("-inf")) or limit < 0:  # NaN, infinite, negative
        raise BadInputError(f"{where} '{text}': the limit must be a finite number >= 0")
    if BUDGETS.get(name).lower_limit and not 0 < limit <= 1:
        raise BadInputError(f"{where} '{text}': a cosine lies in (0, 1]; write e.g. {name}=0.99")
    return Budget(name, limit)


def merge_budgets(recipe_budgets: Mapping[str, float], cli: Iterable[str]) -> list[Budget]:
    """The recipe's `auto.budgets`, then each --budget (a CLI budget replaces the recipe's of the same name)."""
    merged = {name: parse_budget(f"{name}={limit}", where="auto.budgets") for name, limit in recipe_budgets.items()}
    for text in cli:
        budget = parse_budget(text)
        merged[budget.name] = budget
    return list(merged.values())


__all__ = ["BUDGETS", "Budget", "BudgetKind", "How", "Measurement", "merge_budgets", "parse_budget"]
