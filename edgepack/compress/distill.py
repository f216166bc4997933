"""Knowledge distillation objectives: teacher -> student for sentence encoders, sequence classifiers and causal LMs.

A `TaskHead` runs a model and exposes what the losses need (`Outputs`); each loss is one `DistillLoss` class in
the `LOSSES` registry, so a new loss is one class and one decorator line:

>>> @LOSSES.register("pooled-l1")                                              # doctest: +SKIP
... class PooledL1(DistillLoss):
...     needs = frozenset({"pooled"})
...     def forward(self, student, teacher):
...         return (student.pooled - teacher.pooled).abs().mean()

`DistillObjective` holds the student and the losses' own parameters (hidden-state projections) as submodules and
the frozen teacher outside the module tree, so DDP, the optimizer and checkpoints see only what trains. PyTorch
does the math; the MiniLM-v2 relation loss and the masking are ours (transformers ships no distillation losses).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgepack.compress.prune import layout_of, transformer_layers
from edgepack.errors import BadInputError
from edgepack.families.sentence_encoder import pool
from edgepack.registry import Registry

Batch = dict[str, torch.Tensor]


@dataclass
class Outputs:
    """One forward pass, as the losses see it. Shapes: B batch, T tokens, C width, K classes, V vocabulary."""

    mask: torch.Tensor  # (B, T) 1 = real token
    pooled: torch.Tensor | None = None  # (B, C) sentence embedding (after the model's pooling / normalisation)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # (layers + 1) x (B, T, C)
    logits: torch.Tensor | None = None  # (B, K) classifier or (B, T, V) causal LM
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # last layer's Q, K, V projections (B, T, *)
    labels: torch.Tensor | None = None  # (B,) class labels when the data has them


# ------------------------------------------------------------------------------------------------- task heads


class TaskHead:
    """Runs a model for one task and fills `Outputs` with what `needs` asks for."""

    def __init__(self, *, pooling: str = "mean", normalize: bool = False) -> None:
        self.pooling = pooling
        self.normalize = normalize

    def run(self, model: nn.Module, batch: Batch, needs: frozenset[str]) -> Outputs:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with _capture_qkv(model, enabled="qkv" in needs) as qkv:
            raw = model(**inputs, output_hidden_states="hidden_states" in needs, return_dict=True)
        out = Outputs(mask=batch["attention_mask"], labels=batch.get("labels"),
                      hidden_states=raw.hidden_states if "hidden_states" in needs else None,
                      qkv=(qkv["query"], qkv["key"], qkv["value"]) if "qkv" in needs else None)
        self.fill(out, raw)
        return out

    def fill(self, out: Outputs, raw: Any) -> None:
        out.logits = raw.logits


TASKS: Registry[type[TaskHead]] = Registry("distillation task")


@TASKS.register("sentence-embedding")
class SentenceEmbeddingHead(TaskHead):
    def fill(self, out: Outputs, raw: Any) -> None:
        out.pooled = pool(raw.last_hidden_state, out.mask, pooling=self.pooling, normalize=self.normalize)


TASKS.register("sequence-classification")(TaskHead)
TASKS.register("causal-lm")(TaskHead)


@contextmanager
def _capture_qkv(model: nn.Module, *, enabled: bool) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks on the last layer's query/key/value projections (B, T, width)."""
    captured: dict[str, torch.Tensor] = {}
    if not enabled:
        yield captured
        return
    layout, last = layout_of(model), transformer_layers(model)[-1]
    handles = []
    for role, name in (("query", layout.query), ("key", layout.key), ("value", layout.value)):
        def hook(_m: nn.Module, _args: tuple, output: torch.Tensor, role: str = role) -> None:
            captured[role] = output
        handles.append(last.get_submodule(name).register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------------- losses


@dataclass(frozen=True)
class LossContext:
    """What a loss may need to build itself: widths, the student->teacher layer map, temperature."""

    teacher_width: int
    student_width: int
    #: (student hidden_states index, teacher hidden_states index); index 0 is the embedding output
    layer_map: tuple[tuple[int, int], ...]
    temperature: float = 2.0
    relation_heads: int = 12
    #: teacher channel of each student hidden channel when the student was narrowed by hidden pruning
    student_channels: tuple[int, ...] = ()


class DistillLoss(nn.Module):
    """Base class: `needs` names the `Outputs` fields used; forward returns a scalar."""

    needs: frozenset[str] = frozenset()

    def __init__(self, context: LossContext) -> None:
        super().__init__()
        self.context = context

    def forward(self, student: Outputs, teacher: Outputs) -> torch.Tensor:
        raise NotImplementedError


LOSSES: Registry[type[DistillLoss]] = Registry("distillation loss")


def _require(value: torch.Tensor | None, name: str, field: str) -> torch.Tensor:
    if value is None:
        raise BadInputError(f"distill.losses.{name} needs the model's {field}; this task does not produce it")
    return value


def _projection(context: LossContext) -> nn.Module:
    """Learned Linear(C_student, C_teacher) when the widths differ, else the identity.

    A student narrowed by hidden pruning starts from the selection matrix (student channel i -> teacher channel
    student_channels[i]), the map the pruning made; otherwise PyTorch's default random init.
    """
    width_s, width_t = context.student_width, context.teacher_width
    if width_s == width_t:
        return nn.Identity()
    projection = nn.Linear(width_s, width_t, bias=False)
    if len(context.student_channels) == width_s:
        with torch.no_grad():
            projection.weight.zero_()  # (C_t, C_s)
            projection.weight[list(context.student_channels), list(range(width_s))] = 1.0
    return projection


@LOSSES.register("cosine")
class CosineLoss(DistillLoss):
    """1 - cos(student embedding, teacher embedding), batch mean (student projected when widths differ)."""

    needs = frozenset({"pooled"})

    def __init__(self, context: LossContext) -> None:
        super().__init__(context)
        self.projection = _projection(context)

    def forward(self, student: Outputs, teacher: Outputs) -> torch.Tensor:
        s, t = _require(student.pooled, "cosine", "pooled embedding"), teacher.pooled
        return (1 - F.cosine_similarity(self.projection(s.float()), t.float(), dim=-1)).mean()


@LOSSES.register("mse")
class PooledMSELoss(CosineLoss):
    """Mean squared error between the embeddings (sentence-transformers' MSELoss distillation)."""

    def forward(self, student: Outputs, teacher: Outputs) -> torch.Tensor:
        s, t = _require(student.pooled, "mse", "pooled embedding"), teacher.pooled
        return F.mse_loss(self.projection(s.float()), t.float())


@LOSSES.register("similarity")
class SimilarityLoss(DistillLoss):
    """MSE between the in-batch cosine-similarity matrices (B, B) of student and teacher embeddings.

    Width-free: it matches the geometry retrieval uses, whatever the student's embedding width. In-batch means
    per micro-batch: with gradient accumulation or DDP it compares smaller matrices than one big batch would.
    """

    needs = frozenset({"pooled"})

    def forward(self, student: Outputs, teacher: Outputs) -> torch.Tensor:
        s = F.normalize(_require(student.pooled, "similarity", "pooled embedding").float(), dim=-1)
        t = F.normalize(teacher.pooled.float(), dim=-1)
        return F.mse_loss(s @ s.T, t @ t.T)


@LOSSES.register("contrastive")
class ContrastiveAgreementLoss(DistillLoss):
    """In-batch contrastive agreement with the teacher (InfoNCE, symmetric): the student's embedding of text i,
    projected to the teacher's width, must pick the teacher's embedding of text i among the batch's teacher
    embeddings, and the other way round.

    What retrieval asks of an embedding (rank the right text first among many) asked directly; the projection is
    the one `cosine` learns (a narrower student), temperature 0.05. Per micro-batch, like `similarity`.
    """

    needs = frozenset({"pooled"})
    temperature = 0.05

    def __init__(self, context: LossContext) -> None:
        super().__init__(context)
        self.projection = _projection(context)

    def forward(self, student: Outputs, teacher: Outputs) -> torch.Tensor:
        s = F.normalize(self.projection(_require(student.pooled, "contrastive", "pooled embedding").float()), dim=-1)
        t = F.normalize(teacher.pooled.float(), dim=-1)
        logits = s @ t.T / self.temperature  # (B, B): student i vs teacher j
        target = torch.arange(len(s), device=s.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@LOSSES.register("hidden")
class HiddenStateLoss(DistillLoss):
    """MSE of mapped hidden states over real tokens; a learned Linear(C_student, C_teacher) when widths differ."""

    needs = frozenset({"hidden_states"})

    def __init__(self, context: LossContext) -> None:
        super().__init__(context)
        self.projection = _projection(context)

    def forward(self, student: Outputs, teacher: Outputs) -> torch.Tensor:
        s_states = _require(student.hidden_states, "hidden", "hidden states")
        t_states = teacher.hidden_states
        mask = student.mask.unsqueeze(-1).float()  # (B, T, 1)
        losses = []
        for s_index, t_index in self.context.layer_map:
            diff = self.projection(s_states[s_index].float()) - t_states[t_index].float()  # (B, T, C_t)
            losses.append(_per_sample_mean((diff.pow(2) * mask).mean(-1), student.mask))
        return torch.stack(losses).mean()


def _per_sample_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) per-token values -> mean over each sample's real tokens, then over samples.

    Per-sample first, so the loss of a batch is the mean of its micro-batches' losses: gradient accumulation and
    DDP then give the same gradients as one big batch (a token-weighted mean over the batch would not).
    """
    valid = mask.float()
    return ((values * valid).sum(-1) / valid.sum(-1).clamp(min=1)).mean()


@LOSSES.register("attention-relation")
class AttentionRelationLoss(DistillLoss):
    """MiniLM-v2: KL between teacher and student Q-Q, K-K, V-V self-attention relations of the last layer.

    Widths may differ: both are split into the same number of relation heads R (the largest R <= relation_heads that
    divides both widths), relations are softmax(x x^T / sqrt(d_r)) over real key tokens.
    """

    needs = frozenset({"qkv"})

    def forward(self, student: Outputs, teacher: Outputs) -> torch.Tensor:
        s_qkv = student.qkv
        if s_qkv is None or teacher.qkv is None:
            raise BadInputError("distill.losses.attention-relation needs Q/K/V projections; the model has none")
        losses = [self._relation_kl(s, t, student.mask) for s, t in zip(s_qkv, teacher.qkv, strict=True)]
        return torch.stack(losses).mean()

    def _relation_kl(self, s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        heads = max(r for r in range(1, self.context.relation_heads + 1)
                    if s.shape[-1] % r == 0 and t.shape[-1] % r == 0)
        log_s, log_t = _relation(s.float(), heads, mask), _relation(t.float(), heads, mask)  # (B, R, T, T)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean(1)  # (B, T): per query token, averaged over R
        return _per_sample_mean(kl, mask)


def _relation(x: torch.Tensor, heads: int, mask: torch.Tensor) -> torch.Tensor:
    batch, tokens, width = x.shape
    x = x.view(batch, tokens, heads, width // heads).transpose(1, 2)  # (B, R, T, d_r)
    scores = x @ x.transpose(-1, -2) / math.sqrt(width // heads)  # (B, R, T, T)
    scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


@LOSSES.register("kl")
class LogitKLLoss(DistillLoss):
    """KL(teacher || student) on temperature-scaled logits, times T^2 (Hinton et al.); per real token for LMs."""

    needs = frozenset({"logits"})

    def forward(self, student: Outputs, teacher: Outputs) -> torch.Tensor:
        s, t = _require(student.logits, "kl", "logits").float(), teacher.logits.float()
        temp = self.context.temperature
        log_s, log_t = F.log_softmax(s / temp, dim=-1), F.log_softmax(t / temp, dim=-1)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (B,) classifier or (B, T) causal LM
        if kl.dim() == 2:  # next-token distributions: average over real tokens only
            return _per_sample_mean(kl, student.mask) * temp**2
        return kl.mean() * temp**2


@LOSSES.register("ce")
class LabelCELoss(DistillLoss):
    """Cross-entropy on the data's labels; 0 when the batch has none (distillation needs no labels)."""

    needs = frozenset({"logits"})

    def forward(self, student: Outputs, teacher: Outputs) -> torch.Tensor:
        logits = _require(student.logits, "ce", "logits")
        if student.labels is None or logits.dim() != 2:
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), student.labels)


