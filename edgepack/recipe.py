"""Recipe schema: one pydantic model per stage, unknown keys rejected with the key's name and a close match.

A recipe is YAML (loaded with `yaml.safe_load`). Every field has a default that works for BERT-like
encoders, so the smallest recipe is `model: {path: ./my-model}`.
"""

from __future__ import annotations

import reprlib
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgepack.auto.config import AutoSection
from edgepack.compress.config import DistillSection, PruneSection
from edgepack.errors import BadInputError, did_you_mean
from edgepack.families import FAMILIES, all_option_names, parse_family_options
from edgepack.quantization.weight_only_config import WeightOnlySection


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: model.adapter values of edgepack 0.1 and the families that replaced them
_RENAMED_ADAPTERS = {"hf-encoder": "sentence-encoder", "torch-module": "torch-module", "onnx-file": "onnx"}


class ModelSection(BaseModel):
    """`family` (auto: recognised from the model), `path`, `task`; any other key is an option of the family
    (e.g. `pooling` for sentence-encoder, `inputs` / `outputs` for torch-module), checked against its `Options`."""

    model_config = ConfigDict(extra="allow", frozen=True)

    family: str = "auto"
    #: local Hugging Face folder, .onnx file, `pkg.module:factory`, or "default" (all-MiniLM-L6-v2)
    path: str = "default"
    #: the family's task (default: its first, e.g. feature-extraction for sentence-encoder)
    task: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _renamed_adapter(cls, data: Any) -> Any:
        if isinstance(data, dict) and "adapter" in data:
            data = dict(data)
            adapter = data.pop("adapter")
            family = _RENAMED_ADAPTERS.get(adapter)
            if family is None or data.get("family", family) != family:
                raise BadInputError(f"model.adapter was replaced by model.family in edgepack 0.2.0; write family: "
                                    f"{family or 'auto'} (families: {', '.join(FAMILIES.names())})")
            warnings.warn(f"model.adapter: {adapter} is deprecated since edgepack 0.2.0 and will be removed in 0.3.0; "
                          f"write model.family: {family}", DeprecationWarning, stacklevel=2)
            data["family"] = family
        return data

    @model_validator(mode="after")
    def _check_options(self) -> ModelSection:
        if self.family != "auto":
            parse_family_options(FAMILIES.get(self.family), self.options, where="model")
            return self
        known = all_option_names()
        for key in self.options:
            if key not in known:
                hint = did_you_mean(key, [*known, *type(self).model_fields])
                raise BadInputError(f"unknown key 'model.{key}'{hint}; model keys are family, path, task and the "
                                    f"family options {', '.join(sorted(known))}")
        return self

    @property
    def options(self) -> dict[str, Any]:
        """The family's own keys, as written."""
        return dict(self.model_extra or {})


class EvaluationSet(_Section):
    """A named evaluation set besides the data section's split (e.g. retrieval on another domain): every variant's
    task metrics on it are in the report (`variants.<v>.evaluation_sets.<name>`), and no distillation trains on
    text resembling it."""

    name: str
    #: a user file or `bundled:<name>` (bundled:retrieval-manpages.jsonl, bundled:retrieval-debian.jsonl)
    path: str
    format: Literal["auto", "text", "jsonl", "csv"] = "auto"
    field: str = "text"
    pair_field: str | None = None
    label_field: str | None = None
    #: the first this many records (null: all)
    max_samples: int | None = Field(None, ge=1)

    @field_validator("name")
    @classmethod
    def _simple_name(cls, value: str) -> str:
        if not value or not all(ch.isalnum() or ch in "-_" for ch in value):
            raise ValueError("must be a non-empty name of letters, digits, '-' and '_'")
        return value


class ImageDataSection(_Section):
    """Image folders (`calibration_data.images`): samples per image, bad images, the decompression-bomb guard."""

    #: samples per image: 1 = the whole image; k > 1 adds k - 1 random crops / flips (held out with their image)
    views: int = Field(1, ge=1)
    on_error: Literal["error", "skip"] = "error"
    max_pixels: int = Field(89_478_485, ge=1)
    #: images with a label never calibrate: they go to the evaluation split first (file order), the unlabelled
    #: ones then fill calibration and the rest of evaluation in the seed's order (a few labelled photos among many:
    #: every label measures accuracy, and the first evaluation samples, successive halving's early rungs, have them)
    hold_out_labelled: bool = False


