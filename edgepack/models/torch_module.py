"""`torch-module`: any nn.Module built by a factory given as an import path `pkg.module:factory`.

The recipe states the inputs (name, shape with the batch first, dtype) because a plain module does not
carry them. Data comes as arrays (NPZ, one array per input). Fidelity is measured on the first output;
for 2-D outputs (classifier logits) the task metric is top-1 agreement with the FP32 reference labels
when the NPZ carries a `labels` array.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from edgepack.calibration_data import Feed, Sample, array_batches
from edgepack.errors import BadInputError
from edgepack.models.base import ADAPTERS, ModelAdapter


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]  # batch first
    dtype: str = "float32"


def load_factory(source: str) -> torch.nn.Module:
    if ":" not in source:
        raise BadInputError(f"model source '{source}' is not an import path; write it as 'package.module:factory'")
    module_name, _, attr = source.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise BadInputError(f"cannot import '{module_name}' for model '{source}' ({err}); check the module path "
                            "and that it is on PYTHONPATH") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise BadInputError(f"module '{module_name}' has no '{attr}'; name a function or class that builds the model")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise BadInputError(f"'{source}' returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


@ADAPTERS.register("torch-module")
class TorchModuleAdapter(ModelAdapter):
    kind = "torch-module"

    def __init__(self, source: str, *, inputs: Sequence[InputSpec], outputs: Sequence[str],
                 dynamic_batch: bool = True) -> None:
        super().__init__(source)
        if not inputs:
            raise BadInputError("model.inputs is empty; adapter torch-module needs each input's name, shape and dtype")
        if not outputs:
            raise BadInputError("model.outputs is empty; name the module's outputs, e.g. [logits]")
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.dynamic_batch = dynamic_batch
        self.primary_output = self.outputs[0]
        self.labels: np.ndarray | None = None

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return self.outputs

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        if not self.dynamic_batch:
            return {}
        return {name: {0: "batch"} for name in [*self.input_names, *self.outputs]}

    def load_torch(self) -> torch.nn.Module:
        return load_factory(self.source)

    def feeds(self, samples: Sequence[Sample], *, batch_size: int = 1, max_length: int = 128,
              padding: str = "longest") -> Iterator[Feed]:
        arrays = [self._check(s, i) for i, s in enumerate(samples)]
        return array_batches(arrays, batch_size=batch_size)

    def latency_feed(self, samples: Sequence[Sample], *, sequence_length: int) -> Feed:
        return next(self.feeds(samples[:1], batch_size=1))

    def _check(self, sample: Sample, index: int) -> dict[str, np.ndarray]:
        if not isinstance(sample, dict):
            raise BadInputError("adapter torch-module needs array samples; point data.path at an .npz file "
                                "with one array per model input")
        out = {}
        for spec in self.inputs:
            if spec.name not in sample:
                raise BadInputError(f"sample {index} has no array '{spec.name}' (has: {', '.join(sample)}); "
                                    "name the NPZ arrays after the model inputs")
            value = np.asarray(sample[spec.name]).astype(spec.dtype)
            if tuple(value.shape) != tuple(spec.shape[1:]):
                raise BadInputError(f"input '{spec.name}': sample {index} has shape {list(value.shape)}, the model "
                                    f"expects {list(spec.shape[1:])} per sample (model.inputs shape {list(spec.shape)})")
            out[spec.name] = value
        return out

    def task_metric(self, outputs: Sequence[Mapping[str, np.ndarray]],
                    samples: Sequence[Sample]) -> dict[str, float]:
        labels = [s.get("labels") for s in samples if isinstance(s, dict)]
        if not outputs or any(label is None for label in labels) or outputs[0][self.primary_output].ndim != 2:
            return {}
        predicted = np.concatenate([o[self.primary_output].argmax(axis=1) for o in outputs])
        return {"top1_accuracy": float(np.mean(predicted == np.asarray(labels).reshape(-1)))}
