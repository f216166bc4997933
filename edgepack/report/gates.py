"""Recipe gates: thresholds on the final variant, measured on the CPU EP.

Cosine gates read the final variant's fidelity against the variant it was made from (for INT8 of a student: the
student in FP32); size, latency and task-metric gates compare it with the reference (the FP32 original).
"""

from __future__ import annotations

from collections.abc import Callable

from edgepack.recipe import GatesSection
from edgepack.report.model import Gate, ProviderResult, Report

GateValue = Callable[[Report, str], "float | None"]


def _cpu(report: Report, variant: str) -> ProviderResult | None:
    entry = report.variants[variant].providers.get("cpu") if variant in report.variants else None
    return entry if entry is not None and entry.status == "ok" else None


def _metric(name: str) -> GateValue:
    def read(report: Report, final: str) -> float | None:
        entry = _cpu(report, final)
        return None if entry is None else entry.metrics.get(name)

    return read


def _size_ratio(report: Report, final: str) -> float | None:
    return report.variants[final].size_bytes / report.variants[report.reference].size_bytes


def _latency_ratio(report: Report, final: str) -> float | None:
    ref, got = _cpu(report, report.reference), _cpu(report, final)
    if ref is None or got is None or ref.latency_ms is None or got.latency_ms is None:
        return None
    return got.latency_ms.p50 / ref.latency_ms.p50


def _task_drop(report: Report, final: str) -> float | None:
    ref, got = _cpu(report, report.reference), _cpu(report, final)
    if ref is None or got is None:
        return None
    task = [k for k in ref.metrics if k not in FIDELITY_KEYS]
    if not task or got.metrics.get(task[0]) is None or ref.metrics[task[0]] is None:
        return None
    return float(ref.metrics[task[0]]) - float(got.metrics[task[0]])  # type: ignore[arg-type]


def _evaluation_set_ratio(report: Report, final: str) -> float | None:
    """The lowest final / reference ratio of the first task metric over the named evaluation sets."""
    ref, got = report.variants[report.reference].evaluation_sets, report.variants[final].evaluation_sets
    ratios = []
    for name, entry in ref.items():
        metric = next((k for k, v in entry.metrics.items() if v is not None), None)
        value = got[name].metrics.get(metric) if name in got and metric else None
        if metric is None or value is None or not entry.metrics[metric]:
            return None
        ratios.append(float(value) / float(entry.metrics[metric]))  # type: ignore[arg-type]
    return min(ratios) if ratios else None


#: fidelity figures (vs the parent variant); every other metric key is a task metric
FIDELITY_KEYS = {"cosine_mean", "cosine_min", "max_abs_diff", "sqnr_db", "top1_agreement"}

# gate name -> (how the value is read, "min" if value must be >= threshold else "max")
GATES: dict[str, tuple[GateValue, str]] = {
    "min_cosine": (_metric("cosine_mean"), "min"),
    "min_cosine_sample": (_metric("cosine_min"), "min"),
    "min_top1_agreement": (_metric("top1_agreement"), "min"),
    "max_size_ratio": (_size_ratio, "max"),
    "max_latency_ratio": (_latency_ratio, "max"),
    "max_task_metric_drop": (_task_drop, "max"),
    "min_evaluation_set_ratio": (_evaluation_set_ratio, "min"),
    "max_perplexity_ratio": (_metric("perplexity_ratio"), "max"),
    "min_next_token_agreement": (_metric("next_token_agreement"), "min"),
}


def evaluate_gates(report: Report, gates: GatesSection, *, final: str) -> list[Gate]:
    results = []
    for name, threshold in gates.model_dump().items():
        if threshold is None:
            continue
        read, kind = GATES[name]
        value = read(report, final)
        passed = value is not None and (value >= threshold if kind == "min" else value <= threshold)
        results.append(Gate(name=name, variant=final, provider="cpu", threshold=threshold,
                            value=None if value is None else round(float(value), 6), passed=passed))
    return results