class DataSection(_Section):
    #: a user file (.txt/.jsonl/.csv/.npz), a folder of images, `bundled:<name>` for a sample file shipped with
    #: edgepack, or `package:<pkg>/<path>` for data installed with a Python package
    path: str = "bundled:sentences.jsonl"
    format: Literal["auto", "text", "jsonl", "csv", "npz", "image-folder"] = "auto"
    field: str = "text"
    pair_field: str | None = "paraphrase"
    #: class label per record (a class index or name): accuracy for classifier families; image folders: "folder"
    #: (sub-folder names) or a CSV file (columns file, label)
    label_field: str | None = None
    images: ImageDataSection = Field(default_factory=ImageDataSection)
    n_calibration: int = Field(200, ge=1)
    n_evaluation: int = Field(100, ge=0)
    seed: int = 0
    max_length: int = Field(128, ge=1)
    padding: Literal["longest", "max_length", "bucket"] = "longest"
    #: more evaluation sets (another domain, harder pairs), measured for every variant on the CPU EP
    evaluation_sets: list[EvaluationSet] = Field(default_factory=list)

    @field_validator("evaluation_sets")
    @classmethod
    def _distinct_names(cls, value: list[EvaluationSet]) -> list[EvaluationSet]:
        names = [s.name for s in value]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluation set names repeat: {names}")
        return value


class ExportSection(_Section):
    opset: int = Field(17, ge=13, le=23)
    #: max |ONNX Runtime - PyTorch| on every output; null: the family's per-output tolerance
    atol: float | None = Field(None, gt=0)
    check_samples: int = Field(8, ge=1)


class CnnSection(_Section):
    """CNN techniques before ORT's quantizer (cnn recipe only); docs/benchmarks.md measures each one."""

    #: cross-layer equalization of consecutive convolutions (ReLU6 pairs: relu6 replace | keep)
    equalize: bool = False
    relu6: Literal["keep", "replace"] = "keep"
    #: nearest (ORT's rounding) | adaround (learned rounding per layer on the calibration set)
    rounding: Literal["nearest", "adaround"] = "nearest"
    #: subtract each layer's mean output error caused by its INT8 weights from its bias
    bias_correction: bool = True
    adaround_iterations: int = Field(300, ge=1)
    adaround_samples: int = Field(32, ge=1)
    #: activation tensors kept in float with the layer computing them and every layer reading them (no Q/DQ on
    #: them): the few activations whose 8-bit step dominates the error; names as in the normalised graph
    float_activations: list[str] = Field(default_factory=list)
    #: INT4 weights, activations INT8 (W4A8): these layers (node names: 1x1 Conv, Gemm, MatMul) and the
    #: `int4_largest` largest such layers, GPTQ-rounded in blocks of `int4_block_size` input channels, bias
    #: corrected
    int4_layers: list[str] = Field(default_factory=list)
    int4_largest: int = Field(0, ge=0)
    int4_block_size: Literal[16, 32, 64, 128, 256] = 128
    #: and as many more layers at INT4 as add at most this to the INT8 model's 1 - logit cosine vs FP32 on the
    #: budget samples (calibration data; optimistic: GPTQ fit them): the cheapest per weight first
    int4_max_cosine_rise: float | None = Field(None, ge=0, le=1)
    #: how an INT4 layer runs: matmul-nbits (ONNX Runtime's 4-bit GEMM, com.microsoft MatMulNBits; a 1x1 Conv
    #: between two Transposes; CPU / GPU EPs) | dequantize (standard opset-21 blocked DequantizeLinear before the
    #: float layer, what NPU EPs read; on the CPU EP the weight is dequantized at every run: ~3x slower layers) |
    #: auto (matmul-nbits when every EP in validate.providers is a CPU EP, else dequantize)
    int4_kernel: Literal["auto", "matmul-nbits", "dequantize"] = "auto"


