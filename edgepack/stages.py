"""The stages, as library functions from artifact to artifact. `edgepack run` and the CLI commands call these.

Each function states its typed config (a recipe section), computes its inputs' hashes, and hands both with the work
to `runner.run_stage`, which names, reuses, writes and manifests the folder. So `edgepack quantize` on the CLI
writes the same manifest as the quantize stage of a recipe, and both read the same calibration cache.

An exported or quantized folder carries what the model needs beside model.onnx (tokenizer, config, pooling head:
`ModelFamily.artifact_files`) and the family's record in its manifest, so `open_model(folder/model.onnx)` gets the
family, its options and its preprocessing back: no `--tokenizer` needed downstream.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgepack.artifacts import content_hash, sha256_file
from edgepack.calibration_data import Feed, Sample, TextSample
from edgepack.errors import BadInputError
from edgepack.families import ModelFamily
from edgepack.onnx_files import model_bytes, model_digest
from edgepack.recipe import BundleSection, ExportSection, QuantizeSection
from edgepack.reporter import get_reporter
from edgepack.runner import StageResult, run_stage

# ------------------------------------------------------------------------------------------------------- hashes


def samples_hash(samples: Sequence[Sample]) -> str:
    """Content hash of samples (text, pair, label; or every array's bytes)."""
    def key(sample: Sample) -> Any:
        if isinstance(sample, TextSample):
            return [sample.text, sample.pair, sample.label]
        if hasattr(sample, "hash_key"):  # an image: its file's bytes, view and label
            return sample.hash_key()
        return {k: content_hash(v.tobytes().hex()) for k, v in sorted(sample.items())}

    return content_hash([key(s) for s in samples])


def model_fingerprint(family: ModelFamily) -> str:
    """sha256 over a model folder's files, an ONNX file (and its external data), or the import path."""
    source = family.source
    path = source.path
    if source.kind == "onnx" and path is not None:
        return model_digest(path)  # the .onnx and the external data files it names
    if path is not None and path.is_dir():
        return content_hash({str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()})
    return content_hash(source.text)


def preprocessing_fingerprint(family: ModelFamily) -> str:
    """Hash of what turns samples into feeds: the carried files (tokenizer, configs) by content, not by path, so an
    HF folder and the artifact folders made from it agree."""
    return content_hash({dest: sha256_file(src) for src, dest in family.artifact_files()})


def carry_files(family: ModelFamily, folder: Path) -> None:
    """Copy the family's preprocessing files beside the model in `folder`."""
    for src, dest in family.artifact_files():
        target = folder / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)


def _where(root: Path | None, folder: Path | None) -> dict[str, Path | None]:
    return {"root": root, "folder": folder}


# ------------------------------------------------------------------------------------------------------- export


def export(family: ModelFamily, *, check_samples: Sequence[Sample], options: ExportSection, max_length: int,
           root: Path | None = None, folder: Path | None = None) -> StageResult:
    """PyTorch -> model.onnx, checked against PyTorch on `check_samples`, with the family's files beside it."""
    from edgepack.exporters.onnx import ExportOptions

    if not check_samples:
        raise BadInputError("export needs at least one sample for the ONNX Runtime vs PyTorch check")
    # the model by content (fingerprint), not by where it lies: the same model and recipe give the same folder
    # name in any run folder, on any machine (a student's path is inside the run folder)
    described = {k: v for k, v in family.describe().items() if k != "source"}
    config = {"model": described, **options.model_dump(), "max_length": max_length}
    inputs = {"model": model_fingerprint(family), "data": samples_hash(check_samples)}
    feeds = list(family.feeds(check_samples[: options.check_samples], batch_size=1, max_length=max_length))

    def work(tmp: Path) -> dict[str, Any]:
        with get_reporter().step(f"export {family.name} to ONNX and check against PyTorch"):
            metrics = family.export(tmp / "model.onnx", check_feeds=feeds,
                                    options=ExportOptions(opset=options.opset, atol=options.atol))
        carry_files(family, tmp)
        return metrics

    return run_stage("export", config, inputs, work, model=family.artifact_record(), **_where(root, folder))


# ----------------------------------------------------------------------------------------------------- quantize


def calibration_key(family: ModelFamily, calibration: Sequence[Sample], *, max_length: int, padding: str) -> str:
    """What calibration results depend on besides the model: the samples and how they become feeds. The pipeline
    and `edgepack quantize` compute it the same way, so they share `cache/ranges-<hash>.json`."""
    return content_hash({"data": samples_hash(calibration), "max_length": max_length, "padding": padding,
                         "preprocessing": preprocessing_fingerprint(family)})


