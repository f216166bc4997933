"""Run a recipe: export -> (distill, prune) -> quantize -> validate -> bundle -> report -> gates.

The model family (`edgepack.families`) answers every model-specific question; the stages (`edgepack.stages`) do
the work through the one stage runner, which names each folder by the content hash of its config and inputs: a
rerun with the same recipe and data reuses finished folders (resume), and any change makes a new one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgepack import __version__, stages
from edgepack.artifacts import read_manifest
from edgepack.calibration_data import (
    DataSplit,
    ImageFolderOptions,
    Sample,
    TextSample,
    read_samples,
    read_split,
    resolve_data_path,
    split_samples,
)
from edgepack.errors import BadInputError
from edgepack.families import FAMILIES, ModelFamily, open_model
from edgepack.recipe import Recipe
from edgepack.report import evaluate_gates, write_reports
from edgepack.report.model import (
    BundleInfo,
    DataInfo,
    DeviceInfo,
    QuantizationSummary,
    Report,
    StageSummary,
    Variant,
)
from edgepack.reporter import get_reporter
from edgepack.runner import StageResult, run_stage
from edgepack.runtime.harness import ValidationSettings
from edgepack.runtime.providers import parse_providers


def open_recipe_model(recipe: Recipe) -> ModelFamily:
    model = recipe.model
    return open_model(model.path, family=model.family, options=model.options, task=model.task, where="model")


def load_split(recipe: Recipe) -> DataSplit:
    data = recipe.data
    path = resolve_data_path(data.path)
    if path.is_dir():
        # an image folder: its samples are file names and views (pixels are decoded only when used), split by image
        images = ImageFolderOptions(views=data.images.views, on_error=data.images.on_error,
                                    max_pixels=data.images.max_pixels, seed=data.seed)
        samples = read_samples(path, format=data.format, field=data.field, label_field=data.label_field,
                               images=images)
        return split_samples(samples, n_calibration=data.n_calibration, n_evaluation=data.n_evaluation,
                             seed=data.seed, source=str(path), hold_out_labelled=data.images.hold_out_labelled)
    # streamed in two passes (a digest per record, then the chosen records): a 10 GB file is never held
    return read_split(path, format=data.format, field=data.field, pair_field=data.pair_field,
                      label_field=data.label_field, n_calibration=data.n_calibration,
                      n_evaluation=data.n_evaluation, seed=data.seed, source=str(path))


def load_evaluation_sets(recipe: Recipe) -> dict[str, list[Sample]]:
    """The recipe's named evaluation sets (`data.evaluation_sets`): name -> samples (the first max_samples)."""
    sets = {}
    for spec in recipe.data.evaluation_sets:
        samples = read_samples(resolve_data_path(spec.path), format=spec.format, field=spec.field,
                               pair_field=spec.pair_field, label_field=spec.label_field)
        sets[spec.name] = samples[: spec.max_samples]
    return sets


@dataclass
class RunContext:
    recipe: Recipe
    out: Path
    family: ModelFamily
    split: DataSplit
    stages: list[StageSummary] = field(default_factory=list)
    evaluation_sets: dict[str, list[Sample]] = field(default_factory=dict)
    #: what distill_texts read (corpus counts, mixing), for the distill stage's manifest
    data_stats: dict[str, Any] = field(default_factory=dict)

    def record(self, result: StageResult) -> StageResult:
        self.stages.append(stage_summary(result))
        return result


def stage_summary(result: StageResult) -> StageSummary:
    """The report's line for a stage folder: written by this run or reused, its time and peak memory."""
    manifest = result.manifest
    return StageSummary(stage=manifest.get("stage", "?"), folder=result.folder.name, reused=result.reused,
                        wall_time_s=manifest.get("wall_time_s"), peak_rss_mb=manifest.get("peak_rss_mb"))


# ---------------------------------------------------------------------------------------------------- compress


