"""Student construction: a copy of the teacher with fewer layers (weights copied) and narrower FFN / hidden width,
or a fresh smaller config. Also the safe loaders: weights come from safetensors only.

transformers builds, loads and saves the models; the layer selection and the narrowing are ours (`prune.py`),
because transformers has no "keep these layers" API.

>>> teacher = load_pretrained(Path("minilm"), task="sentence-embedding")            # doctest: +SKIP
>>> student, info = build_student(teacher, StudentSpec(keep_layers=(0, 2, 4), ffn_ratio=0.5))  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgepack.compress.config import WIDTH_MULTIPLE
from edgepack.compress.prune import (
    Batch,
    StructuredSpec,
    count_params,
    prune_transformer,
    select_layers,
    transformer_layers,
)
from edgepack.errors import BadInputError
from edgepack.families.hf_text import check_model_folder, load_tokenizer

#: task -> transformers auto class that loads it
TASK_CLASSES = {"sentence-embedding": "AutoModel", "sequence-classification": "AutoModelForSequenceClassification",
                "causal-lm": "AutoModelForCausalLM"}
#: files sentence-transformers reads besides the HF model (pooling head, normalisation), copied to the student
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                               "1_Pooling/config.json", "2_Normalize")
#: config fields a smaller student config may lower (never raise)
SHRINKABLE = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


def load_pretrained(folder: Path, *, task: str) -> Any:
    """A local HF model for `task`, from safetensors (never a pickle), eager attention (exports as plain MatMul)."""
    import transformers

    if task not in TASK_CLASSES:
        raise BadInputError(f"distill.task '{task}' is not one of {', '.join(TASK_CLASSES)}")
    folder = Path(folder)
    check_model_folder(folder)
    auto = getattr(transformers, TASK_CLASSES[task])
    return auto.from_pretrained(folder, local_files_only=True, use_safetensors=True, attn_implementation="eager")


def check_same_tokenizer(teacher: Any, student: Any, *, student_source: str) -> None:
    """Distillation compares outputs token by token: both models must read the same vocabulary."""
    teacher_vocab, student_vocab = teacher.get_vocab(), student.get_vocab()
    if teacher_vocab != student_vocab:
        only = len(set(student_vocab) ^ set(teacher_vocab))
        raise BadInputError(f"distill.student: {student_source} has a tokenizer whose vocabulary differs from the "
                            f"teacher's ({len(student_vocab)} vs {len(teacher_vocab)} tokens, {only} not shared); "
                            "use a student built from the teacher (keep_layers) or one trained on its tokenizer")


@dataclass(frozen=True)
class StudentSpec:
    """How to shrink the teacher.

    keep_layers: teacher layers kept, in order (weights copied); num_layers: as many evenly spaced layers
    (layer 0 first) when keep_layers is empty; ffn_ratio / hidden_ratio: fraction of FFN neurons / hidden channels
    removed by `importance` (prune.py); config: a smaller config from scratch (random init) instead of a copy.
    """

    keep_layers: tuple[int, ...] = ()
    num_layers: int | None = None
    ffn_ratio: float = 0.0
    hidden_ratio: float = 0.0
    importance: str = "magnitude"
    config: Mapping[str, int] = field(default_factory=dict)
    #: FFN / hidden widths kept in multiples of this (StructuredSpec.multiple)
    multiple: int = WIDTH_MULTIPLE


def evenly_spaced(total: int, count: int) -> list[int]:
    """`count` of `total` layers, starting at layer 0: 6 -> 3 gives [0, 2, 4]."""
    return [i * total // count for i in range(count)]


def build_student(teacher: nn.Module, spec: StudentSpec, *, batches: Sequence[Batch] = ()) -> tuple[nn.Module,
                                                                                                      dict[str, Any]]:
    """A student smaller than `teacher` (never larger: that is a BadInputError)."""
    teacher_layers = len(transformer_layers(teacher))
    if spec.config:
        student = _from_config(teacher, spec.config)
        keep: list[int] = []
    else:
        keep = _layers_to_keep(spec, teacher_layers)
        student = copy.deepcopy(teacher)
        select_layers(student, keep)
    narrow = StructuredSpec(ffn_ratio=spec.ffn_ratio, hidden_ratio=spec.hidden_ratio, importance=spec.importance,
                            multiple=spec.multiple, field_prefix="distill.")
    report = prune_transformer(student, narrow, batches=batches)
    teacher_params, student_params = count_params(teacher), count_params(student)
    if student_params > teacher_params:
        raise BadInputError(f"distill: the student has {student_params:,} parameters, more than the teacher's "
                            f"{teacher_params:,}; a student must be smaller (fewer layers, lower ffn_ratio/config)")
    info = {"teacher_params": teacher_params, "student_params": student_params, "keep_layers": keep,
            "teacher_layers": teacher_layers, "student_layers": len(transformer_layers(student)),
            "narrowing": report.snapped, "hidden_channels": report.hidden_channels}
    return student, info


def _layers_to_keep(spec: StudentSpec, total: int) -> list[int]:
    if spec.keep_layers:
        keep = list(spec.keep_layers)
        if len(keep) > total:
            raise BadInputError(f"distill.keep_layers has {len(keep)} layers but the teacher has {total}; "
                                "a student must be smaller than its teacher")
        if len(set(keep)) != len(keep) or any(not 0 <= i < total for i in keep):
            raise BadInputError(f"distill.keep_layers={keep}: use distinct teacher layer indices in 0..{total - 1}")
        return keep
    count = spec.num_layers if spec.num_layers is not None else max(1, total // 2)
    if not 1 <= count <= total:
        raise BadInputError(f"distill.num_layers={count} but the teacher has {total} layers; a student must be "
                            f"smaller: use 1..{total}")
    return evenly_spaced(total, count)


def _from_config(teacher: nn.Module, overrides: Mapping[str, int]) -> nn.Module:
    config = copy.deepcopy(teacher.config)
    for key, value in overrides.items():
        if key not in SHRINKABLE:
            raise BadInputError(f"distill.student_config.{key}: only {', '.join(SHRINKABLE)} can be set")
        current = getattr(config, key, None)
        if current is None or value > current:
            raise BadInputError(f"distill.student_config.{key}={value} is larger than the teacher's {current}; "
                                "a student must be smaller")
        setattr(config, key, value)
    config.pruned_heads = {}
    torch.manual_seed(0)
    return type(teacher)(config)


def set_dropout(model: nn.Module, p: float) -> None:
    """Every nn.Dropout of `model` to probability `p`, and the config's dropout fields to match (saved with it)."""
    if not 0.0 <= p < 1.0:
        raise BadInputError(f"distill.student_dropout is {p}; use a probability in [0, 1)")
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "dropout"):
        if isinstance(getattr(model.config, name, None), float):
            setattr(model.config, name, p)


def save_student(model: nn.Module, out_dir: Path, *, tokenizer: Any, source_dir: Path | None) -> None:
    """HF folder: config.json + model.safetensors + tokenizer files + the sentence-transformers head files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if source_dir is None:
        return
    for name in SENTENCE_TRANSFORMERS_FILES:
        source = source_dir / name
        if source.is_dir():
            shutil.copytree(source, out_dir / name, dirs_exist_ok=True)
        elif source.is_file():
            (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, out_dir / name)
    pooling = out_dir / "1_Pooling" / "config.json"
    if pooling.is_file():  # sentence-transformers checks this against the (possibly narrowed) hidden size
        head = json.loads(pooling.read_text())
        head["word_embedding_dimension"] = int(model.config.hidden_size)
        pooling.write_text(json.dumps(head, indent=2) + "\n")


__all__ = ["StudentSpec", "build_student", "check_same_tokenizer", "evenly_spaced", "load_pretrained",
           "load_tokenizer", "save_student", "set_dropout"]
