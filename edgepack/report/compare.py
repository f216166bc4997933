"""`edgepack compare OLD/report.json NEW/report.json`: run against run, per variant x EP, with a noise band.

For every row both reports measured ("ok"): p50, p90 and peak memory, new vs old (ms / MiB and %), and each metric
both rows have (absolute change). The latency noise band is drawn from the two runs' own spread: the 95 % interval
of a median is about +-1.58 IQR / sqrt(runs) (McGill, Tukey and Larsen's notch), so the change of p50 is noise
while it is inside sqrt(old_band**2 + new_band**2); without the quartiles (older reports) 1.96 * 1.2533 * std /
sqrt(runs) stands in. A threshold is crossed when:
- latency: p50 grew by more than `max_latency_regression` (a fraction) AND by more than its noise band;
- memory: peak grew by more than `max_memory_regression`;
- metrics: a higher-is-better metric (cosine, SQNR, agreement, accuracy, retrieval) fell by more than
  `max_metric_drop` (absolute).
Reports of different models (family, primary output, or the reference graph's inputs and outputs differ) are bad
input; reports from different devices compare, with a note.

>>> comparison = compare_reports(old, new, CompareThresholds(max_latency_regression=0.05))   # doctest: +SKIP
>>> comparison.passed, [row.key for row in comparison.failed]                                # doctest: +SKIP
(False, ['int8 / cpu'])
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgepack.errors import BadInputError
from edgepack.report.model import ProviderResult, Report

#: metrics where a smaller value is better; every other metric is better higher
LOWER_IS_BETTER = frozenset({"max_abs_diff"})


@dataclass(frozen=True)
class CompareThresholds:
    max_latency_regression: float | None = None  # fraction of the old p50, e.g. 0.05
    max_memory_regression: float | None = None  # fraction of the old peak
    max_metric_drop: float | None = None  # absolute, e.g. 0.005 of cosine

    def __post_init__(self) -> None:
        for name in ("max_latency_regression", "max_memory_regression", "max_metric_drop"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise BadInputError(f"--{name.replace('_', '-')} {value}: give a non-negative amount, e.g. 5%")


def parse_fraction(text: str | None, *, option: str) -> float | None:
    """'5%' -> 0.05, '0.05' -> 0.05, None -> None."""
    if text is None:
        return None
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise BadInputError(f"{option} {text!r}: give a percentage (5%) or a fraction (0.05)") from None
    if value < 0 or not math.isfinite(value):
        raise BadInputError(f"{option} {text!r}: must be >= 0")
    return value


@dataclass(frozen=True)
class Change:
    """old -> new of one figure; `relative` = (new - old) / old; `band`: the noise band as a fraction of old."""

    name: str
    old: float
    new: float
    band: float | None = None

    @property
    def delta(self) -> float:
        return self.new - self.old

    @property
    def relative(self) -> float | None:
        return self.delta / abs(self.old) if self.old else None


@dataclass
class RowComparison:
    variant: str
    provider: str
    latency: list[Change] = field(default_factory=list)  # p50, p90
    memory: Change | None = None
    metrics: list[Change] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.variant} / {self.provider}"


@dataclass
class Comparison:
    rows: list[RowComparison]
    only_old: list[str]
    only_new: list[str]
    notes: list[str]
    thresholds: CompareThresholds

    @property
    def failed(self) -> list[RowComparison]:
        return [row for row in self.rows if row.failures]

    @property
    def passed(self) -> bool:
        return not self.failed


def load_report(path: Path) -> Report:
    """A report.json (or the run folder holding one); a missing or invalid file is bad input."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise BadInputError(f"{path}: no report.json there; give the report.json an edgepack run/validate --out wrote")
    try:
        return Report.model_validate_json(path.read_text())
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BadInputError(f"{path}: not an edgepack report ({where}: {first['msg']}); compare the report.json "
                            "files of two edgepack runs") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadInputError(f"{path}: not JSON; give an edgepack report.json") from None


def median_band(latency: Any) -> float | None:
    """Half-width (ms) of the ~95 % interval of a run's median, from its quartiles or its std."""
    data = latency.model_dump() if hasattr(latency, "model_dump") else dict(latency)
    runs = data.get("runs") or 0
    if runs < 2:
        return None
    if data.get("p25") is not None and data.get("p75") is not None:
        return 1.58 * (data["p75"] - data["p25"]) / math.sqrt(runs)
    if data.get("std") is not None:
        return 1.96 * 1.2533 * data["std"] / math.sqrt(runs)
    return None


def _same_model(old: Report, new: Report, names: tuple[str, str]) -> None:
    problems = []
    for key in ("family", "task"):
        if old.model.get(key) != new.model.get(key):
            problems.append(f"{key} {old.model.get(key)!r} vs {new.model.get(key)!r}")
    if old.primary_output != new.primary_output:
        problems.append(f"primary output {old.primary_output!r} vs {new.primary_output!r}")
    old_sig, new_sig = old.model.get("signature"), new.model.get("signature")
    if old_sig and new_sig and old_sig != new_sig:
        for kind in ("inputs", "outputs"):
            if old_sig.get(kind) != new_sig.get(kind):
                problems.append(f"graph {kind} {sorted(old_sig.get(kind) or {})} vs {sorted(new_sig.get(kind) or {})}")
    if problems:
        raise BadInputError(f"{names[0]} and {names[1]} are reports of different models ({'; '.join(problems)}); "
                            "compare two runs of the same model")


