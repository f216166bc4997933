"""Run a recipe: export -> quantize -> validate (fresh subprocess per variant x EP) -> report -> gates.

Each stage is a function from artifact to artifact. Its folder is named by the content hash of its config and
inputs, so a rerun with the same recipe and data reuses finished folders (resume), and any change makes a new one.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack import __version__
from edgepack.artifacts import StageRecord, content_hash, read_manifest, sha256_file, stage_folder
from edgepack.calibration_data import DataSplit, Feed, TextSample, read_samples, resolve_data_path, split_samples
from edgepack.errors import BadInputError
from edgepack.exporters.onnx import ExportOptions, export_onnx
from edgepack.models import ModelAdapter, default_model_path, get_adapter
from edgepack.models.torch_module import InputSpec
from edgepack.quantization.quantize import QuantizeOptions, RangeCache, quantize_static
from edgepack.quantization.sensitivity import QuantBudget
from edgepack.recipe import Recipe
from edgepack.report import evaluate_gates, write_reports
from edgepack.reporter import get_reporter
from edgepack.runtime.harness import ValidationSettings, validate_variants
from edgepack.runtime.providers import parse_providers


@dataclass
class RunContext:
    recipe: Recipe
    out: Path
    adapter: ModelAdapter
    split: DataSplit
    data_hash: str


def build_adapter(recipe: Recipe) -> ModelAdapter:
    model = recipe.model
    if model.adapter == "torch-module":
        inputs = [InputSpec(i.name, tuple(i.shape), i.dtype) for i in model.inputs]
        return get_adapter("torch-module", model.path, inputs=inputs, outputs=model.outputs)
    source = default_model_path() if model.path == "default" else model.path
    return get_adapter("hf-encoder", source, pooling=model.pooling)


def load_split(recipe: Recipe) -> DataSplit:
    data = recipe.data
    path = resolve_data_path(data.path)
    samples = read_samples(path, format=data.format, field=data.field, pair_field=data.pair_field)
    return split_samples(samples, n_calibration=data.n_calibration, n_evaluation=data.n_evaluation,
                         seed=data.seed, source=str(path))


def _model_fingerprint(source: str | Path) -> str:
    """sha256 over the model folder's files (a local HF folder), or the import path (torch-module)."""
    path = Path(source)
    if not path.is_dir():
        return content_hash(str(source))
    return content_hash({str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()})


def _split_hash(split: DataSplit) -> str:
    def key(sample: Any) -> Any:
        if isinstance(sample, dict):
            return {k: content_hash(v.tobytes().hex()) for k, v in sample.items()}
        return [sample.text, sample.pair]

    return content_hash({"cal": [key(s) for s in split.calibration], "eval": [key(s) for s in split.evaluation]})


def _cached(folder: Path) -> dict[str, Any] | None:
    manifest = read_manifest(folder)
    if manifest is not None:
        get_reporter().info(f"[dim]reusing {folder.name} (same config and inputs)[/dim]")
    return manifest


def stage_export(ctx: RunContext, adapter: ModelAdapter) -> Path:
    cfg = ctx.recipe.export
    record_cfg = {"model": adapter.describe(), **cfg.model_dump()}
    inputs = {"model": _model_fingerprint(adapter.source), "data": ctx.data_hash}
    folder = ctx.out / f"export-{content_hash({'stage': 'export', 'cfg': record_cfg, 'in': inputs, 'v': __version__})}"
    if _cached(folder):
        return folder / "model.onnx"
    record = StageRecord("export", record_cfg, inputs)
    check_samples = (ctx.split.evaluation or ctx.split.calibration)[: cfg.check_samples]
    feeds = list(adapter.feeds(check_samples, batch_size=1, max_length=ctx.recipe.data.max_length))
    with get_reporter().step("export to ONNX and check against PyTorch"), stage_folder(folder, record) as tmp:
        record.metrics = export_onnx(adapter, tmp / "model.onnx", check_feeds=feeds,
                                     options=ExportOptions(opset=cfg.opset, atol=cfg.atol))
    return folder / "model.onnx"


def _texts(samples: Any) -> list[str]:
    return [s.text for s in samples if isinstance(s, TextSample)]


