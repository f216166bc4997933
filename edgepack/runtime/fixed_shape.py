"""Model rewrites an EP needs before it runs: fixed shapes (NPUs), and the padded feeds that go with them;
also fp16 (GPUs) and the ORT format (mobile).

NPU compilers need every tensor shape known ahead of time, so a model exported with dynamic axes
(batch, sequence) is pinned to the validation shape (batch 1, sequence = validation sequence length).
onnxruntime.tools.onnx_model_utils does the rewriting (`make_input_shape_fixed` replaces a dim_param everywhere
it appears, `fix_output_shapes` re-infers the outputs); we add the choice of shapes, the checks with messages
that name the input, and the padding of evaluation feeds to the fixed shape. The fp16 and ORT-format
conversions are ONNX Runtime's own (`onnxruntime.transformers.float16`, `onnxruntime.tools`' converter).

Parent side only: the probe child never imports this module (onnx would inflate the memory it measures).

>>> padded, length = pad_feed({"input_ids": np.array([[101, 7, 102]])}, {"input_ids": [1, 5]}, index=0)
>>> padded["input_ids"].tolist(), length
([[101, 7, 102, 0, 0]], 3)
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

from edgepack.errors import BadInputError
from edgepack.onnx_files import save_onnx

if TYPE_CHECKING:
    from edgepack.calibration_data import Feed



def feed_shapes(feed: Feed) -> dict[str, list[int]]:
    """The shape every input is fixed to: the latency feed's (batch 1, the validation sequence length)."""
    return {name: [int(d) for d in np.shape(value)] for name, value in feed.items()}


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]


def feed_mismatch(model_path: Path, feed: Feed) -> str | None:
    """Why `feed` cannot run the model (input names, ranks, fixed dims, dtypes), or None when it fits."""
    model = onnx.load(str(model_path), load_external_data=False)
    inputs = _graph_inputs(model)
    given = ", ".join(f"{name} {np.asarray(v).dtype} {list(np.shape(v))}" for name, v in feed.items())
    for value in inputs:
        dims = _dims(value)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        if value.name not in feed:
            return (f"input '{value.name}' ({dtype} {dims}) has no array in the data (it has: {given}); "
                    "name the data's arrays after the model inputs")
        array = np.asarray(feed[value.name])
        fits = array.ndim == len(dims) and all(not isinstance(want, int) or want == have
                                               for want, have in zip(dims, array.shape, strict=True))
        if not fits or array.dtype != dtype:
            return (f"input '{value.name}' expects {dtype} {dims}, the data gives {array.dtype} "
                    f"{list(array.shape)}; feed data of the model's shape and type")
    extra = sorted(set(feed) - {value.name for value in inputs})
    if extra:
        return f"the data has array(s) {', '.join(extra)} that the model has no input for (model inputs: " \
               f"{', '.join(value.name for value in inputs)})"
    return None


def make_shapes_fixed(model_path: Path, out_path: Path, *, shapes: Mapping[str, Sequence[int]]) -> Path:
    """Write a copy of the model whose inputs (and, where inferable, outputs) have the given static shapes."""
    model = onnx.load(str(model_path))
    for value in _graph_inputs(model):
        if value.name not in shapes:
            raise BadInputError(f"{model_path.name}: input '{value.name}' {_dims(value)} has no array in the data "
                                f"(it has {', '.join(shapes)}); name the data's arrays after the model inputs")
        try:
            make_input_shape_fixed(model.graph, value.name, list(shapes[value.name]))
        except ValueError as error:  # rank mismatch, or a fixed dim that differs
            raise BadInputError(f"{model_path.name}: input '{value.name}' {_dims(value)} cannot take shape "
                                f"{list(shapes[value.name])} ({error}); feed data of the model's shape") from None
    fix_output_shapes(model)
    return save_onnx(model, out_path)


