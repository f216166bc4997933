"""Validation harness: every variant x execution provider measured in a fresh subprocess, fidelity vs the reference.

The reference variant's outputs on the CPU EP are the yardstick for every other (variant, EP) pair, so a user
reads e.g. "INT8 on CPU: cosine 0.996" against FP32 on the same evaluation samples.

Emulated EPs (QNN HTP on an x86 host) run a simulator that takes seconds to a minute per inference, so they
see the first `emulated_samples` evaluation samples only, with `emulated_runs` timed runs and no warm-up; the
reference is then re-run on the CPU on exactly those samples, so fidelity still compares like with like, and
the row's `evaluation_samples` says how many samples its metrics cover. Static-analysis rows carry coverage only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgepack.artifacts import StageRecord, content_hash, sha256_file, stage_folder, write_json
from edgepack.calibration_data import Feed, Sample
from edgepack.errors import BadInputError, EdgepackError
from edgepack.models.base import ModelAdapter
from edgepack.reporter import get_reporter
from edgepack.runtime.metrics import fidelity
from edgepack.runtime.probe import ProbeOptions, ProbeResult, measure
from edgepack.runtime.providers import ExecutionProvider, get_provider


@dataclass(frozen=True)
class ValidationSettings:
    sequence_length: int = 128  # latency input: batch 1, this many tokens; NPU models are fixed to it
    max_length: int = 128  # truncation of evaluation samples
    threads: int = 2
    warmup: int = 10
    runs: int = 50
    timeout_s: float = 600
    emulated_samples: int = 4  # evaluation samples an emulated EP sees (a simulator is slow)
    emulated_runs: int = 1  # timed runs on an emulated EP (its timings are not device timings anyway)
    emulated_timeout_s: float = 3600

    def __post_init__(self) -> None:
        for name in ("sequence_length", "max_length", "runs", "emulated_samples", "emulated_runs"):
            if getattr(self, name) < 1:
                raise BadInputError(f"validation setting {name}={getattr(self, name)!r}: must be >= 1")


@dataclass(frozen=True)
class _EvalSet:
    samples: Sequence[Sample]
    feeds: list[Feed]


class _Run:
    """State of one validation: the evaluation sets, and the reference outputs on each of them."""

    def __init__(self, adapter: ModelAdapter, samples: Sequence[Sample], settings: ValidationSettings,
                 reference_path: Path, workdir: Path, cache_dir: Path) -> None:
        self.adapter, self.settings, self.reference_path, self.workdir = adapter, settings, reference_path, workdir
        self.cache_dir = cache_dir  # outside the hashed stage folder, so TensorRT engines survive reruns
        self.full = _EvalSet(samples, adapter.evaluation_feeds(samples, max_length=settings.max_length))
        self.latency_feed = adapter.latency_feed(samples, sequence_length=settings.sequence_length)
        self._reference: dict[int, list[Any]] = {}

    def eval_set(self, provider: ExecutionProvider) -> _EvalSet:
        if provider.how != "emulated" or len(self.full.samples) <= self.settings.emulated_samples:
            return self.full
        subset = self.full.samples[: self.settings.emulated_samples]
        return _EvalSet(subset, self.adapter.evaluation_feeds(subset, max_length=self.settings.max_length))

    def options(self, provider: ExecutionProvider) -> ProbeOptions:
        s = self.settings
        if provider.how == "emulated":
            return ProbeOptions(provider=provider.key, intra_op_threads=s.threads, warmup=0, runs=s.emulated_runs,
                                timeout_s=s.emulated_timeout_s, cache_dir=self.cache_dir)
        return ProbeOptions(provider=provider.key, intra_op_threads=s.threads, warmup=s.warmup, runs=s.runs,
                            timeout_s=s.timeout_s, cache_dir=self.cache_dir)

    def reference_outputs(self, eval_set: _EvalSet) -> list[Any]:
        """The reference's CPU outputs on `eval_set`; a subset costs one short extra CPU run."""
        count = len(eval_set.samples)
        if count not in self._reference:
            options = ProbeOptions(provider="cpu", intra_op_threads=self.settings.threads, warmup=0, runs=1,
                                   timeout_s=self.settings.timeout_s)
            result = measure(self.reference_path, latency_feed=self.latency_feed, evaluation_feeds=eval_set.feeds,
                             workdir=self.workdir / f"reference-{count}", options=options)
            self.remember_reference(result, count)
        return self._reference[count]

    def remember_reference(self, result: ProbeResult, count: int) -> None:
        if result.status != "ok":
            raise EdgepackError(f"the reference variant failed on the CPU EP: {result.error}")
        self._reference[count] = result.outputs


