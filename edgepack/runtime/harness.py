"""Validation harness: every variant x execution provider measured in a fresh subprocess, fidelity vs its parent.

Each variant is compared to the variant it was made from (`compared_to`: INT8 to the FP32 it was quantized from,
a student to its teacher), on that variant's CPU EP outputs for the same evaluation samples, so a user reads
e.g. "INT8 on CPU: cosine 0.996" against FP32. The family computes the figures (`ModelFamily.fidelity` and
`task_metrics`); outputs of different shapes (a narrower student) get task metrics and a `fidelity_note` only.

Emulated EPs (QNN HTP on an x86 host) run a simulator that takes seconds to a minute per inference, so they
see the first `emulated_samples` evaluation samples only, with `emulated_runs` timed runs and no warm-up; the
reference is then re-run on the CPU on exactly those samples, so fidelity still compares like with like, and
the row's `evaluation_samples` says how many samples its metrics cover. Static-analysis rows carry coverage only.

Every row runs on `settings.device` ("local", ssh://..., adb://...: `devices.py`) and carries its label. Without
data (`generated`, a feed made from the model's signature) rows get latency, memory and coverage, and a
`fidelity_note` saying there is no reference data instead of a fidelity figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.artifacts import write_json
from edgepack.calibration_data import Feed, Sample
from edgepack.errors import BadInputError, EdgepackError
from edgepack.families import ModelFamily
from edgepack.reporter import get_reporter
from edgepack.runtime.probe import ProbeOptions, ProbeResult, TaskResult, measure, measure_task
from edgepack.runtime.providers import ExecutionProvider, get_provider

#: the fidelity_note of a row measured on generated inputs
NO_REFERENCE_DATA = ("no reference data: inputs generated from the model's signature, so no fidelity figure; pass "
                     "--data for fidelity against the reference")


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
    device: str = "local"  # where the probe children run (`runtime/devices.py`)

    def __post_init__(self) -> None:
        for name in ("sequence_length", "max_length", "runs", "emulated_samples", "emulated_runs"):
            if getattr(self, name) < 1:
                raise BadInputError(f"validation setting {name}={getattr(self, name)!r}: must be >= 1")


@dataclass(frozen=True)
class _EvalSet:
    samples: Sequence[Sample]
    feeds: list[Feed]


class _Run:
    """State of one validation: the evaluation sets, and each variant's CPU outputs on each of them."""

    def __init__(self, family: ModelFamily, variants: Mapping[str, Path], samples: Sequence[Sample],
                 settings: ValidationSettings, workdir: Path, cache_dir: Path, generated: Feed | None) -> None:
        self.family, self.variants, self.settings, self.workdir = family, variants, settings, workdir
        self.cache_dir = cache_dir  # outside the hashed stage folder, so TensorRT engines survive reruns
        if generated is not None:  # data-free: latency, memory and coverage only
            self.full, self.latency_feed = _EvalSet([], []), generated
        else:
            self.full = _EvalSet(samples, family.evaluation_feeds(samples, max_length=settings.max_length))
            self.latency_feed = family.latency_feed(samples, sequence_length=settings.sequence_length)
        self._cpu_outputs: dict[tuple[str, int], list[Any]] = {}
        self.tasks = family.probe_tasks(samples, settings=settings)  # the family's own measurements, if any
        self._cpu_tasks: dict[str, dict[str, TaskResult]] = {}

    def eval_set(self, provider: ExecutionProvider) -> _EvalSet:
        if provider.how != "emulated" or len(self.full.samples) <= self.settings.emulated_samples:
            return self.full
        subset = self.full.samples[: self.settings.emulated_samples]
        return _EvalSet(subset, self.family.evaluation_feeds(subset, max_length=self.settings.max_length))

    def options(self, provider: ExecutionProvider) -> ProbeOptions:
        s = self.settings
        if provider.how == "emulated":
            return ProbeOptions(provider=provider.key, intra_op_threads=s.threads, warmup=0, runs=s.emulated_runs,
                                timeout_s=s.emulated_timeout_s, cache_dir=self.cache_dir, device=s.device)
        return ProbeOptions(provider=provider.key, intra_op_threads=s.threads, warmup=s.warmup, runs=s.runs,
                            timeout_s=s.timeout_s, cache_dir=self.cache_dir, device=s.device)

    def cpu_outputs(self, variant: str, eval_set: _EvalSet) -> list[Any]:
        """`variant`'s CPU outputs on `eval_set` (the yardstick of the variants compared to it); a subset costs one
        short extra CPU run."""
        count = len(eval_set.samples)
        if (variant, count) not in self._cpu_outputs:
            options = ProbeOptions(provider="cpu", intra_op_threads=self.settings.threads, warmup=0, runs=1,
                                   timeout_s=self.settings.timeout_s, device=self.settings.device)
            result = measure(self.variants[variant], latency_feed=self.feed_for(variant),
                             evaluation_feeds=eval_set.feeds, workdir=self.workdir / f"reference-{variant}-{count}",
                             options=options)
            self.remember(variant, result, count)
        return self._cpu_outputs[(variant, count)]

    def feed_for(self, variant: str) -> Feed:
        return self.family.feed_for(self.latency_feed, self.variants[variant])

    def task_results(self, variant: str, provider: ExecutionProvider, workdir: Path) -> dict[str, TaskResult]:
        """The family's tasks on `variant` x `provider`, each in a fresh process; CPU results are kept (parents')."""
        if provider.key == "cpu" and variant in self._cpu_tasks:
            return self._cpu_tasks[variant]
        options = ProbeOptions(provider=provider.key, intra_op_threads=self.settings.threads,
                               timeout_s=self.settings.timeout_s, cache_dir=self.cache_dir)
        results = {task.name: measure_task(self.variants[variant], task=task, workdir=workdir / f"task-{task.name}",
                                           options=options) for task in self.tasks}
        if provider.key == "cpu":
            self._cpu_tasks[variant] = results
        return results

    def remember(self, variant: str, result: ProbeResult, count: int) -> None:
        if result.status != "ok":
            raise EdgepackError(f"variant '{variant}', which others are compared to, failed on the CPU EP: "
                                f"{result.error}")
        self._cpu_outputs[(variant, count)] = result.outputs


