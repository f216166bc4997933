"""`torch-module`: any nn.Module built by a factory given as an import path `pkg.module:factory`.

The recipe states the inputs (name, shape with the batch first, dtype) because a plain module does not carry them.
Data comes as arrays (NPZ, one array per input). Fidelity is measured on the first output; for 2-D outputs
(classifier logits) top-1 agreement with the reference is reported too, and accuracy when the NPZ has `labels`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from edgepack.calibration_data import Feed, Sample, array_batches
from edgepack.errors import BadInputError
from edgepack.families.base import FamilyOptions, ModelFamily, ModelIO, ModelSource, TensorSpec, register_family
from edgepack.families.sequence_classifier import top1_agreement


class InputSpec(FamilyOptions):
    name: str
    shape: list[int]  # batch first
    dtype: str = "float32"

    @field_validator("shape")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(d < 1 for d in value):
            raise ValueError("every dimension must be >= 1, the batch first, e.g. [1, 3, 224, 224]")
        return value


class TorchModuleOptions(FamilyOptions):
    inputs: list[InputSpec] = Field(default_factory=list)
    outputs: list[str] = Field(default_factory=list)
    #: export the first dimension of every input and output as the dynamic axis "batch"
    dynamic_batch: bool = True


def load_factory(source: str) -> Any:
    """Import `pkg.module:factory`, call it, and check it built an nn.Module (eval mode)."""
    import torch

    module_name, _, attr = source.partition(":")
    # an import path is code by design (the user's own factory); it never names the standard library, whose
    # no-argument callables (os:fork, os:abort, antigravity on import) a recipe from elsewhere could aim at
    if module_name.split(".")[0] in sys.stdlib_module_names or not attr.isidentifier() or attr.startswith("_"):
        raise BadInputError(f"model '{source}': an import path names your own factory, `package.module:function` "
                            "(not Python's standard library, not a private name); it is imported and called, so a "
                            "recipe that names one is code: run only recipes you trust")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise BadInputError(f"cannot import '{module_name}' for model '{source}' ({err}); check the module path "
                            "and that it is on PYTHONPATH") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise BadInputError(f"module '{module_name}' has no '{attr}'; name a function or class that builds the model")
    try:
        model = factory()
    except TypeError as err:  # a callable that wants arguments: not a factory
        raise BadInputError(f"calling '{source}' failed ({err}); name a function that takes no arguments and "
                            "returns the torch.nn.Module") from None
    if not isinstance(model, torch.nn.Module):
        raise BadInputError(f"'{source}' returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


@register_family
class TorchModule(ModelFamily):
    name = "torch-module"
    tasks = ("custom",)
    quant_recipe = "auto"
    Options = TorchModuleOptions

    @classmethod
    def recognize(cls, source: ModelSource) -> int:
        return 10 if source.kind == "import-path" else 0

    def __init__(self, source: ModelSource, options: TorchModuleOptions, *, task: str | None = None) -> None:
        super().__init__(source, options, task=task)
        if not options.inputs:
            raise BadInputError("model.inputs is empty; family torch-module needs each input's name, shape and "
                                "dtype, e.g. inputs: [{name: pixel_values, shape: [1, 3, 224, 224]}]")
        if not options.outputs:
            raise BadInputError("model.outputs is empty; name the module's outputs, e.g. outputs: [logits]")
        self.inputs: list[InputSpec] = list(options.inputs)
        self.outputs: list[str] = list(options.outputs)

    @property
    def io(self) -> ModelIO:
        batch = "batch" if self.options.dynamic_batch else 1
        inputs = tuple(TensorSpec(i.name, (batch, *i.shape[1:]), i.dtype) for i in self.inputs)
        outputs = tuple(TensorSpec(name, (batch,)) for name in self.outputs)
        return ModelIO(inputs, outputs, primary_output=self.outputs[0])

    def load_torch(self) -> Any:
        return load_factory(self.source.text)

    def feeds(self, samples: Sequence[Sample], *, batch_size: int = 1, max_length: int = 128,
              padding: str = "longest") -> Iterator[Feed]:
        return array_batches([self._check(s, i) for i, s in enumerate(samples)], batch_size=batch_size)

    def latency_feed(self, samples: Sequence[Sample], *, sequence_length: int) -> Feed:
        return next(self.feeds(samples[:1], batch_size=1))

    def _check(self, sample: Sample, index: int) -> dict[str, np.ndarray]:
        if not isinstance(sample, dict):
            raise BadInputError("family torch-module needs array samples; point data.path at an .npz file "
                                "with one array per model input")
        out = {}
        for spec in self.inputs:
            if spec.name not in sample:
                raise BadInputError(f"sample {index} has no array '{spec.name}' (has: {', '.join(sample)}); "
                                    "name the NPZ arrays after the model inputs")
            value = np.asarray(sample[spec.name]).astype(spec.dtype)
            if tuple(value.shape) != tuple(spec.shape[1:]):
                raise BadInputError(f"input '{spec.name}': sample {index} has shape {list(value.shape)}, the model "
                                    f"expects {list(spec.shape[1:])} per sample (model.inputs shape {spec.shape})")
            out[spec.name] = value
        return out

    def fidelity(self, reference: Sequence[Mapping[str, np.ndarray]],
                 outputs: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
        metrics = super().fidelity(reference, outputs)
        if reference and reference[0][self.primary_output].ndim == 2 and reference[0][self.primary_output].shape[1] > 1:
            metrics["top1_agreement"] = top1_agreement(reference, outputs, output=self.primary_output)
        return metrics

    def task_metrics(self, outputs: Sequence[Mapping[str, np.ndarray]],
                     samples: Sequence[Sample]) -> dict[str, float]:
        labels = [s.get("labels") for s in samples if isinstance(s, dict)]
        if not outputs or any(label is None for label in labels) or outputs[0][self.primary_output].ndim != 2:
            return {}
        predicted = np.concatenate([o[self.primary_output].argmax(axis=1) for o in outputs])
        return {"top1_accuracy": float(np.mean(predicted == np.asarray(labels).reshape(-1)))}