def stage_compress(ctx: RunContext) -> ModelAdapter | None:
    """Distill and/or prune the teacher (HF folder in, HF folder out); None when both are off."""
    recipe = ctx.recipe
    if not (recipe.distill.enabled or recipe.prune.enabled):
        return None
    if recipe.model.adapter != "hf-encoder":
        raise BadInputError("distill / prune need model.adapter hf-encoder (a Hugging Face folder); turn them off "
                            "for torch-module models")
    from edgepack.compress.stages import distill_model, prune_model

    # Training and importance data: the calibration split. Distillation's early stopping watches the last fifth
    # of it (held out from training), never the evaluation split, so the report's figures stay unbiased.
    texts = _texts(ctx.split.calibration)
    held = max(1, len(ctx.split.calibration) // 5)
    eval_pairs = [(s.text, s.pair) for s in ctx.split.calibration[-held:] if isinstance(s, TextSample) and s.pair]
    source = Path(ctx.adapter.source)
    steps: list[tuple[str, Any]] = []
    if recipe.distill.enabled:
        steps.append(("distill", lambda src, dst: distill_model(src, dst, texts=texts[:-held] if eval_pairs else texts,
                                                                eval_pairs=eval_pairs, options=recipe.distill)))
    if recipe.prune.enabled:
        steps.append(("prune", lambda src, dst: prune_model(src, dst, texts=texts, options=recipe.prune)))
    for name, run in steps:
        section = getattr(recipe, name)
        inputs = {"model": _model_fingerprint(source), "data": ctx.data_hash}
        folder = ctx.out / f"{name}-{content_hash({'stage': name, 'cfg': section.model_dump(), 'in': inputs, 'v': __version__})}"
        if not _cached(folder):
            record = StageRecord(name, section.model_dump(), inputs)
            with stage_folder(folder, record) as tmp:
                record.metrics = run(source, tmp / "model")
        source = folder / "model"
    return get_adapter("hf-encoder", str(source), pooling=recipe.model.pooling)


def stage_quantize(ctx: RunContext, fp32: Path) -> Path:
    q = ctx.recipe.quantize
    options = QuantizeOptions(calibrator=q.calibrator, smoothquant=q.smoothquant, family=q.family,
                              per_channel=q.per_channel, activation_type=q.activation_type,
                              weight_type=q.weight_type, exclude_nodes=tuple(q.exclude_nodes))
    data = ctx.recipe.data
    inputs = {"model": sha256_file(fp32), "data": ctx.data_hash}
    record_cfg = {**q.model_dump(), "max_length": data.max_length, "padding": data.padding}
    folder = ctx.out / f"quantize-{content_hash({'stage': 'quantize', 'cfg': record_cfg, 'in': inputs, 'v': __version__})}"
    if _cached(folder):
        return folder / "model.onnx"
    record = StageRecord("quantize", record_cfg, inputs)

    def calibration_feeds() -> Iterator[Feed]:
        return ctx.adapter.feeds(ctx.split.calibration, batch_size=1, max_length=data.max_length, padding=data.padding)

    with stage_folder(folder, record) as tmp:
        get_reporter().info(f"- static INT8: calibrating on {len(ctx.split.calibration)} samples")
        budget = None if q.max_cosine_drop is None else QuantBudget(q.max_cosine_drop, q.max_fallback_layers)
        check = list(ctx.adapter.feeds(ctx.split.calibration[: q.budget_samples], max_length=data.max_length))
        cache = RangeCache(ctx.out / "cache", content_hash({"data": ctx.data_hash, "max_length": data.max_length,
                                                            "padding": data.padding,
                                                            "tokenizer": str(ctx.adapter.source)}))
        metrics = quantize_static(fp32, tmp / "model.onnx", calibration_feeds=calibration_feeds,
                                  n_calibration=len(ctx.split.calibration), options=options, budget=budget,
                                  check=(check, ctx.adapter.primary_output), cache=cache,
                                  sensitivity_top=q.sensitivity_top)
        (tmp / "tensor_ranges.json").write_text(json.dumps(metrics.pop("tensor_ranges"), indent=1))
        record.metrics = metrics
    return folder / "model.onnx"


def stage_bundle(ctx: RunContext, final: Path, *, validated: dict[str, Any]) -> Path:
    """The final variant as app/firmware deliverables; the bundle writes its own manifest (kind edgepack-bundle)."""
    from edgepack.exporters.bundle import BundleOptions, make_bundle, read_bundle_manifest

    cfg = ctx.recipe.bundle
    inputs = {"model": sha256_file(final), "data": ctx.data_hash}
    folder = ctx.out / f"bundle-{content_hash({'stage': 'bundle', 'cfg': cfg.model_dump(), 'in': inputs, 'validated': validated, 'v': __version__})}"
    if (folder / "manifest.json").is_file():
        with contextlib.suppress(BadInputError):
            read_bundle_manifest(folder)
            get_reporter().info(f"[dim]reusing {folder.name} (same config and inputs)[/dim]")
            return folder
    # evaluation_feeds returns each text's feed, then its paraphrase's: the first `samples` are the texts
    feeds = ctx.adapter.evaluation_feeds(ctx.split.evaluation[: cfg.samples], max_length=ctx.recipe.data.max_length)
    options = BundleOptions(optimization_style=cfg.optimization_style, alignment=cfg.alignment,
                            fixed_shapes=cfg.fixed_shapes, target_platform=cfg.target_platform, force=True)
    with get_reporter().step("bundle: .ort, operator config, C array, golden vectors"):
        make_bundle(final, folder, feeds=feeds[: cfg.samples], options=options, validated=validated)
    return folder


def quantization_summary(folder: Path) -> dict[str, Any]:
    """What the report says about the INT8 stage: plan, SmoothQuant alphas, budget, fallback, sensitive layers."""
    metrics = (read_manifest(folder) or {}).get("metrics", {})
    budget = metrics.get("budget") or {}
    return {
        "stage": folder.name,
        "plan_notes": metrics.get("plan", {}).get("notes", []),
        "smoothquant": metrics.get("smoothquant", {}),
        "budget": {k: budget.get(k) for k in ("max_cosine_drop", "met", "check_samples", "check_fidelity",
                                              "fallback_nodes")} if budget else None,
        "sensitivity_top": budget.get("sensitivity_top", []),
        "range_cache_hit": (metrics.get("range_cache") or {}).get("hit"),
    }


def run_recipe(recipe: Recipe, out: Path) -> dict[str, Any]:
    """Run every stage; write report.json/report.md into `out`; return the report (gates evaluated, not raised)."""
    providers = parse_providers(",".join(recipe.validate_.providers))  # fail on a bad EP name before any work
    if recipe.data.n_evaluation < 1:
        raise BadInputError("data.n_evaluation is 0; validation needs evaluation samples (e.g. 100)")
    out.mkdir(parents=True, exist_ok=True)
    adapter = build_adapter(recipe)
    split = load_split(recipe)
    ctx = RunContext(recipe, out, adapter, split, _split_hash(split))
    variants = {"fp32": stage_export(ctx, adapter)}
    student = stage_compress(ctx)
    if student is not None:
        variants["compressed-fp32"] = stage_export(ctx, student)
    if recipe.quantize.enabled:
        variants["int8"] = stage_quantize(ctx, variants["compressed-fp32" if student else "fp32"])
    v = recipe.validate_
    settings = ValidationSettings(sequence_length=v.sequence_length, max_length=recipe.data.max_length,
                                  threads=v.threads, warmup=v.warmup, runs=v.runs)
    results = validate_variants(variants, adapter=adapter, samples=split.evaluation, providers=providers,
                                out=out, settings=settings, reference="fp32")
    report = {
        "edgepack_version": __version__,
        "recipe": recipe.dump(),
        "model": adapter.describe(),
        "data": {"path": recipe.data.path, "n_calibration": len(split.calibration),
                 "n_evaluation": len(split.evaluation), "hash": ctx.data_hash},
        "reference": "fp32",
        "primary_output": adapter.primary_output,
        **results,
    }
    if "int8" in variants:
        report["quantization"] = quantization_summary(variants["int8"].parent)
    final = list(variants)[-1]
    if recipe.bundle.enabled:
        validated = {ep: {"status": e["status"], "how": e["how"]}
                     for ep, e in results["variants"][final]["providers"].items()}
        report["bundle"] = {"path": stage_bundle(ctx, variants[final], validated=validated).name, "variant": final}
    report["gates"] = evaluate_gates(report, recipe.gates, final=final)
    report["passed"] = all(g["passed"] for g in report["gates"])
    write_reports(report, out)
    return report