def pad_feed(feed: Feed, shapes: Mapping[str, Sequence[int]], *, index: int) -> tuple[Feed, int | None]:
    """Zero-pad every input at the end of each axis up to the fixed shape; returns (feed, original axis-1 length).

    Zeros are the right padding for a BERT-style text model: input_ids 0 is the tokenizer's [PAD] id,
    attention_mask 0 makes attention add a large negative bias to the padded keys, and mean pooling weights
    tokens by the mask, so the real tokens' states and the sentence embedding (B, C) equal the unpadded run's
    up to rounding; token_type_ids 0 is segment A. Fidelity against the unpadded FP32 reference stays fair.
    """
    padded: Feed = {}
    length: int | None = None
    for name, value in feed.items():
        array = np.asarray(value)
        target = list(shapes.get(name, array.shape))
        if array.ndim != len(target) or any(have > want for have, want in zip(array.shape, target, strict=True)):
            raise BadInputError(f"evaluation feed {index}: input '{name}' has shape {list(array.shape)}, larger than "
                                f"the fixed shape {target}; set the validation sequence length to at least the "
                                "longest evaluation sample (data.max_length)")
        if array.ndim >= 2 and length is None:
            length = int(array.shape[1])  # (B, T): the sequence length before padding
        padded[name] = np.pad(array, [(0, want - have) for have, want in zip(array.shape, target, strict=True)])
    return padded, length


def sequence_outputs(model_path: Path) -> set[str]:
    """Outputs whose axis 1 is the same symbolic dim as an input's axis 1 (e.g. last_hidden_state (B, T, C))."""
    model = onnx.load(str(model_path), load_external_data=False)
    input_axes = {dims[1] for dims in map(_dims, _graph_inputs(model)) if len(dims) >= 2 and isinstance(dims[1], str)}
    return {out.name for out in model.graph.output
            if len(dims := _dims(out)) >= 2 and isinstance(dims[1], str) and dims[1] in input_axes - {"?"}}


def trim_outputs(outputs: Mapping[str, np.ndarray], *, names: set[str], length: int | None) -> dict[str, np.ndarray]:
    """Cut the sequence axis of `names` back to the sample's own length: (1, T_pad, C) -> (1, T, C).

    `names` comes from `sequence_outputs` on the dynamic model, so a pooled output (1, C) is never cut even
    when C happens to equal the padded length.
    """
    if length is None:
        return dict(outputs)
    return {name: value[:, :length] if name in names else value for name, value in outputs.items()}


def convert_fp16(model_path: Path, out_path: Path) -> Path:
    """float16 weights and activations for GPU EPs, float32 inputs and outputs kept (keep_io_types=True).

    Quantize/DequantizeLinear stay float32: before opset 19 their scales must be float32.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(model_path)), keep_io_types=True,
                                     op_block_list=[*DEFAULT_OP_BLOCK_LIST, "QuantizeLinear", "DequantizeLinear"])
    return save_onnx(model, out_path)


def convert_ort_format(model_path: Path, out_dir: Path) -> Path:
    """The ORT-format (.ort, flatbuffer) model ORT Mobile loads, optimized ahead of time ("Fixed" style).

    onnxruntime.tools' converter prints and logs its progress; we keep that off the console (library code
    never prints).
    """
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    previous = logging.root.manager.disable
    logging.disable(logging.INFO)  # its INFO logger ("Created config in ...") has a DEBUG level of its own
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            convert_onnx_models_to_ort(model_path, output_dir=out_dir, optimization_styles=[OptimizationStyle.Fixed])
    finally:
        logging.disable(previous)
    converted = out_dir / model_path.with_suffix(".ort").name
    if not converted.is_file():
        raise FileNotFoundError(f"the ORT-format converter wrote no {converted.name} into {out_dir}")
    return converted


def initializer_bytes(model_path: Path) -> int:
    """Bytes of the graph's weights (initializers), from their dims and types; external data is not read."""
    model = onnx.load(str(model_path), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        total += itemsize * int(np.prod(init.dims, dtype=np.int64))
    return total