# ------------------------------------------------------------------------------------------------- objective


class DistillObjective(nn.Module):
    """Student + loss parameters; `forward(**batch)` returns (weighted total, per-loss values) for the trainer."""

    def __init__(self, student: nn.Module, teacher: nn.Module, *, head: TaskHead, weights: Mapping[str, float],
                 context: LossContext) -> None:
        super().__init__()
        active = {name: float(w) for name, w in weights.items() if w}
        for name, weight in weights.items():
            LOSSES.get(name)  # unknown name -> the known ones
            if weight < 0:
                raise BadInputError(f"distill.losses.{name}={weight}: loss weights must be >= 0")
        if not active:
            raise BadInputError("distill.losses: every weight is 0; give at least one loss a positive weight")
        self.student = student
        self.losses = nn.ModuleDict({name: LOSSES.get(name)(context) for name in active})
        self.register_buffer("weights", torch.tensor(list(active.values())), persistent=False)
        self.needs = frozenset().union(*(loss.needs for loss in self.losses.values()))
        self.head = head
        self.context = context
        teacher.eval().requires_grad_(False)
        self.__dict__["teacher"] = teacher  # not a submodule: frozen, outside state_dict / DDP / optimizer

    @property
    def loss_names(self) -> list[str]:
        return list(self.losses)

    def use_cache(self, cache: Any) -> None:
        """Read the teacher's outputs from a `TeacherCache` (batches then carry `cache_index`, see `cached_collate`)
        instead of running the teacher on every batch."""
        self.__dict__["teacher_cache"] = cache

    def forward(self, **batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = batch.pop("cache_index", None)  # (B,) example numbers, when the batch comes with a cache
        cache = self.__dict__.get("teacher_cache")
        if cache is not None and index is not None:
            teacher_out = cache.outputs(index.tolist(), batch["attention_mask"])
            teacher_out.labels = batch.get("labels")
        else:
            with torch.no_grad():
                teacher_out = self.head.run(self.__dict__["teacher"], batch, self.needs)
        student_out = self.head.run(self.student, batch, self.needs)
        parts = torch.stack([loss(student_out, teacher_out) for loss in self.losses.values()])  # (losses,)
        return (parts * self.weights).sum(), parts.detach()


def layer_map(teacher_layers: int, student_layers: int, keep_layers: Sequence[int] = ()) -> tuple[tuple[int, int], ...]:
    """hidden_states index pairs: embeddings to embeddings, then each student layer to its source teacher layer
    (keep_layers) or to the evenly matching one (teacher layer round((i + 1) * Lt / Ls))."""
    if keep_layers:
        return ((0, 0), *((i + 1, k + 1) for i, k in enumerate(keep_layers)))
    return ((0, 0), *((i + 1, round((i + 1) * teacher_layers / student_layers)) for i in range(student_layers)))


def build_objective(student: nn.Module, teacher: nn.Module, *, task: str, weights: Mapping[str, float],
                    keep_layers: Sequence[int] = (), temperature: float = 2.0, pooling: str = "mean",
                    normalize: bool = False, student_channels: Sequence[int] = ()) -> DistillObjective:
    head = TASKS.get(task)(pooling=pooling, normalize=normalize)
    context = LossContext(
        teacher_width=int(teacher.config.hidden_size), student_width=int(student.config.hidden_size),
        layer_map=layer_map(len(transformer_layers(teacher)), len(transformer_layers(student)), keep_layers),
        temperature=temperature, relation_heads=int(teacher.config.num_attention_heads),
        student_channels=tuple(student_channels))
    return DistillObjective(student, teacher, head=head, weights=weights, context=context)


# ------------------------------------------------------------------------------------------------------- data


def tokenize_texts(tokenizer: Any, texts: Sequence[str], *, max_length: int,
                   labels: Sequence[int] | None = None) -> list[dict[str, list[int]]]:
    """Unpadded token ids per text (the trainer pads each micro-batch to its longest text)."""
    from edgepack.calibration_data.tokenize import encode_texts

    if not texts:
        raise BadInputError("distillation needs training text; the data has no samples")
    names = ("input_ids", "attention_mask", "token_type_ids")
    examples = [{k: v for k, v in e.items() if k in names}
                for e in encode_texts(tokenizer, texts, max_length=max_length)]
    for example, label in zip(examples, labels or [], strict=False):
        example["labels"] = [int(label)]
    return examples


def pad_collate(examples: Sequence[Mapping[str, list[int]]], *, pad_id: int) -> Batch:
    """Right-pad to the longest example: int64 (B, T) per input, labels (B,), cache_index (B,) when examples carry
    their number (`number_examples`, for the teacher cache)."""
    from edgepack.calibration_data.tokenize import pad_examples

    longest = max(len(e["input_ids"]) for e in examples)
    scalars = ("labels", "cache_index")
    inputs = [{k: v for k, v in e.items() if k not in scalars} for e in examples]
    batch: Batch = {name: torch.from_numpy(rows)
                    for name, rows in pad_examples(inputs, length=longest, pad_id=pad_id).items()}
    for name in scalars:
        if name in examples[0]:
            batch[name] = torch.tensor([e[name][0] for e in examples])
    return batch


def number_examples(examples: Sequence[dict[str, list[int]]]) -> list[dict[str, list[int]]]:
    """Each example with its position as `cache_index`, so a batch can find its teacher outputs in the cache."""
    return [{**e, "cache_index": [i]} for i, e in enumerate(examples)]


# ------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def encode(model: nn.Module, tokenizer: Any, texts: Sequence[str], *, pooling: str, normalize: bool,
           max_length: int = 128, batch_size: int = 64) -> np.ndarray:
    """Sentence embeddings (N, C) from a torch encoder, in eval mode (restores the previous mode)."""
    was_training = model.training
    model.eval()
    chunks = []
    pad_id = tokenizer.pad_token_id or 0
    examples = tokenize_texts(tokenizer, texts, max_length=max_length)
    for start in range(0, len(examples), batch_size):
        batch = pad_collate(examples[start:start + batch_size], pad_id=pad_id)
        hidden = model(**batch).last_hidden_state  # (B, T, C)
        chunks.append(pool(hidden.float(), batch["attention_mask"], pooling=pooling, normalize=normalize).numpy())
    model.train(was_training)
    return np.concatenate(chunks)


