"""Calibration and evaluation data: readers, splitting, tokenization.

Everything downstream (calibration, evaluation, benchmarking) reads data as an iterator of feed dicts:
`Feed = dict[str, np.ndarray]`, keyed by ONNX input name, batch dimension first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class TextSample:
    """One text sample; `pair` is a paraphrase of `text` when the data carries one (paraphrase-retrieval metric),
    `label` its class (an index or a class name) when the data is labelled (classification accuracy)."""

    text: str
    pair: str | None = None
    label: str | int | None = None


#: One array sample: input name -> array *without* the batch dimension.
ArraySample = dict[str, np.ndarray]
Sample = TextSample | ArraySample

from edgepack.calibration_data.readers import (  # noqa: E402
    DataSplit,
    iter_samples,
    read_samples,
    read_split,
    sample_path,
    split_samples,
)
from edgepack.calibration_data.tokenize import array_batches, tokenize_batches  # noqa: E402


def resolve_data_path(path: str) -> Path:
    """A user path, or `bundled:<name>` for a sample file shipped with edgepack."""
    if path.startswith("bundled:"):
        return sample_path(path.removeprefix("bundled:"))
    return Path(path)


__all__ = [
    "ArraySample",
    "DataSplit",
    "Feed",
    "Sample",
    "TextSample",
    "array_batches",
    "iter_samples",
    "read_samples",
    "read_split",
    "resolve_data_path",
    "sample_path",
    "split_samples",
    "tokenize_batches",
]