class QuantizeSection(_Section):
    enabled: bool = True
    #: auto: the model family's (weight-only for causal-lm, static otherwise; `stages.quantize_mode` resolves it) |
    #: static (activation ranges calibrated offline) | dynamic (ranges per input at run time; CPU EPs only) |
    #: weight-only (MatMulNBits INT4 / INT8 weights, float activations: `weight_only:`; decoders)
    mode: Literal["auto", "static", "dynamic", "weight-only"] = "auto"
    #: INT8 graph: fused (ONNX Runtime's fused integer CPU kernels: QAttention, MatMulIntegerToFloat; CPU EP only)
    #: | qdq (QuantizeLinear/DequantizeLinear pairs any EP reads: QNN HTP, NNAPI, CoreML) | auto (fused when every
    #: EP in validate.providers is a CPU EP, else qdq)
    graph: Literal["auto", "fused", "qdq"] = "auto"
    weight_only: WeightOnlySection = Field(default_factory=WeightOnlySection)
    calibrator: str = "minmax"
    #: SmoothQuant alphas: search (per layer on calibration data) | recipe (the family's per-role values) | off
    smoothquant: Literal["search", "recipe", "off"] = "search"
    #: quantization recipe (transformer-encoder, cnn, generic); auto: the model family's
    recipe: str = "auto"
    per_channel: bool = True
    activation_type: Literal["uint8", "int8"] = "uint8"
    weight_type: Literal["int8"] = "int8"
    exclude_nodes: list[str] = Field(default_factory=list)
    #: activation tensors quantized to 16 bits (uint16 QDQ, same range, finer step): the few whose 8-bit step
    #: dominates the error (EfficientNet-Lite0: the stem conv's output); QDQ graph only
    wide_activations: list[str] = Field(default_factory=list)
    #: accuracy budget: 1 - mean embedding cosine vs FP32 on `budget_samples` calibration samples; the most
    #: sensitive layers fall back to float until it holds (null: no budget)
    max_cosine_drop: float | None = Field(0.005, ge=0, le=2)
    max_fallback_layers: int = Field(12, ge=0)
    budget_samples: int = Field(32, ge=1)
    #: rank every quantized layer by leave-one-out sensitivity and report the top N even when no fallback is
    #: needed (0: only when the budget needs fallback; costs one quantize + score per layer)
    sensitivity_top: int = Field(0, ge=0)
    #: the cnn recipe's techniques (equalization, learned rounding, bias correction; `quantization.cnn`)
    cnn: CnnSection = Field(default_factory=CnnSection)

    @model_validator(mode="before")
    @classmethod
    def _renamed_family(cls, data: Any) -> Any:
        if isinstance(data, dict) and "family" in data:
            data = {k: v for k, v in data.items() if k != "family"} | {"recipe": data["family"]}
            warnings.warn("quantize.family is deprecated since edgepack 0.2.0 and will be removed in 0.3.0; write "
                          "quantize.recipe (model.family names the model family)", DeprecationWarning, stacklevel=2)
        return data


class ValidateSection(_Section):
    providers: list[str] = Field(default_factory=lambda: ["cpu"])
    sequence_length: int = Field(128, ge=1)
    threads: int = Field(2, ge=1)
    warmup: int = Field(10, ge=0)
    runs: int = Field(50, ge=1)
    #: where to measure: local, ssh://user@host[:port][?python=...], adb://serial (docs/devices.md)
    device: str = "local"


class BundleSection(_Section):
    """App/firmware deliverables from the final variant (see docs/integration.md)."""

    enabled: bool = True
    samples: int = Field(4, ge=1, le=64)  # golden test vectors from the evaluation split
    optimization_style: Literal["Fixed", "Runtime"] = "Fixed"
    target_platform: Literal["arm", "amd64"] = "arm"
    alignment: int = Field(64, ge=1)
    fixed_shapes: dict[str, int] | None = None  # e.g. {batch: 1, sequence: 128} adds an NPU fixed-shape variant


class GatesSection(_Section):
    min_cosine: float | None = Field(0.99, ge=-1, le=1)
    min_cosine_sample: float | None = Field(None, ge=-1, le=1)
    #: classifiers: share of samples whose top-1 class is the parent variant's
    min_top1_agreement: float | None = Field(None, ge=0, le=1)
    max_size_ratio: float | None = Field(None, gt=0)
    max_latency_ratio: float | None = Field(None, gt=0)
    max_task_metric_drop: float | None = Field(None, ge=0)
    #: on every data.evaluation_sets set: the final variant's task metric >= this x the reference's
    min_evaluation_set_ratio: float | None = Field(None, gt=0)
    #: decoders (causal-lm): final variant's perplexity / its parent's, and teacher-forced next-token agreement
    max_perplexity_ratio: float | None = Field(None, gt=0)
    min_next_token_agreement: float | None = Field(None, ge=0, le=1)