def retrieval_metrics(text_emb: np.ndarray, pair_emb: np.ndarray) -> dict[str, float]:
    """Paraphrase retrieval (hf_encoder's metric): recall@1 and MRR of text i -> pair i among all pairs."""
    from edgepack.calibration_data import TextSample
    from edgepack.families.sentence_encoder import paraphrase_retrieval

    outputs = [{"e": row[None]} for row in np.concatenate([text_emb, pair_emb])]
    samples = [TextSample(str(i), pair=str(i)) for i in range(len(text_emb))]
    return paraphrase_retrieval(outputs, samples, output="e")


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)


def cosine_to_teacher(student_emb: np.ndarray, teacher_emb: np.ndarray) -> float | None:
    """Mean cosine between student and teacher embeddings of the same texts; None when the widths differ."""
    if student_emb.shape != teacher_emb.shape:
        return None
    return float((_unit_rows(student_emb) * _unit_rows(teacher_emb)).sum(1).mean())


def similarity_agreement(student: Sequence[np.ndarray], teacher: Sequence[np.ndarray]) -> float:
    """Pearson correlation of the (N, N) text-vs-pair cosine matrices: comparable across embedding widths."""
    s = (_unit_rows(student[0]) @ _unit_rows(student[1]).T).ravel()
    t = (_unit_rows(teacher[0]) @ _unit_rows(teacher[1]).T).ravel()
    return float(np.corrcoef(s, t)[0, 1])


__all__ = [
    "LOSSES", "TASKS", "DistillLoss", "DistillObjective", "LossContext", "Outputs", "TaskHead", "build_objective",
    "cosine_to_teacher", "encode", "similarity_agreement", "layer_map", "number_examples", "pad_collate", "pool",
    "retrieval_metrics", "tokenize_texts",
]
