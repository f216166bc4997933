"""Structured pruning that physically removes rows and columns, and unstructured magnitude pruning.

Who does the heavy lifting:
- attention heads of BERT-like encoders: transformers' own `PreTrainedModel.prune_heads` (it slices Q/K/V and the
  output projection and records `config.pruned_heads`, so `from_pretrained` rebuilds the same shapes);
- FFN neurons, residual-stream (hidden) channels, whole layers, and Llama-style KV groups: our own `index_select`
  over a `Group`, because transformers has no API for them. A `Group` lists every (parameter, axis) that one
  prunable unit spans; every importance takes groups and returns one score per unit, like Torch-Pruning's `Group`;
- channels of arbitrary CNNs: Torch-Pruning's dependency graph (`tp.pruner.MetaPruner`), saved as safetensors plus
  its replayable pruning history (never a pickled module);
- unstructured sparsity: W' = W * M with a global or per-layer magnitude threshold (torch.kthvalue). Dense ONNX
  Runtime kernels multiply the zeros anyway: file size and latency stay the same unless the weights are stored sparse.

>>> spec = StructuredSpec(heads_ratio=0.5, ffn_ratio=0.5)                                 # doctest: +SKIP
>>> report = prune_transformer(model, spec, batches=calibration_batches)                   # doctest: +SKIP
>>> model.save_pretrained(out_dir)  # reloads with from_pretrained, exports with export_onnx  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgepack.compress.config import WIDTH_MULTIPLE
from edgepack.errors import BadInputError
from edgepack.registry import Registry

Batch = dict[str, torch.Tensor]
LossFn = Callable[[Any, Batch], torch.Tensor]


# ------------------------------------------------------------------------------------------ architecture as data


@dataclass(frozen=True)
class Layout:
    """Where a transformer family keeps its parts, relative to `model.base_model` and to one layer."""

    layers: str
    query: str
    key: str
    value: str
    attn_out: str
    ffn_in: tuple[str, ...]
    ffn_out: str
    #: LayerNorms on the residual stream inside a layer (hidden-channel pruning), and the embedding side.
    layer_norms: tuple[str, ...] = ()
    embeddings: tuple[str, ...] = ()
    embedding_norm: str | None = None
    grouped_kv: bool = False  # Llama-style: heads share K/V in groups; prune whole groups


LAYOUTS: Registry[Layout] = Registry("transformer layout")
LAYOUTS.register("bert")(Layout(
    layers="encoder.layer", query="attention.self.query", key="attention.self.key", value="attention.self.value",
    attn_out="attention.output.dense", ffn_in=("intermediate.dense",), ffn_out="output.dense",
    layer_norms=("attention.output.LayerNorm", "output.LayerNorm"),
    embeddings=("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings"),
    embedding_norm="embeddings.LayerNorm"))
LAYOUTS.register("llama")(Layout(
    layers="layers", query="self_attn.q_proj", key="self_attn.k_proj", value="self_attn.v_proj",
    attn_out="self_attn.o_proj", ffn_in=("mlp.gate_proj", "mlp.up_proj"), ffn_out="mlp.down_proj", grouped_kv=True))

#: config.model_type -> layout name
MODEL_TYPES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "camembert": "bert", "electra": "bert",
               "llama": "llama", "mistral": "llama", "qwen2": "llama"}


def layout_of(model: nn.Module) -> Layout:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPES:
        raise BadInputError(f"structured pruning knows model types {', '.join(sorted(MODEL_TYPES))}, not "
                            f"'{model_type}'; for CNNs use prune_conv_channels, or add a Layout to LAYOUTS")
    return LAYOUTS.get(MODEL_TYPES[model_type])


def base_prefix(model: nn.Module) -> str:
    """'bert.' for BertForSequenceClassification, '' for BertModel: parameter names are relative to `model`."""
    base = getattr(model, "base_model", model)
    return "" if base is model else f"{model.base_model_prefix}."


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model, "base_model", model).get_submodule(layout_of(model).layers)
    if not isinstance(layers, nn.ModuleList):
        raise BadInputError(f"{type(model).__name__}: '{layout_of(model).layers}' is not a list of layers")
    return layers


def head_dim(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


# --------------------------------------------------------------------------------------------------- the Group


@dataclass(frozen=True)
class Slice:
    """One parameter axis a unit spans: unit u owns indices [u * block, (u + 1) * block) of `param` along `dim`."""

    param: str
    dim: int


@dataclass(frozen=True)
class Probe:
    """Where a unit's activation is read: the input or output of a module, last axis (..., units * block)."""

    module: str
    side: str  # "input" | "output"


