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

from edgepack.calibration_data.images import ImageFolderOptions, ImageSample  # noqa: E402

#: One image file (or a view of it), decoded only when its feed is built (`calibration_data.images`).
Sample = TextSample | ArraySample | ImageSample

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
    """A user path, `bundled:<name>` for a sample file shipped with edgepack, or `package:<pkg>/<sub/path>` for
    data files installed with a Python package (e.g. `package:skimage/data`, found without importing it)."""
    if path.startswith("bundled:"):
        return sample_path(path.removeprefix("bundled:"))
    if path.startswith("package:"):
        return package_data_path(path.removeprefix("package:"))
    return Path(path)


def package_data_path(spec: str) -> Path:
    """`<pkg>/<sub/path>` inside an installed package's folder (importlib's spec; the package is not imported)."""
    import importlib.util

    from edgepack.errors import BadInputError

    package, _, rest = spec.partition("/")
    found = importlib.util.find_spec(package) if package else None
    if found is None or not found.submodule_search_locations:
        raise BadInputError(f"data path package:{spec}: no installed package '{package}'; install it (make install "
                            "does for the bundled recipes) or give a folder path")
    path = Path(next(iter(found.submodule_search_locations))) / rest
    if not path.exists():
        raise BadInputError(f"data path package:{spec}: {path} does not exist in the installed '{package}'")
    return path


__all__ = [
    "ArraySample",
    "DataSplit",
    "Feed",
    "ImageFolderOptions",
    "ImageSample",
    "Sample",
    "TextSample",
    "array_batches",
    "iter_samples",
    "package_data_path",
    "read_samples",
    "read_split",
    "resolve_data_path",
    "sample_path",
    "split_samples",
    "tokenize_batches",
]
