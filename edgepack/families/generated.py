"""Inputs made up from a model's signature, to measure a model without data (`edgepack validate` without --data).

What ONNX Runtime's `onnxruntime_perf_test` and LiteRT's `benchmark_model` do, dtype-aware, so the graph takes the
path real data takes: token ids uniform within the vocabulary (the family's tokenizer / config, else the rows of
the embedding table the ids index in the graph), attention masks of ones, token-type ids of zeros, position ids
0..T-1, images as uniform pixels through ImageNet normalisation (the range most CNN preprocessing produces), other
floats standard normal. Symbolic dims: `--dim name=N` by name, `--shape input=1x3x224x224` for a whole input; left
unset, a leading dim (batch) is 1 and a sequence-like dim (seq, len, token, time, step) is `--sequence-length`;
any other symbolic dim is an error that names the flag to give.

`ModelFamily.generated_inputs` calls `generate_inputs` with the family's `vocab_size()`; a family with its own
preprocessing overrides it.

>>> parse_dim_overrides("batch=1,sequence=128")
{'batch': 1, 'sequence': 128}
>>> parse_shape_overrides(["pixel_values=1x3x224x224"])
{'pixel_values': (1, 3, 224, 224)}
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgepack.errors import BadInputError, did_you_mean

if TYPE_CHECKING:
    from edgepack.families.base import TensorSpec

_SEQUENCE_DIM = re.compile(r"seq|len|token|time|step", re.IGNORECASE)
_BATCH_DIM = re.compile(r"batch|^n$|^b$", re.IGNORECASE)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSizes:
    """How big the generated inputs are: overrides first, then the defaults for symbolic dims."""

    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # --shape input=1x3x224x224
    dims: Mapping[str, int] = field(default_factory=dict)  # --dim batch=1,sequence=128
    sequence_length: int = 128
    batch: int = 1


@dataclass(frozen=True)
class GeneratedInputs:
    feed: dict[str, np.ndarray]
    #: input name -> how it was made, e.g. "int64 [1, 128]: token ids uniform in [0, 30522)"
    description: dict[str, str]


def _positive(text: str, what: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise BadInputError(f"{what}: '{text}' is not a size; give whole numbers >= 1")
    return int(text)


def parse_shape_overrides(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """['pixel_values=1x3x224x224', ...] -> {name: shape}."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.partition("=")
        if not sep or not name.strip() or not dims:
            raise BadInputError(f"--shape '{item}': write INPUT=DxDx..., e.g. pixel_values=1x3x224x224")
        shapes[name.strip()] = tuple(_positive(d, f"--shape '{item}'") for d in dims.split("x"))
    return shapes


def parse_dim_overrides(text: str | None) -> dict[str, int]:
    """'batch=1,sequence=128' -> {'batch': 1, 'sequence': 128}."""
    dims: dict[str, int] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise BadInputError(f"--dim '{item}': write NAME=N[,NAME=N], e.g. batch=1,sequence=128")
        dims[name.strip()] = _positive(value, f"--dim '{item}'")
    return dims


def resolve_shapes(inputs: Sequence[TensorSpec], sizes: InputSizes) -> dict[str, tuple[int, ...]]:
    """A concrete shape per input; an override naming no input or dim, or one that contradicts a fixed dim,
    and a symbolic dim with no default are BadInputErrors naming the fix."""
    names = [spec.name for spec in inputs]
    for name in sizes.shapes:
        if name not in names:
            raise BadInputError(f"--shape {name}=...: the model has no input '{name}'{did_you_mean(name, names)} "
                                f"(inputs: {', '.join(names)})")
    symbolic = sorted({d for spec in inputs for d in spec.dims if isinstance(d, str) and d != "?"})
    for name in sizes.dims:
        if name not in symbolic:
            raise BadInputError(f"--dim {name}=...: no input has a dim named '{name}'{did_you_mean(name, symbolic)} "
                                f"(symbolic dims: {', '.join(symbolic) or 'none'})")
    return {spec.name: _shape(spec, sizes) for spec in inputs}


def _shape(spec: TensorSpec, sizes: InputSizes) -> tuple[int, ...]:
    given = sizes.shapes.get(spec.name)
    if given is not None:
        if len(given) != len(spec.dims):
            raise BadInputError(f"--shape {spec.name}={'x'.join(map(str, given))}: the input has rank "
                                f"{len(spec.dims)} ({_dims_text(spec.dims)}), not {len(given)}")
        for index, (want, got) in enumerate(zip(spec.dims, given, strict=True)):
            if isinstance(want, int) and want > 0 and want != got:
                raise BadInputError(f"--shape {spec.name}=...: dim {index} is fixed to {want} in the model, not {got}")
        return given
    return tuple(_dim(spec, index, dim, sizes) for index, dim in enumerate(spec.dims))