def evaluate_sets(variants: Mapping[str, Path], *, family: ModelFamily, sets: Mapping[str, Sequence[Sample]],
                  workdir: Path, settings: ValidationSettings) -> dict[str, dict[str, Any]]:
    """{variant: {set name: {samples, metrics}}}: the family's task metrics on each named set, CPU EP, one fresh
    process per variant and set (outputs only: one timed run, no warm-up)."""
    results: dict[str, dict[str, Any]] = {name: {} for name in variants}
    options = ProbeOptions(provider="cpu", intra_op_threads=settings.threads, warmup=0, runs=1,
                           timeout_s=settings.timeout_s, device=settings.device)
    for set_name, set_samples in sets.items():
        feeds = family.evaluation_feeds(set_samples, max_length=settings.max_length)
        latency_feed = family.latency_feed(set_samples[:8], sequence_length=8)
        for variant, path in get_reporter().track(list(variants.items()), total=len(variants),
                                                  title=f"evaluation set {set_name}"):
            result = measure(path, latency_feed=latency_feed, evaluation_feeds=feeds,
                             workdir=workdir / f"set-{set_name}-{variant}", options=options)
            if result.status != "ok":
                raise EdgepackError(f"variant '{variant}' failed on evaluation set '{set_name}': {result.error}")
            results[variant][set_name] = {"samples": len(set_samples),
                                          "metrics": family.task_metrics(result.outputs, set_samples)}
    return results