@dataclass(frozen=True)
class Group:
    """Coupled slices removed together: a head (or KV group), an FFN neuron, a hidden channel."""

    kind: str  # "heads" | "kv-groups" | "ffn" | "hidden"
    layer: int | None
    units: int
    slices: tuple[Slice, ...]
    probes: tuple[Probe, ...] = ()


def _linear_slices(prefix: str, names: Sequence[str], dim: int, model: nn.Module) -> list[Slice]:
    """Weight (and bias, when slicing output rows and a bias exists) of each named Linear."""
    out: list[Slice] = []
    for name in names:
        module = model.get_submodule(f"{prefix}{name}")
        out.append(Slice(f"{prefix}{name}.weight", dim))
        if dim == 0 and getattr(module, "bias", None) is not None:
            out.append(Slice(f"{prefix}{name}.bias", 0))
    return out


def attention_groups(model: nn.Module) -> list[Group]:
    """Per layer: heads (BERT-like) or KV groups (Llama-like: q heads of the group + its k/v head)."""
    layout, groups = layout_of(model), []
    for index, layer in enumerate(transformer_layers(model)):
        prefix = f"{base_prefix(model)}{layout.layers}.{index}."
        qkv = _linear_slices(prefix, (layout.query, layout.key, layout.value), 0, model)
        out = _linear_slices(prefix, (layout.attn_out,), 1, model)
        value = layer.get_submodule(layout.value)
        units = value.out_features // head_dim(model)  # (kv) heads present in this layer
        kind = "kv-groups" if layout.grouped_kv else "heads"
        groups.append(Group(kind, index, units, tuple(qkv + out), (Probe(prefix + layout.attn_out, "input"),)))
    return groups


def ffn_groups(model: nn.Module) -> list[Group]:
    layout, groups = layout_of(model), []
    for index, layer in enumerate(transformer_layers(model)):
        prefix = f"{base_prefix(model)}{layout.layers}.{index}."
        slices = _linear_slices(prefix, layout.ffn_in, 0, model) + _linear_slices(prefix, (layout.ffn_out,), 1, model)
        units = layer.get_submodule(layout.ffn_out).in_features
        groups.append(Group("ffn", index, units, tuple(slices), (Probe(prefix + layout.ffn_out, "input"),)))
    return groups


def hidden_group(model: nn.Module) -> Group:
    """Every parameter axis that carries the residual stream (BERT-like encoders only)."""
    layout, pre = layout_of(model), base_prefix(model)
    if layout.embedding_norm is None:
        raise BadInputError("hidden_ratio: hidden-channel pruning supports BERT-like encoders only; set it to 0")
    slices = [Slice(f"{pre}{name}.weight", 1) for name in layout.embeddings]
    slices += [Slice(f"{pre}{layout.embedding_norm}.{p}", 0) for p in ("weight", "bias")]
    probes = [Probe(f"{pre}{layout.embedding_norm}", "output")]
    for index in range(len(transformer_layers(model))):
        prefix = f"{pre}{layout.layers}.{index}."
        slices += _linear_slices(prefix, (layout.query, layout.key, layout.value, *layout.ffn_in), 1, model)
        slices += _linear_slices(prefix, (layout.attn_out, layout.ffn_out), 0, model)
        slices += [Slice(f"{prefix}{norm}.{p}", 0) for norm in layout.layer_norms for p in ("weight", "bias")]
        probes.append(Probe(f"{prefix}{layout.layer_norms[-1]}", "output"))
    base = getattr(model, "base_model", model)
    if getattr(base, "pooler", None) is not None:
        slices += [Slice(f"{pre}pooler.dense.weight", 0), Slice(f"{pre}pooler.dense.weight", 1),
                   Slice(f"{pre}pooler.dense.bias", 0)]
    units = int(model.config.hidden_size)
    return Group("hidden", None, units, tuple(slices), tuple(probes))