def _dim(spec: TensorSpec, index: int, dim: int | str, sizes: InputSizes) -> int:
    if isinstance(dim, int) and dim > 0:
        return dim
    name = dim if isinstance(dim, str) and dim != "?" else ""
    if name in sizes.dims:
        return sizes.dims[name]
    if index == 0 or _BATCH_DIM.search(name):
        return sizes.batch
    if name and _SEQUENCE_DIM.search(name):
        return sizes.sequence_length
    flag = f"--dim {name}=N or " if name else ""
    raise BadInputError(f"input '{spec.name}' ({_dims_text(spec.dims)}): dim {index} "
                        f"{repr(name) if name else 'has no size'}; give {flag}--shape {spec.name}=" +
                        "x".join("N" if not (isinstance(d, int) and d > 0) else str(d) for d in spec.dims))


def _dims_text(dims: Sequence[int | str]) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def embedding_rows(model: Path, input_name: str) -> int | None:
    """Rows of the embedding table that `input_name` indexes (a Gather on an initializer, directly or through a
    Cast), read from the graph without its weights; None when there is none."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    tables = {tensor.name: list(tensor.dims) for tensor in graph.initializer}
    sources = {input_name}
    for node in graph.node:  # a Cast (int64 -> int32 in some exporters) keeps the ids' meaning
        if node.op_type == "Cast" and node.input and node.input[0] in sources:
            sources.update(node.output)
    rows = [tables[node.input[0]][0] for node in graph.node
            if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in sources
            and node.input[0] in tables and tables[node.input[0]]]
    return min(rows) if rows else None


def generated_array(spec: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator, *,
                    vocab_size: int | None) -> tuple[np.ndarray, str]:
    """(array, how it was made) for one input, by dtype and by what its name says it is."""
    dtype = np.dtype(spec.dtype)
    name = spec.name.lower()
    if dtype == np.bool_:
        return np.ones(shape, dtype=bool), "all true"
    if np.issubdtype(dtype, np.integer):
        return _integers(name, shape, dtype, rng, vocab_size)
    if np.issubdtype(dtype, np.floating):
        if "mask" in name:
            return np.ones(shape, dtype=dtype), "ones (attend to every position)"
        return _floats(shape, dtype, rng)
    raise BadInputError(f"input '{spec.name}' is of type {spec.dtype}, which edgepack cannot make up; give --data "
                        "with real inputs")


def _integers(name: str, shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator,
              vocab_size: int | None) -> tuple[np.ndarray, str]:
    if "mask" in name:
        return np.ones(shape, dtype=dtype), "ones (attend to every token)"
    if "token_type" in name or "segment" in name:
        return np.zeros(shape, dtype=dtype), "zeros (one segment)"
    if "position" in name and shape:
        return np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy(), f"0..{shape[-1] - 1}"
    if _looks_like_image(shape) and dtype == np.uint8:
        return rng.integers(0, 256, size=shape, dtype=dtype), "pixels uniform in [0, 255]"
    if vocab_size is None:
        return (rng.integers(0, 2, size=shape).astype(dtype),
                "integers in [0, 2): no vocabulary found (no tokenizer, no embedding table); --data gives real ids")
    return rng.integers(0, vocab_size, size=shape).astype(dtype), f"token ids uniform in [0, {vocab_size})"


def _looks_like_image(shape: tuple[int, ...]) -> bool:
    """(N, C, H, W) or (N, H, W, C) with 1 or 3 channels and a picture's height and width."""
    if len(shape) != 4:
        return False
    if shape[1] in (1, 3) and min(shape[2:]) >= 8:
        return True
    return shape[3] in (1, 3) and min(shape[1:3]) >= 8


def _floats(shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    if not _looks_like_image(shape):
        return rng.standard_normal(shape).astype(dtype), "standard normal"
    channels_first = shape[1] in (1, 3) and min(shape[2:]) >= 8
    channels = shape[1] if channels_first else shape[3]
    pixels = rng.random(shape)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))
    view = (1, channels, 1, 1) if channels_first else (1, 1, 1, channels)
    normalized = (pixels - np.reshape(mean, view)) / np.reshape(std, view)
    low, high = min((0 - m) / s for m, s in zip(mean, std, strict=True)), max(
        (1 - m) / s for m, s in zip(mean, std, strict=True))
    return normalized.astype(dtype), (f"pixels uniform in [0, 1], normalised with mean {list(mean)} / std "
                                      f"{list(std)} (range [{low:.2f}, {high:.2f}])")


def generate_inputs(model: Path, *, sizes: InputSizes, vocab_size: int | None, seed: int = 0) -> GeneratedInputs:
    """One feed for `model`'s graph inputs (batch first), with a line per input saying how it was made."""
    from edgepack.families.onnx_model import graph_io

    inputs = graph_io(Path(model)).inputs
    shapes = resolve_shapes(inputs, sizes)
    rng = np.random.default_rng(seed)
    feed, description = {}, {}
    for spec in inputs:
        rows = embedding_rows(Path(model), spec.name) if np.issubdtype(np.dtype(spec.dtype), np.integer) else None
        known = [v for v in (vocab_size, rows) if v]
        array, how = generated_array(spec, shapes[spec.name], rng, vocab_size=min(known) if known else None)
        feed[spec.name] = array
        description[spec.name] = f"{array.dtype} {list(array.shape)}: {how}"
    return GeneratedInputs(feed, description)