class Recipe(_Section):
    name: str = "recipe"
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    distill: DistillSection = Field(default_factory=DistillSection)
    prune: PruneSection = Field(default_factory=PruneSection)
    export: ExportSection = Field(default_factory=ExportSection)
    quantize: QuantizeSection = Field(default_factory=QuantizeSection)
    validate_: ValidateSection = Field(default_factory=ValidateSection, alias="validate")
    bundle: BundleSection = Field(default_factory=BundleSection)
    gates: GatesSection = Field(default_factory=GatesSection)
    #: `edgepack auto`: the search space and budgets (`edgepack.auto.config`); `edgepack run` ignores it
    auto: AutoSection = Field(default_factory=AutoSection)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, value: str) -> str:
        if not value or "/" in value:
            raise ValueError("must be a non-empty name without '/'")
        return value

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names (aliases) at the location of an error, for a did-you-mean."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list of sections (quantize.weight_only.variants.0)
            continue
        field = current.model_fields.get(part) or next(
            (f for f in current.model_fields.values() if f.alias == part), None)
        current = _section_type(getattr(field, "annotation", None))
        if current is None:
            return []
    return [f.alias or name for name, f in current.model_fields.items()]


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The section model of a field: itself, or inside `X | None` / `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def _format_error(error: dict[str, Any], source: str) -> str:
    loc = tuple(error["loc"])
    where = ".".join(str(p) for p in loc) or "<top>"
    if error["type"] == "extra_forbidden":
        hint = did_you_mean(str(loc[-1]), _known_keys(Recipe, loc))
        return f"unknown key '{where}'{hint}"
    return f"{where}: {error['msg']} (got {reprlib.repr(error.get('input'))})"  # bounded: the input may be huge


def parse_recipe(data: Any, *, source: str = "recipe") -> Recipe:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BadInputError(f"{source}: a recipe must be a YAML mapping of sections, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(_format_error(e, source) for e in err.errors())
        raise BadInputError(f"{source}: {problems}; see recipes/minilm.yaml for every key") from None
    except BadInputError as err:  # raised by a section's own check (model keys, family options): name the file
        raise BadInputError(f"{source}: {err}") from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"recipe {path} does not exist; pass a YAML file such as recipes/minilm.yaml")
    try:
        text = path.read_text(encoding="utf-8")
        _check_expanded_size(yaml.compose(text, Loader=yaml.SafeLoader), path)
        data = yaml.safe_load(text)
    except UnicodeDecodeError as err:
        raise BadInputError(f"{path}: not UTF-8 text (byte {err.start}); save the recipe as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise BadInputError(f"{path}:{where} is not valid YAML ({problem}); fix the syntax") from None
    except RecursionError:
        raise BadInputError(f"{path}: nested too deeply to be a recipe; a recipe is a few levels of sections") from None
    return parse_recipe(data, source=str(path))


#: values a recipe may expand to once YAML aliases are resolved (a real recipe has a few hundred)
MAX_RECIPE_VALUES = 100_000


def _check_expanded_size(root: yaml.Node | None, path: Path) -> None:
    """Refuse a recipe whose aliases multiply it ("billion laughs": nine levels of ten aliases are 10^9 values,
    which validation and error messages would walk). Counted on the composed graph, shared nodes once each."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # a node that contains itself (recursive alias) counts once
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else \
            node.value if isinstance(node, yaml.SequenceNode) else []
        total = 1 + sum(size(child) for child in children)
        sizes[id(node)] = min(total, MAX_RECIPE_VALUES + 1)
        return sizes[id(node)]

    if root is not None and size(root) > MAX_RECIPE_VALUES:
        raise BadInputError(f"{path}: expands to more than {MAX_RECIPE_VALUES:,} values once its YAML aliases are "
                            "resolved (alias bomb?); write the recipe out without nested aliases")


#: What `edgepack demo` runs; recipes/minilm.yaml spells out the same recipe (a test keeps them equal).
DEMO_RECIPE = Recipe(name="minilm", model=ModelSection(pooling="auto", normalize=None))