def resolve_graph(graph: str, *, fp32: Path, recipe: str, providers: Sequence[str]) -> str:
    """`quantize.graph: auto` -> `fused` for the transformer-encoder recipe (named, or detected from the graph)
    when every EP in `providers` is ONNX Runtime's CPU EP (cpu, mobile-cpu: the fused ops are its contrib kernels),
    else `qdq` (NPUs and GPU EPs read QDQ; other recipes have no fused form)."""
    if graph != "auto":
        return graph
    import onnx

    from edgepack.quantization.recipes import detect_family

    on_cpu = all(map(_on_cpu_ep, providers))
    if recipe == "auto":
        recipe = detect_family(onnx.load(str(fp32), load_external_data=False))
    return "fused" if on_cpu and recipe == "transformer-encoder" else "qdq"


def resolve_int4_kernel(kernel: str, providers: Sequence[str]) -> str:
    """`quantize.cnn.int4_kernel: auto` -> `matmul-nbits` (ONNX Runtime's contrib 4-bit GEMM) when every EP in
    `providers` is the CPU EP, else `dequantize` (standard ONNX: the blocked DequantizeLinear NPUs read)."""
    if kernel != "auto":
        return kernel
    return "matmul-nbits" if all(map(_on_cpu_ep, providers)) else "dequantize"


def _on_cpu_ep(provider: str) -> bool:
    """Whether the EP named `provider` (cpu, mobile-cpu, ...) is ONNX Runtime's CPU EP, whose contrib kernels
    (fused encoder ops, MatMulNBits) it can run."""
    from edgepack.runtime.providers import get_provider

    return get_provider(provider).ort_name == "CPUExecutionProvider"


def int8_variants(graph: str, *, fp32: Path, recipe: str, providers: Sequence[str]) -> dict[str, str]:
    """INT8 variant name -> graph for a run. `auto` with CPU and non-CPU EPs in `providers` (e.g. cpu + qnn-htp)
    makes both: `int8` (fused, what the CPU EPs run fastest) and `int8-qdq` (what the NPUs run, validated and bundled
    last); otherwise one `int8` in the graph `resolve_graph` picks."""
    cpu = [p for p in providers if _on_cpu_ep(p)]
    chosen = resolve_graph(graph, fp32=fp32, recipe=recipe, providers=cpu or providers)
    if graph == "auto" and chosen == "fused" and len(cpu) < len(providers):
        return {"int8": "fused", "int8-qdq": "qdq"}
    return {"int8": resolve_graph(graph, fp32=fp32, recipe=recipe, providers=providers)}