def _unit_view(tensor: torch.Tensor, dim: int, units: int) -> torch.Tensor:
    """(units, rest): the slice's axis moved first and split into `units` blocks."""
    return tensor.movedim(dim, 0).reshape(units, -1)


def apply_keep(model: nn.Module, group: Group, keep: torch.Tensor) -> None:
    """Keep units `keep` (sorted ascending) of `group` in every slice, in place; fix module shape attributes."""
    params = dict(model.named_parameters())
    for item in group.slices:
        param = params[item.param]
        block = param.shape[item.dim] // group.units
        index = (keep[:, None] * block + torch.arange(block)).flatten()  # (kept * block,)
        module_name, _, attr = item.param.rpartition(".")
        module = model.get_submodule(module_name)
        new = nn.Parameter(param.detach().index_select(item.dim, index).clone(), requires_grad=param.requires_grad)
        setattr(module, attr, new)
        params[item.param] = new
        _sync_shape(module)


def _sync_shape(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = module.weight.shape[1]


# --------------------------------------------------------------------------------------------------- importance


class Importance(ABC):
    """One score per unit of each group (higher = more important).

    >>> scores = IMPORTANCES.get("magnitude")().scores(model, ffn_groups(model), batches=[])  # doctest: +SKIP
    """

    needs_data = False

    @abstractmethod
    def scores(self, model: nn.Module, groups: Sequence[Group], *, batches: Sequence[Batch]) -> list[torch.Tensor]:
        ...


IMPORTANCES: Registry[type[Importance]] = Registry("pruning importance")


@IMPORTANCES.register("magnitude")
class MagnitudeImportance(Importance):
    """L2 norm of every weight a unit owns, across all its slices."""

    @torch.no_grad()
    def scores(self, model: nn.Module, groups: Sequence[Group], *, batches: Sequence[Batch]) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        out = []
        for group in groups:
            total = torch.zeros(group.units)
            for item in group.slices:
                total += _unit_view(params[item.param].float(), item.dim, group.units).pow(2).sum(1)
            out.append(total.sqrt())
        return out


def output_energy(outputs: Any, batch: Batch) -> torch.Tensor:
    """Label-free loss for Taylor scores: 0.5 * ||output||^2 per valid token, averaged (first model output)."""
    first = outputs[0] if isinstance(outputs, tuple) else next(iter(outputs.values()))  # (B, T, C) or (B, K)
    energy = 0.5 * first.float().pow(2).sum(-1)
    mask = batch.get("attention_mask")
    if mask is not None and energy.dim() == 2:
        return (energy * mask).sum() / mask.sum().clamp(min=1)
    return energy.mean()


@IMPORTANCES.register("taylor")
class TaylorImportance(Importance):
    """First-order Taylor: |sum over a unit's weights of grad x weight|, per batch, summed over batches.

    The loss is `loss_fn(outputs, batch)`; without labels we use `output_energy` (how much the unit feeds the output).
    """

    needs_data = True

    def __init__(self, loss_fn: LossFn = output_energy) -> None:
        self.loss_fn = loss_fn

    def scores(self, model: nn.Module, groups: Sequence[Group], *, batches: Sequence[Batch]) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        wanted = {item.param for group in groups for item in group.slices}
        previous = {name: params[name].requires_grad for name in wanted}
        for name in wanted:
            params[name].requires_grad_(True)
        totals = [torch.zeros(group.units) for group in groups]
        try:
            for batch in batches:
                model.zero_grad(set_to_none=True)
                self.loss_fn(model(**batch), batch).backward()
                with torch.no_grad():
                    for total, group in zip(totals, groups, strict=True):
                        contribution = torch.zeros(group.units)
                        for item in group.slices:
                            param = params[item.param]
                            contribution += _unit_view(param * param.grad, item.dim, group.units).sum(1)
                        total += contribution.abs()
        finally:
            model.zero_grad(set_to_none=True)
            for name, flag in previous.items():
                params[name].requires_grad_(flag)
        return totals


@IMPORTANCES.register("activation")
class ActivationImportance(Importance):
    """Mean |activation| of each unit over the calibration batches (read by forward hooks at the group's probes)."""

    needs_data = True

    @torch.no_grad()
    def scores(self, model: nn.Module, groups: Sequence[Group], *, batches: Sequence[Batch]) -> list[torch.Tensor]:
        totals = [torch.zeros(group.units) for group in groups]
        counts = [0] * len(groups)
        with _probes(model, groups) as captured:
            for batch in batches:
                model(**batch)
                for index, group in enumerate(groups):
                    for tensor in captured.pop(index, []):
                        # (..., units * block) -> (N, units, block) -> (units,)
                        totals[index] += tensor.float().abs().reshape(-1, group.units, tensor.shape[-1] // group.units
                                                                      ).mean((0, 2))
                        counts[index] += 1
        return [total / max(count, 1) for total, count in zip(totals, counts, strict=True)]


@contextmanager
def _probes(model: nn.Module, groups: Sequence[Group]) -> Iterator[dict[int, list[torch.Tensor]]]:
    captured: dict[int, list[torch.Tensor]] = {}
    handles = []
    for index, group in enumerate(groups):
        for probe in group.probes:
            def hook(_m: nn.Module, args: tuple, output: Any, index: int = index, side: str = probe.side) -> None:
                captured.setdefault(index, []).append((args[0] if side == "input" else output).detach())
            handles.append(model.get_submodule(probe.module).register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


# -------------------------------------------------------------------------------------------- ratios and snapping


def check_ratio(field_name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise BadInputError(f"{field_name} is {value}; a pruning ratio is the fraction removed, in [0, 1) "
                            "(0 keeps everything, 0.5 removes half)")


def snap_keep(total: int, ratio: float, *, multiple: int) -> int:
    """Units kept when removing `ratio` of `total`, rounded to a multiple of `multiple` (at least one multiple)."""
    if total <= multiple:
        return total
    kept = round(total * (1.0 - ratio) / multiple) * multiple
    return int(min(total, max(multiple, kept)))


def snap_heads_removed(heads: int, ratio: float, *, kv_heads: int | None = None, field_name: str) -> int:
    """Query heads removed per layer: whole KV groups when the model has grouped KV heads (GQA)."""
    group = heads // kv_heads if kv_heads else 1
    units = heads // group
    removed = round(units * ratio) * group
    if removed >= heads:
        raise BadInputError(f"{field_name}={ratio} would remove all {heads} heads of a layer; use at most "
                            f"{(units - 1) / units:.3f} (keeps one {'KV group' if group > 1 else 'head'})")
    return removed


# -------------------------------------------------------------------------------------------------- operations


def _lowest(scores: torch.Tensor, count: int) -> list[int]:
    return sorted(torch.argsort(scores, stable=True)[:count].tolist())


def _kept(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (ascending) of the `count` highest scores."""
    return torch.sort(torch.argsort(scores, descending=True, stable=True)[:count]).values


def drop_layers(model: nn.Module, layers: Sequence[int], *, field_name: str = "layers") -> list[int]:
    """Remove whole layers; rewrite config.num_hidden_layers, pruned_heads and layer indices. Returns kept indices."""
    modules = transformer_layers(model)
    total = len(modules)
    bad = [i for i in layers if not 0 <= i < total]
    if bad or len(set(layers)) >= total:
        raise BadInputError(f"{field_name}={list(layers)}: layer indices must be distinct, in 0..{total - 1}, and "
                            "leave at least one layer")
    keep = [i for i in range(total) if i not in set(layers)]
    select_layers(model, keep)
    return keep


def select_layers(model: nn.Module, keep: Sequence[int]) -> None:
    """Keep only layers `keep` (in that order), in place."""
    modules = transformer_layers(model)
    kept = [modules[i] for i in keep]
    parent_name, _, attr = layout_of(model).layers.rpartition(".")
    base = getattr(model, "base_model", model)
    parent = base.get_submodule(parent_name) if parent_name else base
    setattr(parent, attr, nn.ModuleList(kept))
    for new_index, layer in enumerate(kept):
        for sub in layer.modules():  # Llama's KV cache is indexed by layer_idx
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = new_index
    config = model.config
    old_pruned = {int(k): v for k, v in (getattr(config, "pruned_heads", None) or {}).items()}
    config.pruned_heads = {new: old_pruned[old] for new, old in enumerate(keep) if old in old_pruned}
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    config.num_hidden_layers = len(kept)


def prune_attention(model: nn.Module, removed_per_layer: int, scores: Sequence[torch.Tensor]) -> dict[int, list[int]]:
    """Remove `removed_per_layer` query heads from every layer (the lowest-scoring heads or KV groups)."""
    layout = layout_of(model)
    if layout.grouped_kv:
        return _prune_kv_groups(model, removed_per_layer, scores)
    plan = {index: _lowest(layer_scores, removed_per_layer) for index, layer_scores in enumerate(scores)}
    model.prune_heads({k: v for k, v in plan.items() if v})  # transformers slices Q/K/V/O, records pruned_heads
    return plan


def _prune_kv_groups(model: nn.Module, removed_heads: int, scores: Sequence[torch.Tensor]) -> dict[int, list[int]]:
    config = model.config
    group = config.num_attention_heads // config.num_key_value_heads
    removed_groups = removed_heads // group
    plan = {}
    for attn, layer_scores in zip(attention_groups(model), scores, strict=True):
        keep = _kept(layer_scores, attn.units - removed_groups)
        apply_keep(model, attn, keep)
        plan[attn.layer] = _lowest(layer_scores, removed_groups)
    config.head_dim = head_dim(model)  # explicit: hidden_size // heads no longer holds
    config.num_key_value_heads -= removed_groups
    config.num_attention_heads -= removed_heads
    return plan


def prune_ffn(model: nn.Module, kept: int, scores: Sequence[torch.Tensor]) -> None:
    """Keep the `kept` highest-scoring FFN neurons of every layer; rewrite config.intermediate_size."""
    for group, layer_scores in zip(ffn_groups(model), scores, strict=True):
        apply_keep(model, group, _kept(layer_scores, kept))
    model.config.intermediate_size = kept


def prune_hidden(model: nn.Module, kept: int, scores: torch.Tensor) -> list[int]:
    """Keep `kept` residual-stream channels; heads must already number kept // head_dim in every layer.

    Returns the kept channel indices (ascending): student channel i is teacher channel kept[i].
    """
    size = head_dim(model)
    heads = {g.units for g in attention_groups(model)}
    if heads != {kept // size}:
        raise BadInputError(f"hidden_ratio keeps {kept} channels = {kept // size} heads of {size}, but the layers "
                            f"have {sorted(heads)} heads; set heads_ratio to 0 so it follows hidden_ratio")
    channels = _kept(scores, kept)
    apply_keep(model, hidden_group(model), channels)
    config = model.config
    config.hidden_size = kept
    config.num_attention_heads = kept // size
    config.pruned_heads = {}  # the head count now lives in num_attention_heads
    return channels.tolist()


# ------------------------------------------------------------------------------------------- one call, one report


@dataclass(frozen=True)
class StructuredSpec:
    """What to remove. Ratios are fractions removed; `layers` are indices to drop (before the other steps)."""

    heads_ratio: float = 0.0
    ffn_ratio: float = 0.0
    hidden_ratio: float = 0.0
    layers: tuple[int, ...] = ()
    importance: str = "magnitude"
    #: FFN neurons and hidden channels are kept in multiples of this (SIMD-friendly GEMM shapes).
    multiple: int = WIDTH_MULTIPLE
    field_prefix: str = "prune."

    def __post_init__(self) -> None:
        for name in ("heads_ratio", "ffn_ratio", "hidden_ratio"):
            check_ratio(f"{self.field_prefix}{name}", getattr(self, name))
        IMPORTANCES.get(self.importance)


@dataclass
class PruneReport:
    params_before: int
    params_after: int
    layers_kept: list[int] = field(default_factory=list)
    heads_removed: dict[int, list[int]] = field(default_factory=dict)
    snapped: dict[str, Any] = field(default_factory=dict)
    #: residual-stream channels kept by hidden pruning (indices into the original width); empty if not pruned
    hidden_channels: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"params_before": self.params_before, "params_after": self.params_after,
                "layers_kept": self.layers_kept, "heads_removed": {str(k): v for k, v in self.heads_removed.items()},
                "snapped": self.snapped}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_transformer(model: nn.Module, spec: StructuredSpec, *, batches: Sequence[Batch] = (),
                      importance: Importance | None = None) -> PruneReport:
    """Layers, then heads, then FFN neurons, then hidden channels; importances recomputed after each step."""
    scorer = importance or IMPORTANCES.get(spec.importance)()
    if scorer.needs_data and not batches:
        raise BadInputError(f"{spec.field_prefix}importance '{spec.importance}' needs calibration text; "
                            "pass texts or use importance 'magnitude'")
    model.eval()
    report = PruneReport(params_before=count_params(model), params_after=0)
    report.layers_kept = drop_layers(model, spec.layers, field_name=f"{spec.field_prefix}layers") if spec.layers \
        else list(range(len(transformer_layers(model))))
    removed = _heads_to_remove(model, spec, report)
    if removed:
        groups = attention_groups(model)
        report.heads_removed = prune_attention(model, removed, scorer.scores(model, groups, batches=batches))
    if spec.ffn_ratio > 0:
        total = int(model.config.intermediate_size)
        kept = snap_keep(total, spec.ffn_ratio, multiple=spec.multiple)
        report.snapped["ffn"] = {"asked_ratio": spec.ffn_ratio, "kept": kept, "of": total}
        prune_ffn(model, kept, scorer.scores(model, ffn_groups(model), batches=batches))
    if spec.hidden_ratio > 0:
        kept = report.snapped["hidden"]["kept"]
        (scores,) = scorer.scores(model, [hidden_group(model)], batches=batches)
        report.hidden_channels = prune_hidden(model, kept, scores)
    report.params_after = count_params(model)
    return report


def _heads_to_remove(model: nn.Module, spec: StructuredSpec, report: PruneReport) -> int:
    """Query heads removed per layer, from heads_ratio (snapped to KV groups) or implied by hidden_ratio."""
    config = model.config
    heads = int(config.num_attention_heads)
    kv_heads = getattr(config, "num_key_value_heads", None) if layout_of(model).grouped_kv else None
    removed = snap_heads_removed(heads, spec.heads_ratio, kv_heads=kv_heads,
                                 field_name=f"{spec.field_prefix}heads_ratio")
    if spec.heads_ratio > 0:
        report.snapped["heads"] = {"asked_ratio": spec.heads_ratio, "removed_per_layer": removed, "of": heads}
    if spec.hidden_ratio > 0:
        if getattr(config, "pruned_heads", None):
            raise BadInputError(f"{spec.field_prefix}hidden_ratio needs a model without pruned_heads; prune the "
                                "hidden size first or set hidden_ratio to 0")
        size = head_dim(model)
        kept = snap_keep(int(config.hidden_size), spec.hidden_ratio, multiple=math.lcm(size, spec.multiple))
        implied = heads - kept // size
        if spec.heads_ratio > 0 and implied != removed:
            raise BadInputError(f"{spec.field_prefix}heads_ratio={spec.heads_ratio} removes {removed} heads but "
                                f"hidden_ratio={spec.hidden_ratio} keeps {kept // size} heads of {size}; set "
                                "heads_ratio to 0 (it follows hidden_ratio)")
        report.snapped["hidden"] = {"asked_ratio": spec.hidden_ratio, "kept": kept, "of": int(config.hidden_size),
                                    "heads_kept": kept // size}
        removed = implied
    return removed


# ------------------------------------------------------------------------------------------------- unstructured


def prune_unstructured(model: nn.Module, *, sparsity: float, scope: str = "global",
                       field_name: str = "prune.unstructured_sparsity") -> dict[str, Any]:
    """Zero the smallest-magnitude weights of every nn.Linear (W' = W * M), in place.

    `scope="global"`: one threshold over all Linear weights; `"layer"`: each weight loses `sparsity` of its entries.
    The shapes do not change, so dense kernels (ONNX Runtime's MatMul/Gemm) do the same work on the zeros.
    """
    check_ratio(field_name, sparsity)
    if scope not in ("global", "layer"):
        raise BadInputError(f"unstructured scope '{scope}' is not one of global, layer")
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    total = sum(w.numel() for w in weights)
    with torch.no_grad():
        if scope == "global" and sparsity > 0:
            magnitudes = torch.cat([w.detach().abs().flatten() for w in weights])  # (total,)
            threshold = torch.kthvalue(magnitudes, max(1, int(total * sparsity))).values
            for weight in weights:
                weight.mul_((weight.abs() > threshold).to(weight.dtype))  # W' = W * M
        elif sparsity > 0:
            for weight in weights:
                k = max(1, int(weight.numel() * sparsity))
                threshold = torch.kthvalue(weight.detach().abs().flatten(), k).values
                weight.mul_((weight.abs() > threshold).to(weight.dtype))
    zeros = sum(int((w == 0).sum()) for w in weights)
    return {"asked_sparsity": sparsity, "scope": scope, "linear_weights": total, "zeros": zeros,
            "achieved_sparsity": zeros / max(total, 1)}


# ----------------------------------------------------------------------------------------- CNNs (Torch-Pruning)


def _torch_pruning() -> Any:
    try:
        import torch_pruning as tp
    except ImportError:
        raise BadInputError("conv channel pruning needs Torch-Pruning; run `pip install torch-pruning`") from None
    return tp


def prune_conv_channels(model: nn.Module, example_inputs: torch.Tensor, *, ratio: float,
                        importance: str = "magnitude", batches: Sequence[torch.Tensor] = (),
                        loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        ignored_layers: Sequence[str] = (), round_to: int = 8) -> dict[str, Any]:
    """Remove `ratio` of the channels of every conv/linear group Torch-Pruning's dependency graph finds, in place.

    The last nn.Linear (the classifier) is never pruned, plus any module named in `ignored_layers`. Importance:
    magnitude (group L2), taylor (needs `batches` and `loss_fn(outputs)`), activation (needs `batches`).
    Returns the report, including `history`: Torch-Pruning's replayable record for `load_pruned_module`.
    """
    tp = _torch_pruning()
    check_ratio("prune.conv_ratio", ratio)
    scorer = _tp_importance(tp, importance)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    ignored = [model.get_submodule(name) for name in [*ignored_layers, *linears[-1:]]]
    before = count_params(model)
    pruner = tp.pruner.MetaPruner(model, example_inputs, importance=scorer, pruning_ratio=ratio,
                                  ignored_layers=ignored, round_to=round_to)
    model.eval()
    if importance == "taylor":
        if not batches or loss_fn is None:
            raise BadInputError("prune importance 'taylor' on a CNN needs calibration batches and a loss function")
        model.zero_grad()
        for batch in batches:
            loss_fn(model(batch)).backward()
    if importance == "activation":
        if not batches:
            raise BadInputError("prune importance 'activation' on a CNN needs calibration batches")
        with scorer.compute_importance(model), torch.no_grad():
            for batch in batches:
                model(batch)
    pruner.step()
    model.zero_grad(set_to_none=True)
    return {"params_before": before, "params_after": count_params(model), "ratio": ratio, "round_to": round_to,
            "history": [list(entry) for entry in pruner.pruning_history()]}


def _tp_importance(tp: Any, name: str) -> Any:
    IMPORTANCES.get(name)  # unknown -> the known names
    return {"magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
            "taylor": tp.importance.GroupTaylorImportance,
            "activation": tp.importance.ActivationImportance}[name]()


def save_pruned_module(model: nn.Module, history: list[Any], folder: Path) -> None:
    """weights -> model.safetensors, Torch-Pruning history -> pruning_history.json (no pickle)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "pruning_history.json").write_text(json.dumps(history))


def load_pruned_module(model: nn.Module, example_inputs: torch.Tensor, folder: Path) -> nn.Module:
    """Replay the pruning history on a freshly built `model`, then load the pruned weights from safetensors."""
    from safetensors.torch import load_file

    tp = _torch_pruning()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs)
    history = [tuple(entry) for entry in json.loads((folder / "pruning_history.json").read_text())]
    graph.load_pruning_history(history)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()


__all__ = [
    "IMPORTANCES", "LAYOUTS", "Group", "Importance", "Layout", "PruneReport", "Slice", "StructuredSpec",
    "apply_keep", "attention_groups", "check_ratio", "drop_layers", "ffn_groups", "hidden_group", "layout_of",
    "load_pruned_module", "output_energy", "prune_conv_channels", "prune_ffn", "prune_hidden", "prune_transformer",
    "prune_unstructured", "save_pruned_module", "select_layers", "snap_heads_removed", "snap_keep",
]
