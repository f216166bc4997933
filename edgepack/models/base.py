"""Model adapters: what edgepack needs to know about a model family, as one small class per family.

An adapter knows the model's inputs and outputs (names, dynamic axes), how raw samples become feed dicts,
which output fidelity is measured on, and the task metric. Adapters are registered by name:

>>> from edgepack.models import get_adapter
>>> adapter = get_adapter("hf-encoder", "path/to/local/hf/folder")   # doctest: +SKIP
>>> feeds = adapter.feeds(["a sentence"], max_length=128)            # doctest: +SKIP
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from edgepack.calibration_data import Feed, Sample
from edgepack.registry import Registry


class ModelAdapter(ABC):
    """Base class. Subclasses set the class attributes and implement the abstract methods."""

    kind: str = ""
    #: Output on which fidelity (cosine vs the FP32 reference) is measured.
    primary_output: str = ""

    def __init__(self, source: str) -> None:
        self.source = source

    @property
    @abstractmethod
    def input_names(self) -> list[str]: ...

    @property
    @abstractmethod
    def output_names(self) -> list[str]: ...

    @property
    @abstractmethod
    def dynamic_axes(self) -> dict[str, dict[int, str]]: ...

    @abstractmethod
    def load_torch(self) -> torch.nn.Module:
        """An eval-mode module whose forward takes the inputs in `input_names` order and returns `output_names`."""

    @abstractmethod
    def feeds(self, samples: Sequence[Sample], *, batch_size: int = 1, max_length: int = 128,
              padding: str = "longest") -> Iterator[Feed]:
        """Feed dicts (input name -> numpy array) for ONNX Runtime and for the torch module alike."""

    def evaluation_feeds(self, samples: Sequence[Sample], *, max_length: int) -> list[Feed]:
        """Feeds whose outputs `task_metric` consumes, in order. Default: one feed per sample."""
        return list(self.feeds(samples, batch_size=1, max_length=max_length))

    def latency_feed(self, samples: Sequence[Sample], *, sequence_length: int) -> Feed:
        """One batch-1 feed at a stated size, for latency measurement."""
        return next(self.feeds(samples[:1], batch_size=1, max_length=sequence_length))

    def task_metric(self, outputs: Sequence[Mapping[str, np.ndarray]],
                    samples: Sequence[Sample]) -> dict[str, float]:
        """Task metric(s) computed from `evaluation_feeds` outputs; {} when the data carries no task labels."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {"adapter": self.kind, "source": str(self.source)}


ADAPTERS: Registry[type[ModelAdapter]] = Registry("model adapter")