def quantize(fp32: Path, family: ModelFamily, *, calibration: Sequence[Sample], options: QuantizeSection,
             max_length: int, padding: str, root: Path | None = None, folder: Path | None = None,
             cache_dir: Path | None = None, providers: Sequence[str] = ("cpu",)) -> StageResult:
    """INT8 of `fp32` with the family's quantization recipe (`options.mode` static or dynamic, `options.graph`
    resolved for `providers` by `resolve_graph`), an accuracy budget and a range cache."""
    import json

    from edgepack.quantization.calibrators import calibrator_options
    from edgepack.quantization.cnn import CnnOptions
    from edgepack.quantization.quantize import QuantizeOptions, RangeCache, quantize_static
    from edgepack.quantization.sensitivity import QuantBudget

    recipe = options.recipe if options.recipe != "auto" else family.quant_recipe
    mode = quantize_mode(family, options)
    graph = resolve_graph(options.graph, fp32=fp32, recipe=recipe, providers=providers)
    int4_kernel = resolve_int4_kernel(options.cnn.int4_kernel, providers)
    q_options = QuantizeOptions(calibrator=options.calibrator, smoothquant=options.smoothquant, family=recipe,
                                per_channel=options.per_channel, activation_type=options.activation_type,
                                weight_type=options.weight_type, exclude_nodes=tuple(options.exclude_nodes),
                                graph=graph, cnn=CnnOptions(**{**options.cnn.model_dump(),
                                                               "int4_kernel": int4_kernel}),
                                wide_activations=tuple(options.wide_activations))
    config = {**options.model_dump(exclude={"weight_only"}), "mode": mode, "recipe": recipe, "graph": graph,
              "int4_kernel": int4_kernel,
              "max_length": max_length, "padding": padding,
              # the calibrator's option values (its defaults): a changed default must not reuse an old build
              "calibrator_options": calibrator_options(options.calibrator)}
    inputs = {"model": model_digest(fp32), "data": samples_hash(calibration)}
    key = calibration_key(family, calibration, max_length=max_length, padding=padding)

    def calibration_feeds() -> Iterator[Feed]:
        return family.feeds(calibration, batch_size=1, max_length=max_length, padding=padding)

    def work(tmp: Path) -> dict[str, Any]:
        get_reporter().info(f"- {mode} INT8 ({recipe} recipe, {graph} graph): calibrating on "
                            f"{len(calibration)} samples")
        budget = None if options.max_cosine_drop is None else QuantBudget(options.max_cosine_drop,
                                                                          options.max_fallback_layers)
        wants_check = (budget is not None or options.sensitivity_top > 0
                       or options.cnn.int4_max_cosine_rise is not None)
        check = (list(family.feeds(calibration[: options.budget_samples], max_length=max_length)),
                 family.primary_output) if wants_check else None
        cache = RangeCache(cache_dir, key) if cache_dir is not None else None
        estimate = _guard_calibration(fp32, family, calibration, max_length=max_length)
        if mode == "dynamic":
            from edgepack.quantization.dynamic import quantize_dynamic_int8

            metrics = quantize_dynamic_int8(fp32, tmp / "model.onnx", calibration_feeds=calibration_feeds,
                                            n_calibration=len(calibration), options=q_options, budget=budget,
                                            check=check, sensitivity_top=options.sensitivity_top)
        else:
            metrics = quantize_static(fp32, tmp / "model.onnx", calibration_feeds=calibration_feeds,
                                      n_calibration=len(calibration), options=q_options, budget=budget, check=check,
                                      cache=cache, sensitivity_top=options.sensitivity_top)
        (tmp / "tensor_ranges.json").write_text(json.dumps(metrics.pop("tensor_ranges"), indent=1))
        carry_files(family, tmp)
        return {**metrics, "memory_estimate": estimate}

    return run_stage("quantize", config, inputs, work, model=family.artifact_record(), **_where(root, folder))


def _guard_calibration(fp32: Path, family: ModelFamily, calibration: Sequence[Sample], *,
                       max_length: int) -> dict[str, Any]:
    """Refuse before calibrating when the estimated peak exceeds the memory available (`memory_guard`)."""
    from edgepack import memory_guard

    worst = next(family.feeds(calibration[:1], batch_size=1, max_length=max_length, padding="max_length"))
    estimate = memory_guard.estimate_calibration(fp32, worst)
    memory_guard.check(estimate)
    return estimate.to_json()


