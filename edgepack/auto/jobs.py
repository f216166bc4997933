"""What a worker does for a candidate: build it through the normal stages, or measure it on part of the split.

Jobs are frozen dataclasses of plain values and return JSON-able dicts, so the same function runs in this
process, in a local process pool or as a Ray task on another machine (the run folder must then be on a shared
filesystem: every stage folder is written there, content-hashed, so candidates that share a stage share its folder
and a rerun reuses it). A candidate that edgepack refuses (a prune ratio the model cannot take, an INT8 budget the
fallback cannot meet) is a result with its one-line reason, never an exception that stops the search.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import EdgepackError


@dataclass(frozen=True)
class BuildJob:
    """Run the candidate's stages (export, distill / prune, export, quantize) into `root`."""

    recipe: dict[str, Any]
    root: str
    label: str


@dataclass(frozen=True)
class EvalJob:
    """Measure `model` on the first `samples` evaluation samples in a fresh process (`runtime.probe`)."""

    recipe: dict[str, Any]
    root: str
    model: str
    samples: int
    runs: int
    provider: str
    label: str
    #: the FP32 reference's primary output on the same samples (its own evaluate stage's `primary.npz`): the
    #: candidate's fidelity (cosine_mean, cosine_min, ...) is measured against it; None for the reference itself
    reference_outputs: str | None = None


#: the primary output of every evaluation feed, saved in each evaluate stage folder (arr_0, arr_1, ... in feed order)
PRIMARY_OUTPUTS = "primary.npz"


def _quiet() -> None:
    """Workers report through the search's table, not their own progress lines."""
    from edgepack.reporter import Reporter, set_reporter

    set_reporter(Reporter(quiet=True))


def _failure(error: BaseException) -> dict[str, Any]:
    from edgepack.runtime.probe_child import one_line

    code = getattr(error, "exit_code", 1)
    return {"ok": False, "error": one_line(error), "exit_code": code}


def run_job(job: BuildJob | EvalJob) -> dict[str, Any]:
    """The one entry point a backend calls (picklable: a module-level function)."""
    _quiet()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    try:
        result = build(job) if isinstance(job, BuildJob) else evaluate(job)
    except EdgepackError as error:  # bad candidate or unmet INT8 budget: this candidate's result
        result = _failure(error)
    except (RuntimeError, ValueError, MemoryError, OSError) as error:  # a library refusing a candidate's shape
        result = {**_failure(error), "exit_code": 1}
    return {**result, "worker": worker}


def build(job: BuildJob) -> dict[str, Any]:
    from edgepack.artifacts import sha256_file
    from edgepack.onnx_files import model_bytes
    from edgepack.pipeline import RunContext, build_variants, load_split, open_recipe_model
    from edgepack.recipe import parse_recipe
    from edgepack.runtime.fixed_shape import initializer_bytes

    recipe = parse_recipe(job.recipe, source=job.label)
    root = Path(job.root)
    ctx = RunContext(recipe, root, open_recipe_model(recipe), load_split(recipe))
    variants, _, _ = build_variants(ctx)
    final = list(variants)[-1]
    path = variants[final]
    return {"ok": True, "model": str(path), "variant": final, "reference": str(variants["fp32"]),
            "size_bytes": model_bytes(path), "model_sha256": sha256_file(path), "weights_mb": initializer_bytes(path) / 2**20,
            "stages": [s.model_dump() for s in ctx.stages], "quantize_check": _quantize_check(path.parent, final)}


def _quantize_check(folder: Path, variant: str) -> dict[str, Any] | None:
    """The INT8 stage's own proxy: fidelity vs FP32 on its budget samples, and how many layers stayed float."""
    if variant != "int8":
        return None
    from edgepack.artifacts import read_manifest

    budget = ((read_manifest(folder) or {}).get("metrics") or {}).get("budget") or {}
    return {"cosine_mean": (budget.get("check_fidelity") or {}).get("cosine_mean"),
            "float_layers": len(budget.get("fallback_nodes") or [])} if budget else None


def evaluate(job: EvalJob) -> dict[str, Any]:
    """Task metrics, latency and memory of one model on a prefix of the evaluation split, as a cached stage."""
    from edgepack import stages
    from edgepack.artifacts import sha256_file
    from edgepack.families import open_model
    from edgepack.pipeline import load_split
    from edgepack.recipe import parse_recipe
    from edgepack.runner import run_stage
    from edgepack.runtime.probe import ProbeOptions, measure

    recipe = parse_recipe(job.recipe, source=job.label)
    family = open_model(job.model, options=recipe.model.options, task=recipe.model.task)
    samples = list(load_split(recipe).evaluation[: job.samples])
    v = recipe.validate_
    config = {"samples": len(samples), "runs": job.runs, "provider": job.provider, "threads": v.threads,
              "sequence_length": v.sequence_length, "max_length": recipe.data.max_length, "fidelity": True}
    inputs = {"model": sha256_file(Path(job.model)), "data": stages.samples_hash(samples),
              # the reference's evaluate folder is named by its content hash
              "reference": Path(job.reference_outputs).parent.name if job.reference_outputs else None}

    def work(tmp: Path) -> dict[str, Any]:
        options = ProbeOptions(provider=job.provider, intra_op_threads=v.threads, warmup=min(3, v.warmup),
                               runs=job.runs, device=v.device)
        result = measure(Path(job.model), latency_feed=family.latency_feed(samples, sequence_length=v.sequence_length),
                         evaluation_feeds=family.evaluation_feeds(samples, max_length=recipe.data.max_length),
                         workdir=tmp, options=options)
        if result.status != "ok":  # not cached: a timeout on a loaded machine may pass next time
            raise EdgepackError(f"{job.provider}: {result.status}: {result.error}")
        memory = result.memory_mb
        primary = [out[family.primary_output] for out in result.outputs]
        np.savez(tmp / PRIMARY_OUTPUTS, *primary)
        fidelity, note = _fidelity_to_reference(family, job.reference_outputs, primary)
        return {"metrics": {**family.task_metrics(result.outputs, samples), **fidelity}, "fidelity_note": note,
                "p50_ms": result.latency_ms.get("p50"), "p90_ms": result.latency_ms.get("p90"),
                "peak_mb": memory.get("peak"), "baseline_mb": memory.get("baseline")}

    stage = run_stage("evaluate", config, inputs, work, root=Path(job.root) / "auto")
    return {"ok": True, "samples": len(samples), **stage.metrics, "outputs": str(stage.folder / PRIMARY_OUTPUTS)}


def _fidelity_to_reference(family: Any, reference_outputs: str | None,
                           primary: list[Any]) -> tuple[dict[str, float], str | None]:
    """The family's fidelity figures (cosine_mean, cosine_min, ...) of `primary` against the reference's saved
    primary output, or none and the harness's note when the shapes differ (a narrower student)."""
    if reference_outputs is None:
        return {}, None
    from edgepack.runtime.harness import _fidelity

    name = family.primary_output
    with np.load(reference_outputs) as saved:
        reference = [{name: saved[f"arr_{i}"]} for i in range(len(saved.files))]
    return _fidelity(family, reference, [{name: p} for p in primary], parent="fp32")


__all__ = ["BuildJob", "EvalJob", "build", "evaluate", "run_job"]
