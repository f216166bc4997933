"""Recipe gates: thresholds on the final variant, measured on the CPU EP against the FP32 reference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgepack.recipe import GatesSection

GateValue = Callable[[dict[str, Any], str], "float | None"]


def _cpu(report: dict[str, Any], variant: str) -> dict[str, Any]:
    entry = report["variants"].get(variant, {}).get("providers", {}).get("cpu", {})
    return entry if entry.get("status") == "ok" else {}


def _metric(name: str) -> GateValue:
    return lambda report, final: _cpu(report, final).get("metrics", {}).get(name)


def _size_ratio(report: dict[str, Any], final: str) -> float | None:
    ref = report["variants"][report["reference"]]["size_bytes"]
    return report["variants"][final]["size_bytes"] / ref


def _latency_ratio(report: dict[str, Any], final: str) -> float | None:
    ref, got = _cpu(report, report["reference"]), _cpu(report, final)
    if not ref or not got:
        return None
    return got["latency_ms"]["p50"] / ref["latency_ms"]["p50"]


def _task_drop(report: dict[str, Any], final: str) -> float | None:
    ref, got = _cpu(report, report["reference"]).get("metrics", {}), _cpu(report, final).get("metrics", {})
    task = [k for k in ref if k not in FIDELITY_KEYS]
    if not task or task[0] not in got:
        return None
    return ref[task[0]] - got[task[0]]


FIDELITY_KEYS = {"cosine_mean", "cosine_min", "max_abs_diff", "sqnr_db"}

# gate name -> (how the value is read, "min" if value must be >= threshold else "max")
GATES: dict[str, tuple[GateValue, str]] = {
    "min_cosine": (_metric("cosine_mean"), "min"),
    "min_cosine_sample": (_metric("cosine_min"), "min"),
    "max_size_ratio": (_size_ratio, "max"),
    "max_latency_ratio": (_latency_ratio, "max"),
    "max_task_metric_drop": (_task_drop, "max"),
}


def evaluate_gates(report: dict[str, Any], gates: GatesSection, *, final: str) -> list[dict[str, Any]]:
    results = []
    for name, threshold in gates.model_dump().items():
        if threshold is None:
            continue
        read, kind = GATES[name]
        value = read(report, final)
        passed = value is not None and (value >= threshold if kind == "min" else value <= threshold)
        results.append({"name": name, "variant": final, "provider": "cpu", "threshold": threshold,
                        "value": None if value is None else round(float(value), 6), "passed": passed})
    return results