def _extra_calibration(section: Any, family: ModelFamily) -> list[Sample]:
    """`weight_only.calibration_data`'s texts, joined into texts of about `calibration_tokens` tokens."""
    from edgepack.calibration_data import iter_samples, resolve_data_path

    if section.calibration_data is None:
        return []
    # streamed: only the first records are read (a .jsonl.gz corpus too, e.g. the bundled distillation corpus)
    samples = iter_samples(resolve_data_path(section.calibration_data), limit=section.calibration_data_samples)
    texts = [s.text for s in samples if isinstance(s, TextSample)]
    joined, current = [], []
    words = max(8, section.calibration_tokens * 3 // 4)  # ~0.75 words per token of English
    for text in texts:
        current.append(text)
        if sum(len(t.split()) for t in current) >= words:
            joined.append(TextSample(" ".join(current)))
            current = []
    return joined


def quantize_mode(family: ModelFamily, options: QuantizeSection) -> str:
    """static, dynamic or weight-only: the recipe's `quantize.mode`, or for auto the family's (weight-only for
    causal-lm, static otherwise). The one place `auto` is resolved; INT8 of activations is refused for a family
    that quantizes weights only (a decoder's KV-cache graph has no calibration path for activation ranges)."""
    decoder = family.quant_recipe == "weight-only"
    if options.mode == "auto":
        return "weight-only" if decoder else "static"
    if decoder and options.mode != "weight-only":
        raise BadInputError(f"quantize.mode: {options.mode} does not apply to family {family.name} (INT8 activations "
                            "through a KV cache); write mode: weight-only or auto")
    if options.mode == "weight-only" and family.weight_only_fidelity is None:
        raise BadInputError(f"quantize.mode: weight-only does not apply to family {family.name} (its graphs have no "
                            "MatMul weights for MatMulNBits); write mode: static or dynamic")
    return options.mode


def gptq_statistics(fp32: Path, feeds: Any, *, key: str, cache_dir: Path | None) -> dict[str, Any]:
    """GPTQ's input statistics of `fp32` on the calibration feeds, kept in `cache_dir/hessians-<key>.npz` so the
    variants of a run (and a rerun) compute them once."""
    import numpy as np
    import onnx

    from edgepack.quantization.weight_only import collect_hessians, find_targets

    path = None if cache_dir is None else cache_dir / f"hessians-{key}.npz"
    if path is not None and path.is_file():
        with np.load(path) as data:
            return {name.replace("|", "/"): data[name] for name in data.files}
    hessians = collect_hessians(fp32, find_targets(onnx.load(str(fp32))), feeds)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.npz")
        np.savez(partial, **{name.replace("/", "|"): value for name, value in hessians.items()})
        partial.replace(path)
    return hessians


def mixed_fidelity(fp32: Path, family: ModelFamily, mixed: Any) -> Any:
    """What a weight-only mixed plan keeps within budget, as the family declares it (`weight_only_fidelity`)."""
    from edgepack.quantization.weight_only import cosine_fidelity, perplexity_fidelity

    if family.weight_only_fidelity == "perplexity":
        return perplexity_fidelity(fp32, mixed.max_perplexity_ratio)
    return cosine_fidelity(fp32, family.primary_output, mixed.max_cosine_drop)


def quantize_weight_only(fp32: Path, family: ModelFamily, *, calibration: Sequence[Sample], section: Any,
                         variant: Any, root: Path | None = None, folder: Path | None = None,
                         cache_dir: Path | None = None) -> StageResult:
    """Weight-only INT4 / INT8 (MatMulNBits) of `fp32`, one recipe variant; a mixed variant searches its plan."""
    from edgepack.quantization.weight_only import calibration_feeds, mixed_precision, quantize_weight_only

    texts = list(calibration[: section.calibration_samples]) + _extra_calibration(section, family)
    config = {"mode": "weight-only", "variant": variant.model_dump(), "calibration_samples": len(texts),
              "calibration_tokens": section.calibration_tokens, "calibration_data": section.calibration_data}
    inputs = {"model": sha256_file(fp32), "data": samples_hash(texts)}

    def work(tmp: Path) -> dict[str, Any]:
        feeds = calibration_feeds(family.feeds(texts, max_length=section.calibration_tokens))
        hessians = None
        if variant.method == "gptq":
            key = content_hash([inputs, section.calibration_tokens])
            with get_reporter().step(f"{variant.name}: input statistics for gptq on {len(texts)} calibration texts"):
                hessians = gptq_statistics(fp32, feeds, key=key, cache_dir=cache_dir)
        plan, mixed = None, None
        if variant.mixed is not None:
            plan, mixed = mixed_precision(fp32, variant=variant, calibration=feeds, hessians=hessians,
                                          fidelity=mixed_fidelity(fp32, family, variant.mixed))
        with get_reporter().step(f"{variant.name}: weight-only {variant.bits}-bit ({variant.method}, block "
                                 f"{variant.block_size}, {'symmetric' if variant.symmetric else 'asymmetric'})"):
            metrics = quantize_weight_only(fp32, tmp / "model.onnx", variant=variant, calibration=feeds, plan=plan,
                                           hessians=hessians)
        if mixed is not None:
            metrics["mixed"] = mixed
        metrics["size_ratio"] = model_bytes(tmp / "model.onnx") / model_bytes(fp32)
        carry_files(family, tmp)
        return metrics

    return run_stage("quantize", config, inputs, work, model=family.artifact_record(), **_where(root, folder))


# ----------------------------------------------------------------------------------------------------- validate


def validate(variants: Mapping[str, Path], family: ModelFamily, *, samples: Sequence[Sample],
             providers: Sequence[Any], settings: Any, compared_to: Mapping[str, str | None],
             root: Path | None = None, folder: Path | None = None, cache_dir: Path | None = None,
             generated: Any = None, evaluation_sets: Mapping[str, Sequence[Sample]] | None = None) -> StageResult:
    """Every variant x EP in fresh processes (`runtime.harness`) on `settings.device`; the manifest's metrics hold
    the report entries and the device block. `generated` (`families.generated.GeneratedInputs`): measure without
    samples, on inputs made from the model's signature. `evaluation_sets` (name -> samples) adds each variant's task
    metrics on those sets (CPU EP of this machine)."""
    from edgepack.runtime.doctor import device_block
    from edgepack.runtime.harness import evaluate_sets, validate_variants

    if not samples and generated is None:
        raise BadInputError("validation needs evaluation samples (data.n_evaluation / --samples is 0)")
    # The device first: an unreachable host or one without onnxruntime is one line before any folder is made.
    device = device_block(settings.device, providers=providers, threads=settings.threads)
    sets = dict(evaluation_sets or {})
    hashes = {name: sha256_file(path) for name, path in variants.items()}
    config = {**asdict(settings), "providers": [p.key for p in providers], "compared_to": dict(compared_to)}
    inputs = {**{name: model_digest(path) for name, path in variants.items()},
              "data": samples_hash(samples) if generated is None else samples_hash([generated.feed]),
              **{f"set:{k}": samples_hash(v) for k, v in sets.items()}}

    def work(tmp: Path) -> dict[str, Any]:
        from edgepack import memory_guard

        worst = generated.feed if generated is not None else \
            next(family.feeds(samples[:1], batch_size=1, padding="max_length",
                              max_length=max(settings.sequence_length, settings.max_length)))
        estimate = memory_guard.estimate_inference(list(variants.values()), worst)
        if (settings.device or "local") == "local":  # probes on another device use its memory, not ours
            memory_guard.check(estimate)
        results = validate_variants(variants, family=family, samples=samples, providers=providers, workdir=tmp,
                                    settings=settings, compared_to=compared_to,
                                    cache_dir=cache_dir or tmp.parent / "ep-cache",
                                    generated=None if generated is None else generated.feed)
        on_sets = evaluate_sets(variants, family=family, sets=sets, workdir=tmp, settings=settings) if sets else {}
        for name, path in variants.items():
            results[name].update(size_bytes=model_bytes(path), sha256=hashes[name])
            if on_sets:
                results[name]["evaluation_sets"] = on_sets[name]
        return {"variants": results, "device": device, "memory_estimate": estimate.to_json()}

    return run_stage("validate", config, inputs, work, **_where(root, folder))


# ------------------------------------------------------------------------------------------------------- bundle


def bundle_feeds(family: ModelFamily, model: Path, samples: Sequence[Sample], *, count: int, max_length: int,
                 fixed_shapes: Mapping[str, int] | None) -> list[Feed]:
    """Golden-vector inputs: `count` evaluation samples; with fixed shapes, text is padded to the fixed
    (batch, sequence) of the model's first input."""
    from edgepack.exporters.bundle import fixed_text_shape, widen_integers

    if count < 1:
        raise BadInputError(f"bundle samples {count}: write at least one golden vector")
    chosen = list(samples[:count])
    if not chosen:
        raise BadInputError("the bundle needs at least one sample for its golden vectors")
    if fixed_shapes and isinstance(chosen[0], TextSample):
        batch, length = fixed_text_shape(model, fixed_shapes)
        feeds = [f for f in family.feeds(chosen, batch_size=batch, max_length=length, padding="max_length")
                 if len(next(iter(f.values()))) == batch]  # a short last batch has no fixed shape
        if not feeds:
            raise BadInputError(f"bundle samples {count}: fewer samples than the fixed batch size {batch}")
    else:
        # evaluation_feeds holds each text's feed, then (for pairs) its paraphrase's: the first `count` are texts
        feeds = family.evaluation_feeds(chosen, max_length=max_length)[:count]
    return [widen_integers(feed, model) for feed in feeds]


def bundle(model: Path, family: ModelFamily, *, samples: Sequence[Sample], options: BundleSection, max_length: int,
           validated: Mapping[str, Any] | None = None, symbol_prefix: str = "edgepack_model",
           root: Path | None = None, folder: Path | None = None, force: bool = False) -> StageResult:
    """The model as app / firmware deliverables (`exporters.bundle.make_bundle`), verified from its own files."""
    from edgepack.exporters.bundle import BundleOptions, make_bundle

    bundle_options = BundleOptions(optimization_style=options.optimization_style, alignment=options.alignment,
                                   fixed_shapes=options.fixed_shapes, target_platform=options.target_platform,
                                   symbol_prefix=symbol_prefix)
    feeds = bundle_feeds(family, model, samples, count=options.samples, max_length=max_length,
                         fixed_shapes=options.fixed_shapes)
    with get_reporter().step("bundle: .ort, operator config, C array, golden vectors"):
        return make_bundle(model, folder, feeds=feeds, options=bundle_options, validated=validated, force=force,
                           root=root)
