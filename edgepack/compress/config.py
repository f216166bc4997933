"""Recipe sections for the `distill` and `prune` stages (pydantic, frozen, unknown keys rejected).

Defaults work for BERT-like sentence encoders: distillation keeps every other layer and halves the FFN; both stages
are off unless `enabled: true`. Ratios are always the fraction *removed* (0.5 halves a width). Out-of-range ratios
raise `BadInputError` naming the field (pydantic lets our error through unchanged). This module imports no torch,
so loading a recipe stays fast; loss and importance names are checked when the stage starts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgepack.errors import BadInputError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_ratio(section: str, name: str, value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise BadInputError(f"{section}.{name} is {value}; a ratio is the fraction removed, in [0, 1) "
                            "(0 keeps everything, 0.5 removes half)")
    return value


class DistillCorpus(_Section):
    """A broad corpus beside the task's text (`edgepack.calibration_data.corpus`): streamed, exact and near
    duplicates dropped, every text resembling evaluation data (the data section's evaluation split and
    evaluation_sets) dropped, then mixed with the task's texts so that they make up `task_share` of training."""

    #: a .jsonl / .jsonl.gz / .txt / .txt.gz file, or `bundled:<name>` (bundled:distill-corpus-python.jsonl.gz)
    path: str
    field: str = "text"
    #: a second text per record (a docstring's summary and its paragraph) that is trained on too
    pair_field: str | None = None
    #: at most this many records, the first ones kept after de-duplication
    max_samples: int | None = Field(None, ge=1)
    #: estimated Jaccard similarity (word 3-shingles, MinHash) at which a text is a near duplicate; null: exact only
    near_duplicates: float | None = Field(0.7, gt=0, le=1)
    #: fraction of the training texts that come from distill.data.path (repeated when too few): 0.2 = 1 in 5
    task_share: float = Field(0.2, ge=0, lt=1)
    #: pairs of the corpus (text, pair) held out for early stopping, beside the task's held-out pairs
    validation_pairs: int = Field(0, ge=0)


class DistillData(_Section):
    """Distillation's own training text (it needs no labels: the teacher's outputs are the targets).

    Records that are also in the evaluation split (same text) are dropped, so the report's figures stay on text
    the student never trained on.
    """

    #: a .txt / .jsonl / .csv file, or `bundled:<name>`
    path: str
    format: Literal["auto", "text", "jsonl", "csv"] = "auto"
    field: str = "text"
    #: a second text per record (e.g. a paraphrase) that is trained on too
    pair_field: str | None = None
    #: at most this many records (after de-duplication and the evaluation hold-out), in file order
    max_samples: int | None = Field(None, ge=1)
    #: add this many "text_a text_b" pairs of random training texts (longer inputs from short sentences)
    combinations: int = Field(0, ge=0)
    #: a broad corpus mixed with these texts (null: the task's texts only)
    corpus: DistillCorpus | None = None
    seed: int = 0


#: pruned FFN / hidden widths are kept in multiples of this by default (SIMD-friendly GEMM shapes)
WIDTH_MULTIPLE = 8


