"""The pipeline's `distill` and `prune` stages: HF folder in, HF folder out, metrics for the manifest.

Each writes a folder that `from_pretrained` and the `hf-encoder` adapter load (config.json, model.safetensors,
tokenizer files, the sentence-transformers pooling files) and returns parameters before/after, the loss curve,
the metric per epoch, wall time and peak RSS. The same `distill_model` runs under torchrun:

    torchrun --standalone --nproc_per_node 2 -m edgepack.compress.stages distill request.json

where request.json holds {"teacher_dir", "out_dir", "texts", "eval_pairs", "options", "checkpoint_dir", "result"}.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from edgepack.artifacts import peak_rss_mb, write_json
from edgepack.compress.config import WIDTH_MULTIPLE, DistillSection, PruneSection
from edgepack.compress.distill import (
    LOSSES,
    build_objective,
    cosine_to_teacher,
    encode,
    pad_collate,
    retrieval_metrics,
    similarity_agreement,
    tokenize_texts,
)
from edgepack.compress.prune import (
    IMPORTANCES,
    StructuredSpec,
    count_params,
    prune_transformer,
    prune_unstructured,
    transformer_layers,
)
from edgepack.compress.students import (
    StudentSpec,
    build_student,
    check_same_tokenizer,
    load_pretrained,
    load_tokenizer,
    save_student,
    set_dropout,
)
from edgepack.compress.trainer import DistEnv, Trainer, TrainOptions, init_distributed
from edgepack.errors import BadInputError
from edgepack.reporter import get_reporter


def _check_names(section: str, losses: dict[str, float], importance: str) -> None:
    for name in losses:
        if name not in LOSSES:
            LOSSES.get(name)  # raises with the known names
    if importance not in IMPORTANCES:
        raise BadInputError(f"{section}.importance '{importance}' is unknown; known: {', '.join(IMPORTANCES)}")


def _with_task(options: Any) -> Any:
    """A section with its task set: the pipeline sets the model family's; a direct call defaults to sentences."""
    return options if options.task is not None else options.model_copy(update={"task": "sentence-embedding"})


def _head(folder: Path, task: str) -> tuple[str, bool]:
    """(pooling, normalize) of a sentence encoder, read from its sentence-transformers files by the adapter."""
    if task != "sentence-embedding":
        return "mean", False
    from edgepack.families.sentence_encoder import sentence_transformers_head

    return sentence_transformers_head(folder)


def calibration_batches(tokenizer: Any, texts: Sequence[str], *, count: int, batch_size: int,
                        max_length: int) -> list[dict[str, torch.Tensor]]:
    """The first `count` texts, padded per batch: importance scores read these."""
    examples = tokenize_texts(tokenizer, list(texts)[:count], max_length=max_length)
    pad_id = tokenizer.pad_token_id or 0
    return [pad_collate(examples[i:i + batch_size], pad_id=pad_id) for i in range(0, len(examples), batch_size)]


