"""The search space: knobs (named recipe settings) and their domains; a candidate is the recipe with knob values.

A knob is data in the `KNOBS` registry: the dotted recipe key it writes, what it means, the section it switches on
when it takes an active value (a prune ratio turns `prune.enabled` on), and optionally how a value becomes the
recipe's value (`layers_kept: 4` becomes `prune.layers`, the indices removed). Any recipe key is also a knob by its
dotted path (`quantize.calibrator`), so a setting another stage adds is searchable with no code; a named knob is one
`knob(...)` line. Every candidate is then a plain recipe run by the normal stages: content-hashed folders, reused
by every candidate (and rerun) that shares them.

>>> space = SearchSpace.build(parse_recipe({"auto": {"space": {"smoothquant": ["search", "off"]}}}))
>>> space.recipe({"smoothquant": "off"}).quantize.smoothquant
'off'
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.auto.config import RangeDomain
from edgepack.errors import BadInputError, did_you_mean
from edgepack.recipe import Recipe, parse_recipe
from edgepack.registry import Registry


@dataclass(frozen=True)
class KnobContext:
    """What a knob may need to know about the model the recipe starts from."""

    #: transformer layers entering the prune stage (the distilled student's when distillation is on)
    layers: int | None = None


#: value, context -> the value written at the knob's path
Transform = Callable[[Any, KnobContext], Any]


@dataclass(frozen=True)
class Knob:
    path: str
    meaning: str
    #: a section switched on (`<section>.enabled: true`) when the value written is active (non-zero, non-empty)
    enables: str | None = None
    transform: Transform | None = None
    #: integer recipe keys scaled by the factor the knob's value applies to the recipe's own value at `path`
    #: (`resolution`: the resize side follows the crop side, so resize 256 / crop 224 stays 8:7)
    scales: tuple[str, ...] = ()

    def written(self, value: Any, context: KnobContext) -> Any:
        return self.transform(value, context) if self.transform else value


KNOBS: Registry[Knob] = Registry("auto knob")


def knob(name: str, path: str, meaning: str, *, enables: str | None = None, transform: Transform | None = None,
         scales: tuple[str, ...] = ()) -> None:
    KNOBS.register(name)(Knob(path, meaning, enables, transform, scales))


def _layers_removed(kept: Any, context: KnobContext) -> list[int]:
    """`layers_kept: k` -> the layers removed, so that k evenly spaced layers stay (layer 0 first, as distillation
    picks them)."""
    from edgepack.compress.students import evenly_spaced

    total = context.layers
    if total is None:
        raise BadInputError("auto.space.layers_kept: the model's layer count is unknown (no config.json with "
                            "num_hidden_layers); search prune.layers by index instead")
    if not isinstance(kept, int) or not 1 <= kept <= total:
        raise BadInputError(f"auto.space.layers_kept={kept!r}: keep 1..{total} of the model's {total} layers")
    keep = set(evenly_spaced(total, kept))
    return [i for i in range(total) if i not in keep]


# --- compression (distill / prune stages)
knob("layers_kept", "prune.layers", "transformer layers kept, evenly spaced (layer 0 first); the rest are removed",
     enables="prune", transform=_layers_removed)
knob("ffn_prune", "prune.ffn_ratio", "fraction of FFN neurons removed in every layer, least important first",
     enables="prune")
knob("head_prune", "prune.heads_ratio", "fraction of attention heads removed in every layer", enables="prune")
knob("hidden_prune", "prune.hidden_ratio", "fraction of hidden (residual-stream) channels removed: the channel "
     "ratio of a transformer", enables="prune")
knob("recovery_steps", "prune.recovery_steps", "distillation steps from the unpruned model after pruning")
knob("student_layers", "distill.num_layers", "layers of the distilled student (evenly spaced teacher layers)",
     enables="distill")
# --- quantization
knob("quantize", "quantize.enabled", "INT8 on (true) or the float model (false)")
knob("calibrator", "quantize.calibrator", "activation range method (minmax, entropy, percentile, ...)")
knob("smoothquant", "quantize.smoothquant", "SmoothQuant alphas: search | recipe | off")
knob("per_channel", "quantize.per_channel", "per-channel weight scales (true) or per-tensor")
knob("activation_type", "quantize.activation_type", "uint8 or int8 activations")
knob("float_fallback", "quantize.max_cosine_drop", "per-layer precision: the most sensitive layers (leave-one-out "
     "ranking) stay in float until 1 - cosine vs FP32 is at most this (null: every layer INT8)")
knob("max_float_layers", "quantize.max_fallback_layers", "at most this many layers in float for float_fallback")
# --- CNNs (the cnn recipe: `quantize.cnn`) and image models
knob("cnn_float_activations", "quantize.cnn.float_activations", "activations kept float with the layers computing "
     "and reading them (cnn recipe), e.g. [] or the stem's output")
knob("wide_activations", "quantize.wide_activations", "activations quantized to 16 bits (uint16 QDQ), e.g. [] or "
     "the stem's output")
knob("equalize", "quantize.cnn.equalize", "cross-layer equalization of consecutive convolutions (cnn recipe)")
knob("bias_correction", "quantize.cnn.bias_correction", "subtract each layer's mean INT8 weight error from its bias "
     "(cnn recipe)")
knob("cnn_int4_largest", "quantize.cnn.int4_largest", "INT4 weights (W4A8, GPTQ) for this many of the largest 1x1 "
     "convolutions / Gemms (cnn recipe); 0: every weight INT8")
knob("cnn_int4_cosine", "quantize.cnn.int4_max_cosine_rise", "INT4 weights for as many 1x1 convolutions / Gemms as "
     "add at most this to the INT8 model's 1 - cosine vs FP32 on the budget samples, cheapest per weight first (cnn "
     "recipe); null: off")
knob("cnn_int4_block", "quantize.cnn.int4_block_size", "INT4 weights per scale along the input channels (16..256)")
knob("resolution", "model.preprocessing.crop", "input image side in pixels (image families: the preprocessing's "
     "crop; its resize side scales with it): the exported graph's input shape", scales=("model.preprocessing.resize",))
# --- per-part precision of weight-only quantization (`quantize.mode: weight-only`): the last variant is the candidate
WEIGHT_ONLY = "quantize.weight_only.variants.-1"
knob("weight_bits", f"{WEIGHT_ONLY}.bits", "weight-only: bits of the MatMul weights (4 or 8, MatMulNBits)")
knob("weight_block", f"{WEIGHT_ONLY}.block_size", "weight-only: weights per scale (16, 32, 64, 128, 256)")
knob("weight_method", f"{WEIGHT_ONLY}.method", "weight-only rounding: rtn | gptq (calibration-aware)")
knob("weight_symmetric", f"{WEIGHT_ONLY}.symmetric", "weight-only: symmetric codes (true) or with zero points")
knob("embedding_bits", f"{WEIGHT_ONLY}.embedding_bits", "weight-only: bits of an untied embedding table (4 or 8; "
     "null: weight_bits)")
knob("embedding_block", f"{WEIGHT_ONLY}.embedding_block_size", "weight-only: embedding values per scale (null: "
     "weight_block)")
knob("int8_layers_cosine", f"{WEIGHT_ONLY}.mixed", "weight-only per-layer INT4 / INT8: the layers most sensitive "
     "at INT4 go to INT8 until 1 - cosine vs FP32 on calibration text is at most this (null: every layer at "
     "weight_bits)", transform=lambda value, _: None if value is None else {"max_cosine_drop": value})
knob("int8_layers_perplexity", f"{WEIGHT_ONLY}.mixed", "weight-only per-layer INT4 / INT8 for decoders: INT8 for "
     "the most sensitive layers until the calibration perplexity is within this ratio of FP32 (null: none)",
     transform=lambda value, _: None if value is None else {"max_perplexity_ratio": value})


def _active(value: Any) -> bool:
    return bool(value) and value != [] and value != 0


def _child(node: Any, part: str, path: str) -> Any:
    """`node[part]`: a section's key, or a list's index (`variants.-1`: the last weight-only variant)."""
    if isinstance(node, list):
        try:
            return node[int(part)]
        except (ValueError, IndexError):
            raise BadInputError(f"auto.space: '{path}': '{part}' is not an index of a list of {len(node)} (0.."
                                f"{len(node) - 1}, or -1 for the last)") from None
    child = node.get(part) if isinstance(node, dict) else None
    if not isinstance(child, dict | list):
        raise BadInputError(f"auto.space: '{path}' is not a recipe key ('{part}' is not a section)")
    return child


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node: Any = tree
    for part in parents:
        node = _child(node, part, path)
    if not isinstance(node, dict):
        raise BadInputError(f"auto.space: '{path}' names a list item, not a recipe key; add the key after it")
    if leaf not in node:
        raise BadInputError(f"auto.space: '{path}' is not a recipe key{did_you_mean(leaf, node)}; keys of "
                            f"'{'.'.join(parents) or 'the recipe'}': {', '.join(sorted(node))}")
    node[leaf] = value


def _scaled(tree: Mapping[str, Any], path: str, value: Any, base: Any, dim: Dimension) -> Any:
    """The recipe's integer at `path` times value / base (the knob's value over the recipe's own)."""
    try:
        current = _get(tree, path)
    except (KeyError, IndexError, TypeError):
        current = None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (current, value, base)) or base <= 0:
        raise BadInputError(f"auto.space.{dim.name}: needs integer values and the recipe's {dim.knob.path} and "
                            f"{path} as integers (got {base!r} and {current!r}); set them in the recipe")
    return round(current * value / base)