class DistillSection(_Section):
    enabled: bool = False
    #: training text; null: the data section's calibration split (minus the last fifth, kept for early stopping)
    data: DistillData | None = None
    #: null: the model family's (sentence-embedding for sentence-encoder, sequence-classification for classifiers)
    task: Literal["sentence-embedding", "sequence-classification", "causal-lm"] | None = None
    #: an existing student folder (same tokenizer); empty: build the student from the teacher as below
    student: str | None = None
    #: teacher layers the student keeps (weights copied); empty: `num_layers` evenly spaced (default: half)
    keep_layers: list[int] = Field(default_factory=list)
    num_layers: int | None = Field(None, ge=1)
    #: fraction of FFN neurons / hidden channels removed from the student, the least important first
    ffn_ratio: float = 0.5
    hidden_ratio: float = 0.0
    importance: str = "activation"
    #: FFN / hidden widths kept in multiples of this; null: 8 (SIMD-friendly GEMM shapes), or with weight-only
    #: quantization in the recipe the lcm of 8 and its block sizes (MatMulNBits needs a block to divide the width)
    width_multiple: int | None = Field(None, ge=1)
    #: a smaller config trained from scratch instead (e.g. {hidden_size: 256, num_hidden_layers: 3})
    student_config: dict[str, int] = Field(default_factory=dict)
    #: loss name -> weight (registry `edgepack.compress.distill.LOSSES`: cosine, mse, hidden, attention-relation,
    #: kl, ce)
    losses: dict[str, float] = Field(default_factory=lambda: {"cosine": 1.0, "hidden": 1.0})
    temperature: float = Field(2.0, gt=0)
    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1)
    #: wall-clock budget: training stops after the step that crosses it (not reproducible step for step); with
    #: teacher_cache it includes the teacher pass
    max_train_minutes: float | None = Field(None, gt=0)
    #: samples per optimizer step across processes and accumulation (the global batch)
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_length: int = Field(128, ge=8)
    gradient_checkpointing: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    optimizer: Literal["adamw", "adafactor", "adamw-8bit"] = "adamw"
    #: keep the word-embedding table fixed: small data updates only the tokens it contains
    freeze_embeddings: bool = True
    #: dropout probability for the student (None keeps the model's); 0 makes runs with different process counts
    #: comparable step for step, since each process draws its own dropout masks
    student_dropout: float | None = None
    #: per-epoch metric that early stopping watches (higher is better); similarity_agreement is continuous and works
    #: for any student width, where retrieval metrics on a few pairs saturate at 1.0
    monitor: Literal["similarity_agreement", "cosine_to_teacher", "paraphrase_mrr",
                     "paraphrase_recall_at_1"] = "similarity_agreement"
    early_stop_patience: int | None = Field(3, ge=1)
    checkpoint_every: int = Field(0, ge=0)
    #: run the teacher once per training text before training and read its outputs from memory at each step
    #: (`compress.teacher_cache`), instead of a teacher forward per step
    teacher_cache: bool = False
    #: storage of the cached token-level outputs (hidden states, Q/K/V); float32 reproduces recomputed losses exactly
    teacher_cache_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    #: autocast of the cache's teacher pass (null: `precision`); bf16 runs on AMX / AVX-512 BF16 CPUs ~3x faster
    teacher_precision: Literal["fp32", "bf16", "fp16"] | None = None
    #: refuse a cache whose token-level outputs would need more memory than this (MB)
    teacher_cache_max_mb: float = Field(3072, gt=0)
    #: batches of texts of similar length (less padding per step)
    length_bucketing: bool = False
    shard_teacher: bool = False
    #: torch intra-op threads while training (null: torch's default); one was faster than two on shared 2-core hosts
    threads: int | None = Field(None, ge=1)
    seed: int = 0

    @field_validator("ffn_ratio", "hidden_ratio")
    @classmethod
    def _ratio(cls, value: float, info: object) -> float:
        return _check_ratio("distill", getattr(info, "field_name", "ratio"), value)


class PruneSection(_Section):
    enabled: bool = False
    #: null: the model family's
    task: Literal["sentence-embedding", "sequence-classification", "causal-lm"] | None = None
    #: fractions removed per layer; heads snap to KV groups (GQA), FFN / hidden widths to multiples of 8
    heads_ratio: float = 0.0
    ffn_ratio: float = 0.0
    hidden_ratio: float = 0.0
    #: layer indices removed entirely
    layers: list[int] = Field(default_factory=list)
    #: FFN / hidden widths kept in multiples of this; null: as distill.width_multiple
    width_multiple: int | None = Field(None, ge=1)
    #: registry `edgepack.compress.prune.IMPORTANCES`: magnitude, taylor, activation
    importance: str = "activation"
    calibration_samples: int = Field(64, ge=1)
    calibration_batch_size: int = Field(16, ge=1)
    max_length: int = Field(128, ge=8)
    #: W' = W * M on every Linear; dense ONNX Runtime kernels gain nothing from it (measured when enabled)
    unstructured_sparsity: float = 0.0
    unstructured_scope: Literal["global", "layer"] = "global"
    measure_dense_effect: bool = True
    #: optimizer steps of distillation from the unpruned model after pruning (0: none)
    recovery_steps: int = Field(0, ge=0)
    recovery_lr: float = Field(1e-4, gt=0)
    recovery_batch_size: int = Field(16, ge=1)
    recovery_losses: dict[str, float] = Field(default_factory=lambda: {"cosine": 1.0, "hidden": 1.0})
    seed: int = 0

    @field_validator("heads_ratio", "ffn_ratio", "hidden_ratio", "unstructured_sparsity")
    @classmethod
    def _ratio(cls, value: float, info: object) -> float:
        return _check_ratio("prune", getattr(info, "field_name", "ratio"), value)


__all__ = ["DistillCorpus", "DistillData", "DistillSection", "PruneSection"]