def validate_variants(variants: Mapping[str, Path], *, family: ModelFamily, samples: Sequence[Sample],
                      providers: Sequence[ExecutionProvider], workdir: Path, settings: ValidationSettings,
                      compared_to: Mapping[str, str | None], cache_dir: Path,
                      generated: Feed | None = None) -> dict[str, Any]:
    """Measure each variant on each provider; return {variant: report.json's variant entry (providers filled)}.

    `compared_to[v]` names the variant whose CPU outputs v's fidelity is measured against (None: none, e.g. the
    reference itself is compared to itself). Every CPU row of a variant others are compared to runs before them.
    A variant whose inputs do not fit the data is a BadInputError before anything runs; an EP that rejects a
    variant is that row's "failed" status (with ONNX Runtime's message), and the other rows still run.
    `generated`: the latency feed when there are no samples (rows then carry no fidelity, see NO_REFERENCE_DATA).
    """
    for name, parent in compared_to.items():
        if parent is not None and parent not in variants:
            raise BadInputError(f"variant '{name}' is compared to '{parent}', which is not among the variants "
                                f"({', '.join(variants)})")
    cpu = get_provider("cpu")
    order = [(v, cpu) for v in variants] + [(v, p) for v in variants for p in providers if p.key != "cpu"]
    reported = {p.key for p in providers}
    report: dict[str, Any] = {name: {"providers": {}, "compared_to": compared_to.get(name)} for name in variants}
    run = _Run(family, variants, samples, settings, workdir, cache_dir=cache_dir, generated=generated)
    for name, path in variants.items():
        check_inputs_fit(path, run.feed_for(name), variant=name)
    for variant, provider in get_reporter().track(order, total=len(order), title="validate variants x EPs"):
        label = f"{variant}-{provider.key.replace('/', '_')}"
        entry = _measure_row(run, variant, provider, parent=compared_to.get(variant) or variant,
                             workdir=workdir / label)
        entry["device"] = settings.device.split("?", 1)[0]  # the URL without its options (key paths)
        if provider.key in reported:
            report[variant]["providers"][provider.key] = entry
        write_json(workdir / f"{label}.json", entry)
    return report


def _measure_row(run: _Run, variant: str, provider: ExecutionProvider, *, parent: str,
                 workdir: Path) -> dict[str, Any]:
    eval_set = run.eval_set(provider)
    result = measure(run.variants[variant], latency_feed=run.feed_for(variant), evaluation_feeds=eval_set.feeds,
                     workdir=workdir, options=run.options(provider))
    if provider.key == "cpu" and result.status == "ok":
        run.remember(variant, result, len(eval_set.samples))
    if result.status != "ok" or result.how == "static-analysis":
        return provider_entry(result, {})
    if not eval_set.samples:
        return {**provider_entry(result, {}), "evaluation_samples": 0, "fidelity_note": NO_REFERENCE_DATA}
    reference_outputs = run.cpu_outputs(parent, eval_set)
    metrics, note = _fidelity(run.family, reference_outputs, result.outputs, parent=parent)
    metrics.update(run.family.task_metrics(result.outputs, eval_set.samples))
    entry = {**provider_entry(result, metrics), "evaluation_samples": len(eval_set.samples)}
    if note:
        entry["fidelity_note"] = note
    if run.tasks and provider.how == "device":
        _add_tasks(run, entry, variant, provider, parent=parent, workdir=workdir)
    return entry


def _add_tasks(run: _Run, entry: dict[str, Any], variant: str, provider: ExecutionProvider, *, parent: str,
               workdir: Path) -> None:
    """The family's task figures (against the parent's CPU results) into the row: metrics, memory plan, errors."""
    results = run.task_results(variant, provider, workdir)
    # the reference variant is compared to itself (ratios 1, agreements 1), as cosines are for the other families
    reference = results if parent == variant else run.task_results(parent, get_provider("cpu"), workdir.parent / parent)
    report = run.family.task_report(results, reference, model=run.variants[variant])
    entry["metrics"].update(report.get("metrics", {}))
    if report.get("memory_plan"):
        entry["memory_plan"] = report["memory_plan"]
    if report.get("errors"):
        entry["task_errors"] = report["errors"]


def _fidelity(family: ModelFamily, reference: Sequence[Any], outputs: Sequence[Any], *,
              parent: str) -> tuple[dict[str, float], str | None]:
    """The family's fidelity figures, or none with a note when the outputs cannot be compared element-wise (a
    distilled student whose embedding is narrower than its teacher's is compared by task metric only)."""
    name = family.primary_output
    if not reference or not outputs:  # a family scored by its probe tasks only (causal-lm)
        return {}, None
    ref_shape, got_shape = reference[0][name].shape, outputs[0][name].shape
    if ref_shape != got_shape:
        return {}, (f"'{name}' is {list(got_shape)} here and {list(ref_shape)} in '{parent}': no cosine; compared "
                    "by task metric only")
    return family.fidelity(reference, outputs), None


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