def validate_variants(variants: Mapping[str, Path], *, adapter: ModelAdapter, samples: Sequence[Sample],
                      providers: Sequence[ExecutionProvider], out: Path, settings: ValidationSettings,
                      reference: str = "fp32") -> dict[str, Any]:
    """Measure each variant on each provider; return {"variants": {...}} in report.json's layout.

    A variant whose inputs do not fit the data is a BadInputError before anything runs; an EP that rejects a
    variant is that row's "failed" status (with ONNX Runtime's message), and the other rows still run.
    """
    if reference not in variants:
        raise BadInputError(f"reference variant '{reference}' is not among the variants ({', '.join(variants)})")
    hashes = {name: sha256_file(path) for name, path in variants.items()}
    config = {**asdict(settings), "providers": [p.key for p in providers], "reference": reference}
    folder = out / f"validate-{content_hash({'cfg': config, 'in': hashes, 'n': len(samples)})}"
    record = StageRecord("validate", config, hashes)
    report: dict[str, Any] = {name: {"path": str(path.relative_to(out)) if path.is_relative_to(out) else str(path),
                                     "size_bytes": _size(path), "sha256": hashes[name], "providers": {}}
                              for name, path in variants.items()}
    # The reference runs first on the CPU EP: every fidelity figure is against its outputs.
    cpu = get_provider("cpu")
    order = [(reference, cpu)] + [(v, p) for v in variants for p in providers if (v, p.key) != (reference, "cpu")]
    reported = {p.key for p in providers}
    with stage_folder(folder, record) as tmp:
        run = _Run(adapter, samples, settings, variants[reference], tmp, cache_dir=out / "ep-cache")
        for name, path in variants.items():
            check_inputs_fit(path, run.latency_feed, variant=name)
        for variant, provider in get_reporter().track(order, total=len(order), title="validate variants x EPs"):
            entry = _measure_row(run, variants[variant], provider, is_reference=(variant, provider.key) == (reference, "cpu"),
                                 workdir=tmp / f"{variant}-{provider.key.replace('/', '_')}")
            if provider.key in reported:
                report[variant]["providers"][provider.key] = entry
            write_json(tmp / f"{variant}-{provider.key.replace('/', '_')}.json", entry)
        record.metrics = {"variants": report}
    return {"variants": report, "validation_folder": folder.name}


def _measure_row(run: _Run, path: Path, provider: ExecutionProvider, *, is_reference: bool,
                 workdir: Path) -> dict[str, Any]:
    eval_set = run.eval_set(provider)
    result = measure(path, latency_feed=run.latency_feed, evaluation_feeds=eval_set.feeds, workdir=workdir,
                     options=run.options(provider))
    if is_reference:
        run.remember_reference(result, len(eval_set.samples))
    if result.status != "ok" or result.how == "static-analysis":
        return provider_entry(result, {})
    reference_outputs = run.reference_outputs(eval_set)
    metrics = fidelity(reference_outputs, result.outputs, output=run.adapter.primary_output)
    metrics.update(run.adapter.task_metric(result.outputs, eval_set.samples))
    return {**provider_entry(result, metrics), "evaluation_samples": len(eval_set.samples)}


def provider_entry(result: ProbeResult, metrics: dict[str, float]) -> dict[str, Any]:
    """report.json's `providers.<key>` entry: status and how always; coverage only for static analysis."""
    entry: dict[str, Any] = {"status": result.status, "how": result.how}
    if result.status != "ok":
        entry["error"] = result.error
        return entry
    if result.how == "static-analysis":
        entry["coverage"] = result.coverage
        return entry
    entry.update(latency_ms=result.latency_ms, memory_mb=result.memory_mb, metrics=metrics, coverage=result.coverage)
    return entry


def check_inputs_fit(model_path: Path, feed: Feed, *, variant: str) -> None:
    """The data's arrays must match the model's inputs by name, rank, fixed dims and dtype (BadInputError)."""
    from edgepack.runtime.fixed_shape import feed_mismatch

    problem = feed_mismatch(model_path, feed)
    if problem is not None:
        raise BadInputError(f"variant '{variant}' ({Path(model_path).name}): {problem}")


def _size(path: Path) -> int:
    """Model bytes, external data included."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
