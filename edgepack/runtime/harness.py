"""Validation harness: every variant x execution provider measured in a fresh subprocess, fidelity vs the reference.

The reference variant's outputs on the CPU EP are the yardstick for every other (variant, EP) pair, so a user
reads e.g. "INT8 on CPU: cosine 0.996" against FP32 on the same evaluation split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgepack.artifacts import StageRecord, content_hash, sha256_file, stage_folder, write_json
from edgepack.calibration_data import Sample
from edgepack.errors import EdgepackError
from edgepack.models.base import ModelAdapter
from edgepack.reporter import get_reporter
from edgepack.runtime.metrics import fidelity
from edgepack.runtime.probe import ProbeOptions, ProbeResult, measure
from edgepack.runtime.providers import ExecutionProvider


@dataclass(frozen=True)
class ValidationSettings:
    sequence_length: int = 128  # latency input: batch 1, this many tokens
    max_length: int = 128  # truncation of evaluation samples
    threads: int = 2
    warmup: int = 10
    runs: int = 50


def _provider_entry(result: ProbeResult, metrics: dict[str, float]) -> dict[str, Any]:
    entry: dict[str, Any] = {"status": result.status, "how": result.how}
    if result.status != "ok":
        entry["error"] = result.error
        return entry
    entry.update(latency_ms=result.latency_ms, memory_mb=result.memory_mb, metrics=metrics)
    return entry


def validate_variants(variants: Mapping[str, Path], *, adapter: ModelAdapter, samples: Sequence[Sample],
                      providers: Sequence[ExecutionProvider], out: Path, settings: ValidationSettings,
                      reference: str = "fp32") -> dict[str, Any]:
    """Measure each variant on each provider; return {"variants": {...}} in report.json's layout."""
    eval_feeds = adapter.evaluation_feeds(samples, max_length=settings.max_length)
    latency_feed = adapter.latency_feed(samples, sequence_length=settings.sequence_length)
    hashes = {name: sha256_file(path) for name, path in variants.items()}
    config = {**asdict(settings), "providers": [p.name for p in providers], "reference": reference}
    folder = out / f"validate-{content_hash({'cfg': config, 'in': hashes, 'n': len(eval_feeds)})}"
    record = StageRecord("validate", config, hashes)
    # The reference runs first on the CPU EP: every fidelity figure is against its outputs.
    order = [(reference, "cpu")] + [(v, p.name) for v in variants for p in providers if (v, p.name) != (reference, "cpu")]
    by_name = {p.name: p for p in providers}
    report: dict[str, Any] = {name: {"path": str(path.relative_to(out)) if path.is_relative_to(out) else str(path),
                                     "size_bytes": _size(path), "sha256": hashes[name], "providers": {}}
                              for name, path in variants.items()}
    ref_outputs = None
    with stage_folder(folder, record) as tmp:
        for variant, ep in get_reporter().track(order, total=len(order), title="validate variants x EPs"):
            options = ProbeOptions(provider=ep, intra_op_threads=settings.threads, warmup=settings.warmup,
                                   runs=settings.runs)
            result = measure(variants[variant], latency_feed=latency_feed, evaluation_feeds=eval_feeds,
                             workdir=tmp / f"{variant}-{ep}", options=options)
            if (variant, ep) == (reference, "cpu"):
                if result.status != "ok":
                    raise EdgepackError(f"reference variant '{reference}' failed on the CPU EP: {result.error}")
                ref_outputs = result.outputs
            metrics = _metrics(adapter, result, ref_outputs, samples) if result.status == "ok" else {}
            if ep in by_name:
                report[variant]["providers"][ep] = _provider_entry(result, metrics)
            write_json(tmp / f"{variant}-{ep}.json", report[variant]["providers"].get(ep, {}))
        record.metrics = {"variants": report}
    return {"variants": report, "validation_folder": folder.name}


def _metrics(adapter: ModelAdapter, result: ProbeResult, ref_outputs: Any, samples: Sequence[Sample]) -> dict[str, float]:
    metrics = fidelity(ref_outputs, result.outputs, output=adapter.primary_output)
    metrics.update(adapter.task_metric(result.outputs, samples))
    return metrics


def _size(path: Path) -> int:
    """Model bytes, external data included."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