def _get(tree: Mapping[str, Any], path: str) -> Any:
    node: Any = tree
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


@dataclass(frozen=True)
class Dimension:
    """One knob of the space with its domain; list values that are not scalars go to optuna as JSON labels."""

    name: str
    knob: Knob
    choices: tuple[Any, ...] | None = None
    domain: RangeDomain | None = None

    @property
    def labels(self) -> tuple[Any, ...]:
        assert self.choices is not None
        return tuple(c if _is_scalar(c) else json.dumps(c) for c in self.choices)

    def suggest(self, trial: Any) -> Any:
        """The trial's value (an optuna Trial's suggest_* by the domain)."""
        if self.choices is not None:
            label = trial.suggest_categorical(self.name, self.labels)
            return self.choices[self.labels.index(label)]
        assert self.domain is not None
        d = self.domain
        if d.integer:
            return trial.suggest_int(self.name, int(d.low), int(d.high), step=int(d.step or 1))
        return trial.suggest_float(self.name, d.low, d.high, step=d.step, log=d.log)

    def to_param(self, value: Any) -> Any:
        """A value as optuna stores it (for enqueueing a known point)."""
        return value if self.choices is None else self.labels[self.choices.index(value)]


class SearchSpace:
    """The recipe's `auto.space` checked against the knobs and the recipe schema."""

    def __init__(self, base: Recipe, dimensions: list[Dimension], context: KnobContext) -> None:
        self.base, self.dimensions, self.context = base, dimensions, context
        self._base_tree = base.dump()
        self._base_tree.pop("auto", None)

    @classmethod
    def build(cls, recipe: Recipe, *, context: KnobContext | None = None) -> SearchSpace:
        context = context or KnobContext(layers=model_layers(recipe))
        dims = [cls._dimension(name, domain) for name, domain in recipe.auto.space.items()]
        space = cls(recipe, dims, context)
        for dim in dims:  # every value must make a valid recipe, checked now rather than mid-search
            for value in dim.choices or (dim.domain.low, dim.domain.high):  # type: ignore[union-attr]
                space.recipe({dim.name: value}, where=f"auto.space.{dim.name}={value!r}")
        return space

    @staticmethod
    def _dimension(name: str, domain: Any) -> Dimension:
        if name in KNOBS:
            knob_ = KNOBS.get(name)
        elif "." in name:
            knob_ = Knob(name, f"the recipe key {name}")
        else:
            raise BadInputError(f"auto.space.{name}: unknown knob{did_you_mean(name, KNOBS.names())}; knobs: "
                                f"{', '.join(KNOBS.names())}, or any recipe key by its dotted path (e.g. "
                                "quantize.calibrator)")
        if isinstance(domain, RangeDomain):
            return Dimension(name, knob_, domain=domain)
        return Dimension(name, knob_, choices=tuple(domain))

    def tree(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The candidate's recipe as a plain dict (what a worker gets)."""
        tree = copy.deepcopy(self._base_tree)
        by_name = {d.name: d for d in self.dimensions}
        for name, value in values.items():
            dim = by_name[name]
            written = dim.knob.written(value, self.context)
            for path in dim.knob.scales:
                _set(tree, path, _scaled(self._base_tree, path, written, _get(self._base_tree, dim.knob.path), dim))
            _set(tree, dim.knob.path, written)
            if dim.knob.enables and _active(written):
                tree[dim.knob.enables]["enabled"] = True
        return tree

    def recipe(self, values: Mapping[str, Any], *, where: str = "auto candidate") -> Recipe:
        return parse_recipe(self.tree(values), source=where)

    def suggest(self, trial: Any) -> dict[str, Any]:
        return {dim.name: dim.suggest(trial) for dim in self.dimensions}

    def base_point(self) -> dict[str, Any] | None:
        """The knob values that give the recipe itself, as optuna params; None when it is not in the space."""
        point: dict[str, Any] = {}
        for dim in self.dimensions:
            current = _get(self._base_tree, dim.knob.path)
            values = dim.choices if dim.choices is not None else ()
            match = [v for v in values if dim.knob.written(v, self.context) == current]
            if not match:
                return None
            point[dim.name] = dim.to_param(match[0])
        return point

    def describe(self) -> dict[str, Any]:
        return {d.name: (list(d.choices) if d.choices is not None else d.domain.model_dump())  # type: ignore[union-attr]
                for d in self.dimensions}


def model_layers(recipe: Recipe) -> int | None:
    """Transformer layers that enter the prune stage: the distilled student's, else the model's (config.json)."""
    distill = recipe.distill
    if distill.enabled and not distill.student and not distill.student_config:
        if distill.keep_layers:
            return len(distill.keep_layers)
        if distill.num_layers:
            return distill.num_layers
    total = _config_layers(recipe.model.path)
    if distill.enabled and total and not distill.student and not distill.student_config:
        return max(1, total // 2)
    return total


def _config_layers(path: str) -> int | None:
    if path == "default":
        from edgepack.families import default_model_path

        folder: Path | None = Path(default_model_path())
    else:
        folder = Path(path) if Path(path).is_dir() else None
    config = folder / "config.json" if folder else None
    if config is None or not config.is_file():
        return None
    value = json.loads(config.read_text()).get("num_hidden_layers")
    return int(value) if isinstance(value, int) else None


__all__ = ["KNOBS", "Dimension", "Knob", "KnobContext", "SearchSpace", "knob", "model_layers"]