class _Evaluator:
    """Per-epoch metric of a sentence encoder: paraphrase retrieval on held-out pairs and cosine to the teacher."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, tokenizer: Any,
                 eval_pairs: Sequence[tuple[str, str]], *, pooling: str, normalize: bool, max_length: int) -> None:
        self.student, self.tokenizer = student, tokenizer
        self.texts = [t for t, _ in eval_pairs]
        self.pairs = [p for _, p in eval_pairs]
        self.kwargs = {"pooling": pooling, "normalize": normalize, "max_length": max_length}
        self.teacher_texts = encode(teacher, tokenizer, self.texts, **self.kwargs) if self.texts else None
        self.teacher_pairs = encode(teacher, tokenizer, self.pairs, **self.kwargs) if self.texts else None

    def teacher_metrics(self) -> dict[str, float]:
        if self.teacher_texts is None:
            return {}
        return retrieval_metrics(self.teacher_texts, self.teacher_pairs)

    def __call__(self) -> dict[str, float]:
        if self.teacher_texts is None:
            return {}
        texts = encode(self.student, self.tokenizer, self.texts, **self.kwargs)
        pairs = encode(self.student, self.tokenizer, self.pairs, **self.kwargs)
        metrics = {**retrieval_metrics(texts, pairs),
                   "similarity_agreement": similarity_agreement((texts, pairs), (self.teacher_texts, self.teacher_pairs))}
        cosine = cosine_to_teacher(texts, self.teacher_texts)
        if cosine is not None:
            metrics["cosine_to_teacher"] = cosine
        return metrics


def _train_options(options: DistillSection, checkpoint_dir: Path | None, *, monitor: str | None) -> TrainOptions:
    return TrainOptions(
        epochs=options.epochs, max_steps=options.max_steps, batch_size=options.batch_size,
        grad_accum=options.grad_accum, lr=options.lr, weight_decay=options.weight_decay,
        warmup_ratio=options.warmup_ratio, schedule=options.schedule, optimizer=options.optimizer,
        precision=options.precision, gradient_checkpointing=options.gradient_checkpointing, seed=options.seed,
        monitor=monitor, early_stop_patience=options.early_stop_patience, checkpoint_dir=checkpoint_dir,
        checkpoint_every=options.checkpoint_every, shard_teacher=options.shard_teacher,
        max_train_minutes=options.max_train_minutes, length_bucketing=options.length_bucketing)


def _student(teacher: torch.nn.Module, tokenizer: Any, teacher_dir: Path, texts: Sequence[str],
             options: DistillSection) -> tuple[torch.nn.Module, dict[str, Any]]:
    if options.student:
        folder = Path(options.student)
        check_same_tokenizer(tokenizer, load_tokenizer(folder), student_source=str(folder))
        student = load_pretrained(folder, task=options.task)
        if count_params(student) > count_params(teacher):
            raise BadInputError(f"distill.student: {folder} has {count_params(student):,} parameters, more than the "
                                f"teacher's {count_params(teacher):,}; a student must be smaller")
        return student, {"teacher_params": count_params(teacher), "student_params": count_params(student),
                         "keep_layers": [], "student_source": str(folder)}
    batches = calibration_batches(tokenizer, texts, count=64, batch_size=16, max_length=options.max_length)
    spec = StudentSpec(keep_layers=tuple(options.keep_layers), num_layers=options.num_layers,
                       ffn_ratio=options.ffn_ratio, hidden_ratio=options.hidden_ratio, importance=options.importance,
                       config=dict(options.student_config), multiple=options.width_multiple or WIDTH_MULTIPLE)
    return build_student(teacher, spec, batches=batches)


def distill_model(teacher_dir: Path, out_dir: Path, *, texts: Sequence[str], eval_pairs: Sequence[tuple[str, str]],
                  options: DistillSection, checkpoint_dir: Path | None = None) -> dict[str, Any]:
    """Build a student from the teacher in `teacher_dir`, distill it on `texts`, write it to `out_dir`.

    `eval_pairs` (text, paraphrase) are held out: each epoch reports paraphrase recall@1 / MRR and the cosine to
    the teacher (or, for a narrower student, the agreement of its similarity matrix with the teacher's); early
    stopping watches `options.monitor`. `checkpoint_dir` enables resume after an interruption.
    """
    start = time.perf_counter()
    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    options = _with_task(options)
    _check_names("distill", options.losses, options.importance)
    with _torch_threads(options.threads):
        return _distill(teacher_dir, out_dir, texts=texts, eval_pairs=eval_pairs, options=options,
                        checkpoint_dir=checkpoint_dir, start=start)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _distill(teacher_dir: Path, out_dir: Path, *, texts: Sequence[str], eval_pairs: Sequence[tuple[str, str]],
             options: DistillSection, checkpoint_dir: Path | None, start: float) -> dict[str, Any]:
    env = init_distributed()
    torch.manual_seed(options.seed)
    teacher = load_pretrained(teacher_dir, task=options.task).eval()
    tokenizer = load_tokenizer(teacher_dir)
    student, info = _student(teacher, tokenizer, teacher_dir, texts, options)
    if options.freeze_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
    if options.student_dropout is not None:
        set_dropout(student, options.student_dropout)
    pooling, normalize = _head(teacher_dir, options.task)
    torch.manual_seed(options.seed)  # loss projections start the same on every process and every run
    objective = build_objective(student, teacher, task=options.task, weights=options.losses,
                                keep_layers=info["keep_layers"], temperature=options.temperature, pooling=pooling,
                                normalize=normalize, student_channels=info.get("hidden_channels", ()))
    evaluator = _Evaluator(student, teacher, tokenizer, eval_pairs if options.task == "sentence-embedding" else (),
                           pooling=pooling, normalize=normalize, max_length=options.max_length)
    before = evaluator()
    examples = tokenize_texts(tokenizer, texts, max_length=options.max_length)
    cache_stats = None
    if options.teacher_cache:
        examples, cache_stats = _cache_teacher(objective, teacher, examples, options, pad_id=tokenizer.pad_token_id or 0)
    monitor = options.monitor if eval_pairs and options.task == "sentence-embedding" else None
    train_options = _train_options(options, checkpoint_dir, monitor=monitor)
    if cache_stats is not None and options.max_train_minutes is not None:  # the budget covers the teacher pass too
        left = max(options.max_train_minutes - cache_stats["build_s"] / 60, 0.05)
        train_options = dataclasses.replace(train_options, max_train_minutes=left)
    trainer = Trainer(objective, examples, collate=functools.partial(pad_collate, pad_id=tokenizer.pad_token_id or 0),
                      options=train_options, evaluate=evaluator,
                      teacher_layers=list(transformer_layers(teacher)))
    with get_reporter().step(f"distill {info['teacher_params']:,} -> {info['student_params']:,} parameters"):
        result = trainer.fit()
    student.eval()
    if env.main:
        save_student(student, out_dir, tokenizer=tokenizer, source_dir=teacher_dir)
    info = {k: v for k, v in info.items() if k != "hidden_channels"}  # 256 indices: kept out of the manifest
    return {**info, "train_texts": len(texts), "held_out_pairs": len(eval_pairs), "losses": objective.loss_names,
            "teacher_metrics": evaluator.teacher_metrics(), "teacher_cache": cache_stats,
            "student_before_training": before, "train": result.to_json(), "params_before": info["teacher_params"],
            "params_after": info["student_params"], "wall_time_s": round(time.perf_counter() - start, 2),
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def _cache_teacher(objective: Any, teacher: torch.nn.Module, examples: list[dict[str, list[int]]],
                   options: DistillSection, *, pad_id: int) -> tuple[list[dict[str, list[int]]], dict[str, Any]]:
    """One teacher pass over every training text; the objective then reads the teacher's outputs from memory."""
    from edgepack.compress.distill import number_examples
    from edgepack.compress.teacher_cache import TeacherCache
    from edgepack.compress.trainer import PRECISIONS

    layers = sorted({t for _, t in objective.context.layer_map}) if "hidden_states" in objective.needs else []
    autocast = PRECISIONS[options.teacher_precision or options.precision]
    texts_hash = hashlib.sha256(json.dumps(examples, sort_keys=True).encode()).hexdigest()
    key = (str(teacher.config._name_or_path), texts_hash, tuple(sorted(objective.needs)), tuple(layers),
           options.teacher_cache_dtype, str(autocast))
    cache = _LAST_CACHE.get(key)
    if cache is None:
        with get_reporter().step(f"teacher outputs for {len(examples):,} texts (cache)"):
            cache = TeacherCache.build(teacher, objective.head, examples, needs=objective.needs, hidden_layers=layers,
                                       pad_id=pad_id, dtype=options.teacher_cache_dtype,
                                       max_mb=options.teacher_cache_max_mb, autocast=autocast)
        _LAST_CACHE.clear()
        _LAST_CACHE[key] = cache
    objective.use_cache(cache)
    return number_examples(examples), cache.stats


#: the last cache built in this process, by (teacher, examples, needs, layers, storage, autocast): experiments that
#: train several students from one teacher on the same texts run the teacher once
_LAST_CACHE: dict[tuple[Any, ...], Any] = {}


# ------------------------------------------------------------------------------------------------------- prune


def prune_model(model_dir: Path, out_dir: Path, *, texts: Sequence[str], options: PruneSection) -> dict[str, Any]:
    """Structured pruning (layers, heads, FFN, hidden), optional unstructured sparsity and recovery distillation."""
    start = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    options = _with_task(options)
    _check_names("prune", options.recovery_losses, options.importance)
    spec = StructuredSpec(heads_ratio=options.heads_ratio, ffn_ratio=options.ffn_ratio,
                          hidden_ratio=options.hidden_ratio, layers=tuple(options.layers), importance=options.importance,
                          multiple=options.width_multiple or WIDTH_MULTIPLE)
    torch.manual_seed(options.seed)
    model = load_pretrained(model_dir, task=options.task).eval()
    tokenizer = load_tokenizer(model_dir)
    original = copy.deepcopy(model) if options.recovery_steps else None
    batches = calibration_batches(tokenizer, texts, count=options.calibration_samples,
                                  batch_size=options.calibration_batch_size, max_length=options.max_length)
    report = prune_transformer(model, spec, batches=batches)
    metrics: dict[str, Any] = {"structured": report.to_json()}
    masks: dict[str, torch.Tensor] = {}
    if options.unstructured_sparsity > 0:
        metrics["unstructured"] = prune_unstructured(model, sparsity=options.unstructured_sparsity,
                                                     scope=options.unstructured_scope)
        masks = {name: (p != 0) for name, p in model.named_parameters() if name.endswith(".weight") and p.dim() == 2}
    if original is not None:
        metrics["recovery"] = _recover(model, original, model_dir, texts, options, masks, report.layers_kept)
    save_student(model.eval(), out_dir, tokenizer=tokenizer, source_dir=model_dir)
    if options.unstructured_sparsity > 0 and options.measure_dense_effect and options.task == "sentence-embedding":
        metrics["dense_onnx_effect"] = measure_dense_effect(model_dir, out_dir, texts=texts, spec=spec)
    metrics.update(params_before=report.params_before, params_after=count_params(model),
                   wall_time_s=round(time.perf_counter() - start, 2), peak_rss_mb=round(peak_rss_mb(), 1))
    return metrics


def _recover(model: torch.nn.Module, original: torch.nn.Module, model_dir: Path, texts: Sequence[str],
             options: PruneSection, masks: dict[str, torch.Tensor], layers_kept: list[int]) -> dict[str, Any]:
    """Short distillation from the unpruned model; gradients of pruned (zeroed) weights are masked so they stay 0."""
    params = dict(model.named_parameters())
    handles = [params[name].register_hook(lambda grad, mask=mask: grad * mask) for name, mask in masks.items()]
    model.get_input_embeddings().weight.requires_grad_(False)
    pooling, normalize = _head(model_dir, options.task)
    objective = build_objective(model, original, task=options.task, weights=options.recovery_losses,
                                keep_layers=layers_kept, pooling=pooling, normalize=normalize)
    tokenizer = load_tokenizer(model_dir)
    examples = tokenize_texts(tokenizer, texts, max_length=options.max_length)
    batch = min(options.recovery_batch_size, len(examples))
    train = TrainOptions(epochs=10**6, max_steps=options.recovery_steps, batch_size=batch, lr=options.recovery_lr,
                         seed=options.seed)
    try:
        result = Trainer(objective, examples, collate=functools.partial(pad_collate, pad_id=tokenizer.pad_token_id or 0),
                         options=train).fit()
    finally:
        for handle in handles:
            handle.remove()
    curve = [h["loss"] for h in result.history]
    return {"steps": result.steps, "loss_first": curve[0], "loss_last": curve[-1], "loss_curve": curve,
            "wall_s": round(result.wall_s, 2)}


def measure_dense_effect(before_dir: Path, after_dir: Path, *, texts: Sequence[str], spec: StructuredSpec,
                         runs: int = 30) -> dict[str, Any]:
    """Export the structurally pruned model with and without the unstructured zeros and measure both on the CPU EP:
    ONNX stores dense tensors, so the zeros cost the same bytes and the same MatMul time."""
    import gzip

    from edgepack.calibration_data import TextSample
    from edgepack.exporters.onnx import export_onnx
    from edgepack.families import open_model
    from edgepack.runtime.probe import ProbeOptions, measure

    samples = [TextSample(t) for t in texts[:8]]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edgepack-dense-") as tmp:
        dense_dir = Path(tmp) / "structured-only"
        model = load_pretrained(before_dir, task="sentence-embedding").eval()
        prune_transformer(model, spec, batches=calibration_batches(load_tokenizer(before_dir), texts, count=64,
                                                                   batch_size=16, max_length=128))
        save_student(model, dense_dir, tokenizer=load_tokenizer(before_dir), source_dir=before_dir)
        for name, folder in (("without_zeros", dense_dir), ("with_zeros", after_dir)):
            adapter = open_model(str(folder), family="sentence-encoder")
            path = Path(tmp) / f"{name}.onnx"
            export_onnx(adapter, path, check_feeds=list(adapter.feeds(samples[:2])))
            probe = measure(path, latency_feed=adapter.latency_feed(samples, sequence_length=128),
                            evaluation_feeds=[], workdir=Path(tmp) / "probe", options=ProbeOptions(runs=runs))
            results[name] = {"onnx_bytes": path.stat().st_size,
                             "gzip_bytes": len(gzip.compress(path.read_bytes(), compresslevel=6)),
                             "latency_ms_p50": probe.latency_ms.get("p50"), "probe_status": probe.status}
    results["note"] = ("unstructured zeros are stored and multiplied densely by ONNX Runtime's CPU kernels: file "
                       "size and latency do not drop; only a compressed (gzip) copy or a sparse format shrinks")
    return results


# ---------------------------------------------------------------------------------------------- torchrun entry


def _main(argv: Sequence[str]) -> int:
    if len(argv) != 2 or argv[0] != "distill":
        print("usage: python -m edgepack.compress.stages distill REQUEST.json", file=sys.stderr)
        return 2
    request = json.loads(Path(argv[1]).read_text())
    options = DistillSection(**request["options"])
    checkpoint = request.get("checkpoint_dir")
    metrics = distill_model(Path(request["teacher_dir"]), Path(request["out_dir"]), texts=request["texts"],
                            eval_pairs=[tuple(p) for p in request.get("eval_pairs", [])], options=options,
                            checkpoint_dir=Path(checkpoint) if checkpoint else None)
    env: DistEnv = init_distributed()
    if env.main and request.get("result"):
        write_json(Path(request["result"]), metrics)
    if env.world > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