def _row(variant: str, provider: str, old: ProviderResult, new: ProviderResult,
         thresholds: CompareThresholds) -> RowComparison:
    row = RowComparison(variant, provider)
    if old.latency_ms is not None and new.latency_ms is not None:
        old_band, new_band = median_band(old.latency_ms), median_band(new.latency_ms)
        band = None if old_band is None or new_band is None or not old.latency_ms.p50 else \
            math.hypot(old_band, new_band) / old.latency_ms.p50
        row.latency = [Change("p50", old.latency_ms.p50, new.latency_ms.p50, band),
                       Change("p90", old.latency_ms.p90, new.latency_ms.p90)]
    if old.memory_mb is not None and new.memory_mb is not None:
        row.memory = Change("peak", old.memory_mb.peak, new.memory_mb.peak)
    for name in sorted(set(old.metrics) & set(new.metrics)):
        before, after = old.metrics[name], new.metrics[name]
        if before is not None and after is not None:
            row.metrics.append(Change(name, before, after))
    row.failures = _failures(row, thresholds)
    return row


def _failures(row: RowComparison, limits: CompareThresholds) -> list[str]:
    failures = []
    if row.latency and limits.max_latency_regression is not None:
        p50 = row.latency[0]
        grew = p50.relative or 0.0
        if grew > limits.max_latency_regression and grew > (p50.band or 0.0):
            failures.append(f"p50 {p50.old:.3g} -> {p50.new:.3g} ms ({grew:+.1%}; noise band "
                            f"+-{(p50.band or 0):.1%}) exceeds +{limits.max_latency_regression:.1%}")
    if row.memory is not None and limits.max_memory_regression is not None:
        grew = row.memory.relative or 0.0
        if grew > limits.max_memory_regression:
            failures.append(f"peak memory {row.memory.old:.0f} -> {row.memory.new:.0f} MiB ({grew:+.1%}) exceeds "
                            f"+{limits.max_memory_regression:.1%}")
    if limits.max_metric_drop is not None:
        for change in row.metrics:
            drop = change.delta if change.name in LOWER_IS_BETTER else -change.delta
            if drop > limits.max_metric_drop:
                failures.append(f"{change.name} {change.old:.4f} -> {change.new:.4f} (worse by {drop:.4f}) exceeds "
                                f"{limits.max_metric_drop:g}")
    return failures


def compare_reports(old: Report, new: Report, thresholds: CompareThresholds, *,
                    names: tuple[str, str] = ("OLD", "NEW")) -> Comparison:
    """Every row both reports measured, compared; rows only one has are listed, not failed."""
    _same_model(old, new, names)
    old_rows = {(v, p): e for v, variant in old.variants.items() for p, e in variant.providers.items()}
    new_rows = {(v, p): e for v, variant in new.variants.items() for p, e in variant.providers.items()}
    rows = [_row(v, p, old_rows[(v, p)], entry, thresholds) for (v, p), entry in new_rows.items()
            if (v, p) in old_rows and old_rows[(v, p)].status == "ok" and entry.status == "ok"]
    if not rows:
        raise BadInputError(f"{names[0]} and {names[1]} have no variant x EP row that both measured; nothing to "
                            "compare")
    notes = []
    if old.device and new.device and (old.device.hostname, old.device.cpu) != (new.device.hostname, new.device.cpu):
        notes.append(f"different devices: {old.device.label} ({old.device.hostname}, {old.device.cpu}) vs "
                     f"{new.device.label} ({new.device.hostname}, {new.device.cpu})")
    return Comparison(rows=rows, only_old=[f"{v} / {p}" for v, p in old_rows if (v, p) not in new_rows],
                      only_new=[f"{v} / {p}" for v, p in new_rows if (v, p) not in old_rows], notes=notes,
                      thresholds=thresholds)


def _pct(change: Change) -> str:
    relative = change.relative
    return "–" if relative is None else f"{relative:+.1%}"


def comparison_rows(comparison: Comparison) -> list[list[str]]:
    """Display rows: variant, EP, p50 old -> new (change, noise band), p90, peak MiB, metrics, verdict."""
    rows = []
    for row in comparison.rows:
        cells = [row.variant, row.provider]
        if row.latency:
            p50, p90 = row.latency
            band = "" if p50.band is None else f" ±{p50.band:.1%}"
            cells += [f"{p50.old:.3f} → {p50.new:.3f} ({_pct(p50)}{band})", f"{p90.old:.3f} → {p90.new:.3f} ({_pct(p90)})"]
        else:
            cells += ["–", "–"]
        memory = row.memory
        cells.append("–" if memory is None else f"{memory.old:.0f} → {memory.new:.0f} ({_pct(memory)})")
        cells.append(", ".join(f"{m.name} {m.old:.4f} → {m.new:.4f} ({m.delta:+.4f})" for m in row.metrics) or "–")
        cells.append("FAIL: " + "; ".join(row.failures) if row.failures else "ok")
        rows.append(cells)
    return rows


COMPARE_COLUMNS = ("variant", "EP", "p50 ms (change, noise band)", "p90 ms", "peak MiB", "metrics", "result")


def comparison_json(comparison: Comparison) -> dict[str, Any]:
    def change(c: Change | None) -> dict[str, Any] | None:
        return None if c is None else {"old": c.old, "new": c.new, "change": c.delta, "relative": c.relative,
                                       "noise_band": c.band}

    return {"passed": comparison.passed, "thresholds": comparison.thresholds.__dict__, "notes": comparison.notes,
            "only_old": comparison.only_old, "only_new": comparison.only_new,
            "rows": [{"variant": r.variant, "provider": r.provider,
                      "latency_ms": {c.name: change(c) for c in r.latency}, "peak_memory_mb": change(r.memory),
                      "metrics": {c.name: change(c) for c in r.metrics}, "failures": r.failures}
                     for r in comparison.rows]}