def distill_texts(ctx: RunContext) -> tuple[list[str], list[tuple[str, str]]]:
    """(training texts, held-out (text, paraphrase) pairs for early stopping).

    Without `distill.data`: the calibration split, its last fifth held out. With it: that file's texts (and pair
    texts), minus any text of the evaluation split, plus `combinations` random two-text concatenations.
    """
    calibration = ctx.split.calibration
    held = max(1, len(calibration) // 5)
    eval_pairs = [(s.text, s.pair) for s in calibration[-held:] if isinstance(s, TextSample) and s.pair]
    spec = ctx.recipe.distill.data
    if spec is None:
        texts = [s.text for s in calibration if isinstance(s, TextSample)]
        return (texts[:-held] if eval_pairs else texts), eval_pairs
    samples = read_samples(resolve_data_path(spec.path), format=spec.format, field=spec.field,
                           pair_field=spec.pair_field)
    held_samples = [*ctx.split.evaluation, *calibration[-held:],
                    *(s for samples_ in ctx.evaluation_sets.values() for s in samples_)]
    unseen = {text for s in held_samples if isinstance(s, TextSample) for text in (s.text, s.pair) if text}
    texts: list[str] = []
    for sample in samples:
        if not isinstance(sample, TextSample) or sample.text in unseen or (sample.pair and sample.pair in unseen):
            continue
        texts += [sample.text] + ([sample.pair] if sample.pair else [])
    texts = list(dict.fromkeys(texts))[: 2 * spec.max_samples if spec.max_samples else None]
    if not texts:
        raise BadInputError(f"distill.data {spec.path}: no training text left after holding out the evaluation "
                            "split; use a file with other text than data.path's")
    rng = np.random.default_rng(spec.seed)
    pairs = rng.integers(0, len(texts), size=(spec.combinations, 2)) if spec.combinations else np.zeros((0, 2), int)
    texts += [f"{texts[i]} {texts[j]}" for i, j in pairs if i != j]
    if spec.corpus is not None:
        texts, corpus_pairs = _with_corpus(ctx, spec.corpus, texts, held_out=unseen, seed=spec.seed)
        eval_pairs += corpus_pairs
    return texts, eval_pairs


def guard_training(name: str, section: Any, source: Path) -> None:
    """Refuse distillation or pruning's recovery training that would not fit in memory (`memory_guard`)."""
    from edgepack import memory_guard

    if name == "distill":
        layers = len(section.keep_layers) or section.num_layers
        estimate = memory_guard.estimate_training(source, batch_size=section.batch_size,
                                                  max_length=section.max_length, student_layers=layers,
                                                  precision=section.precision,
                                                  gradient_checkpointing=section.gradient_checkpointing)
    elif section.recovery_steps:
        estimate = memory_guard.estimate_training(source, batch_size=section.recovery_batch_size,
                                                  max_length=section.max_length, student_layers=None,
                                                  precision="fp32", gradient_checkpointing=False, step="prune")
    else:
        return
    memory_guard.check(estimate)


def _with_corpus(ctx: RunContext, corpus: Any, task_texts: list[str], *, held_out: set[str],
                 seed: int) -> tuple[list[str], list[tuple[str, str]]]:
    """The corpus' texts (streamed, de-duplicated, nothing resembling evaluation text) mixed with the task's."""
    from edgepack.calibration_data.corpus import mix, read_corpus

    texts, pairs, stats = read_corpus(resolve_data_path(corpus.path), field=corpus.field,
                                      pair_field=corpus.pair_field, max_samples=corpus.max_samples,
                                      near=corpus.near_duplicates, held_out=held_out,
                                      validation_pairs=corpus.validation_pairs)
    mixed = mix(texts, task_texts, task_share=corpus.task_share, seed=seed)
    ctx.data_stats = {"corpus": stats, "task_texts": len(task_texts), "task_share": corpus.task_share,
                      "training_texts": len(mixed)}
    return mixed, pairs


def width_multiple(recipe: Recipe, family: ModelFamily) -> int:
    """What pruned FFN / hidden widths are multiples of: 8 (SIMD-friendly GEMM shapes), and with weight-only
    quantization after the compression also every block size of it (MatMulNBits needs its block size to divide
    the input width of each MatMul: a third of SmolLM2's FFN removed in multiples of 8 left 1032, which block 32
    refused)."""
    from edgepack.compress.config import WIDTH_MULTIPLE

    section = recipe.quantize
    if not section.enabled or stages.quantize_mode(family, section) != "weight-only":
        return WIDTH_MULTIPLE
    sizes = [size for variant in section.weight_only.variants
             for size in (variant.block_size, variant.embedding_block_size) if size]
    return math.lcm(WIDTH_MULTIPLE, *sizes)


def stage_compress(ctx: RunContext) -> ModelFamily | None:
    """Distill and/or prune the model (HF folder in, HF folder out); the student as the same family, or None."""
    recipe, family = ctx.recipe, ctx.family
    if not (recipe.distill.enabled or recipe.prune.enabled):
        return None
    if family.compress_task is None or family.source.kind != "hf-folder":
        able = [n for n in FAMILIES if FAMILIES.get(n).compress_task]
        raise BadInputError(f"distill / prune: family {family.name} ({family.source.text}) cannot be compressed; "
                            f"families that can: {', '.join(able)} (from their Hugging Face folder); turn "
                            "distill.enabled and prune.enabled off")
    from edgepack.compress.stages import distill_model, prune_model

    texts, eval_pairs = distill_texts(ctx)
    source = Path(family.source.path or family.source.text)
    for name in ("distill", "prune"):
        section = getattr(recipe, name)
        if not section.enabled:
            continue
        section = section.model_copy(update={"task": section.task or family.compress_task,
                                              "width_multiple": section.width_multiple or width_multiple(recipe, family)})
        inputs = {"model": stages.model_fingerprint(open_model(str(source), family=family.name)),
                  "data": stages.samples_hash([TextSample(t) for t in texts])}

        def work(tmp: Path, name: str = name, section: Any = section, src: Path = source) -> dict[str, Any]:
            guard_training(name, section, src)
            if name == "distill":
                metrics = distill_model(src, tmp / "model", texts=texts, eval_pairs=eval_pairs, options=section)
                return {**metrics, "data": ctx.data_stats} if ctx.data_stats else metrics
            return prune_model(src, tmp / "model", texts=texts, options=section)

        result = ctx.record(run_stage(name, section.model_dump(), inputs, work, root=ctx.out))
        source = result.folder / "model"
    return open_model(str(source), family=family.name, options=recipe.model.options, task=recipe.model.task)


# ---------------------------------------------------------------------------------------------------- the run


def _check_recipe(recipe: Recipe) -> list[Any]:
    from edgepack.runtime.devices import get_device

    providers = parse_providers(",".join(recipe.validate_.providers))  # fail on a bad EP name before any work
    get_device(recipe.validate_.device)  # and on a malformed device URL
    if recipe.data.n_evaluation < 1:
        raise BadInputError("data.n_evaluation is 0; validation needs evaluation samples (e.g. 100)")
    return providers


def build_variants(ctx: RunContext) -> tuple[dict[str, Path], dict[str, str | None], ModelFamily]:
    """Every model the run makes, and what each is compared to; the family of the last FP32 model."""
    split, data = ctx.split, ctx.recipe.data
    check = split.evaluation or split.calibration
    fp32 = ctx.record(stages.export(ctx.family, check_samples=check, options=ctx.recipe.export,
                                    max_length=data.max_length, root=ctx.out))
    variants: dict[str, Path] = {"fp32": fp32.folder / "model.onnx"}
    compared: dict[str, str | None] = {"fp32": None}
    last, last_family = "fp32", ctx.family
    student = stage_compress(ctx)
    if student is not None:
        exported = ctx.record(stages.export(student, check_samples=check, options=ctx.recipe.export,
                                            max_length=data.max_length, root=ctx.out))
        variants["compressed-fp32"], compared["compressed-fp32"] = exported.folder / "model.onnx", "fp32"
        last, last_family = "compressed-fp32", student
    options = ctx.recipe.quantize
    if options.enabled and stages.quantize_mode(last_family, options) == "weight-only":
        section = options.weight_only
        for variant in section.variants:
            done = ctx.record(stages.quantize_weight_only(variants[last], last_family, calibration=split.calibration,
                                                          section=section, variant=variant, root=ctx.out,
                                                          cache_dir=ctx.out / "cache"))
            variants[variant.name], compared[variant.name] = done.folder / "model.onnx", last
        return variants, compared, last_family
    recipe = options.recipe if options.recipe != "auto" else last_family.quant_recipe
    graphs = stages.int8_variants(options.graph, fp32=variants[last], recipe=recipe,
                                  providers=ctx.recipe.validate_.providers) if options.enabled else {}
    for name, graph in graphs.items():  # one INT8 variant, or fused (CPU EPs) + qdq (NPUs) for a mixed EP list
        int8 = ctx.record(stages.quantize(variants[last], last_family, calibration=split.calibration,
                                          options=options.model_copy(update={"graph": graph}),
                                          max_length=data.max_length, padding=data.padding, root=ctx.out,
                                          cache_dir=ctx.out / "cache", providers=ctx.recipe.validate_.providers))
        variants[name], compared[name] = int8.folder / "model.onnx", last
    return variants, compared, last_family


def quantization_summary(manifest: dict[str, Any], folder: str) -> QuantizationSummary:
    """What the report says about the INT8 stage: plan, SmoothQuant alphas, budget, fallback, sensitive layers."""
    metrics = manifest.get("metrics", {})
    budget = metrics.get("budget") or {}
    return QuantizationSummary(
        stage=folder,
        recipe=manifest.get("config", {}).get("recipe"),
        plan_notes=metrics.get("plan", {}).get("notes", []),
        smoothquant=metrics.get("smoothquant", {}),
        budget={k: budget.get(k) for k in ("max_cosine_drop", "met", "check_samples", "check_fidelity",
                                           "fallback_nodes")} if budget else None,
        sensitivity_top=budget.get("sensitivity_top", []),
        range_cache_hit=(metrics.get("range_cache") or {}).get("hit"),
    )


def weight_only_summary(variants: dict[str, Path], recipe: Recipe) -> QuantizationSummary:
    """What each weight-only variant is (bits, block, method, embedding treatment, mixed plan), from its manifest."""
    names = [v.name for v in recipe.quantize.weight_only.variants if v.name in variants]
    folders = {name: variants[name].parent for name in names}
    return QuantizationSummary(stage=", ".join(f.name for f in folders.values()), mode="weight-only",
                               variants={name: (read_manifest(folder) or {}).get("metrics", {})
                                         for name, folder in folders.items()})


def run_recipe(recipe: Recipe, out: Path) -> Report:
    """Run every stage; write report.json/md/html into `out`; return the report (gates evaluated, not raised)."""
    providers = _check_recipe(recipe)
    out.mkdir(parents=True, exist_ok=True)
    family = open_recipe_model(recipe)
    ctx = RunContext(recipe, out, family, load_split(recipe), evaluation_sets=load_evaluation_sets(recipe))
    variants, compared, last_family = build_variants(ctx)
    v = recipe.validate_
    settings = ValidationSettings(sequence_length=v.sequence_length, max_length=recipe.data.max_length,
                                  threads=v.threads, warmup=v.warmup, runs=v.runs, device=v.device)
    validated = ctx.record(stages.validate(variants, last_family, samples=ctx.split.evaluation, providers=providers,
                                           settings=settings, compared_to=compared, root=out,
                                           cache_dir=out / "ep-cache", evaluation_sets=ctx.evaluation_sets))
    report = Report(
        edgepack_version=__version__, recipe=recipe.dump(), device=_device_info(validated.metrics),
        model=_model_record(family, variants["fp32"]),
        data=DataInfo(path=recipe.data.path, n_calibration=len(ctx.split.calibration),
                      n_evaluation=len(ctx.split.evaluation), hash=stages.samples_hash(ctx.split.evaluation)),
        reference="fp32", primary_output=family.primary_output, passed=True,
        variants=_report_variants(variants, validated.metrics["variants"], out),
        validation_folder=validated.folder.name)
    weight_only = recipe.quantize.enabled and stages.quantize_mode(last_family, recipe.quantize) == "weight-only"
    if "int8" in variants and not weight_only:
        folder = variants["int8"].parent
        report.quantization = quantization_summary(read_manifest(folder) or {}, folder.name)
    elif weight_only:
        report.quantization = weight_only_summary(variants, recipe)
    report.notes += family.report_notes()
    final = list(variants)[-1]
    if recipe.bundle.enabled:
        entries = report.variants[final].providers
        done = {ep: {"status": e.status, "how": e.how} for ep, e in entries.items()}
        bundled = ctx.record(stages.bundle(variants[final], last_family, samples=ctx.split.evaluation,
                                           options=recipe.bundle, max_length=recipe.data.max_length, validated=done,
                                           root=out))
        report.bundle = BundleInfo(path=bundled.folder.name, variant=final)
    report.stages = ctx.stages
    report.gates = evaluate_gates(report, recipe.gates, final=final)
    report.passed = all(g.passed for g in report.gates)
    write_reports(report, out)
    get_reporter().info(f"report: {out / 'report.md'}")
    return report


def _device_info(metrics: dict[str, Any]) -> DeviceInfo | None:
    """The validate stage's device block (None in a folder written before edgepack recorded it)."""
    return DeviceInfo.model_validate(metrics["device"]) if metrics.get("device") else None


def _model_record(family: ModelFamily, reference: Path) -> dict[str, Any]:
    """The family's description plus the reference graph's signature (`edgepack compare` matches reports by it)."""
    from edgepack.families.onnx_model import graph_signature

    return {**family.describe(), "signature": graph_signature(reference)}


def _report_variants(variants: dict[str, Path], results: dict[str, Any], out: Path) -> dict[str, Variant]:
    rows = {}
    for name, path in variants.items():
        entry = results[name]
        rel = str(path.relative_to(out)) if path.is_relative_to(out) else str(path)
        rows[name] = Variant(path=rel, size_bytes=entry["size_bytes"], sha256=entry["sha256"],
                             compared_to=entry.get("compared_to"), providers=entry["providers"],
                             evaluation_sets=entry.get("evaluation_sets", {}))
    return rows


def validate_files(model: Path, family: ModelFamily, *, reference: Path | None, samples: list[Any],
                   providers: list[Any], settings: ValidationSettings, out: Path, data_path: str | None,
                   write: bool, generated: Any = None) -> Report:
    """`edgepack validate`: the validate stage on ONNX files (a model, optionally against a reference); without
    data, on `generated` inputs (`families.generated.GeneratedInputs`)."""
    variants = {"reference": Path(reference).resolve(), "model": Path(model).resolve()} if reference else \
        {"model": Path(model).resolve()}
    compared: dict[str, str | None] = {"reference": None, "model": "reference"} if reference else {"model": None}
    out.mkdir(parents=True, exist_ok=True)
    result = stages.validate(variants, family, samples=samples, providers=providers, settings=settings,
                             compared_to=compared, root=out.resolve(), cache_dir=out.resolve() / "ep-cache",
                             generated=generated)
    name = next(iter(variants))
    data = DataInfo(path=data_path, n_calibration=0, n_evaluation=len(samples), hash=stages.samples_hash(samples)) \
        if generated is None else DataInfo(path="none: inputs generated from the model's signature", n_calibration=0,
                                           n_evaluation=0, generated=generated.description)
    report = Report(
        edgepack_version=__version__,
        recipe={"name": "validate", "validate": {"sequence_length": settings.sequence_length,
                                                 "threads": settings.threads, "warmup": settings.warmup,
                                                 "runs": settings.runs, "device": settings.device}},
        device=_device_info(result.metrics), model=_model_record(family, variants[name]), data=data,
        reference=name, primary_output=family.primary_output, passed=True,
        variants=_report_variants(variants, result.metrics["variants"], out.resolve()),
        validation_folder=result.folder.name, stages=[stage_summary(result)])
    if write:
        write_reports(report, out)
    return report
