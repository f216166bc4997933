"""INT8 KV cache: GroupQueryAttention stores past / present keys and values as int8 with calibrated scales.

ONNX Runtime's CPU GroupQueryAttention takes a quantized cache (`k_quant_type` / `v_quant_type` PER_CHANNEL,
`kv_cache_bit_width` 8, `k_scale` / `v_scale` inputs, int8 past and present): it quantizes the new keys and values
into the cache and dequantizes them for attention. The scales are ours: per layer and per channel (kv_heads x
head_dim), max |x| / 127 of the FP32 graph's present keys and values over the calibration text (keys after RoPE,
as the cache holds them). A quarter of the float32 cache's bytes per token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgepack.calibration_data import Feed
from edgepack.errors import BadInputError

SCALE_FLOOR = 1e-6


def collect_kv_absmax(model_path: Path, feeds: Callable[[], Iterable[Feed]]) -> dict[str, np.ndarray]:
    """present.<i>.key|value name -> max |x| per channel (kv_heads * head_dim,), over the calibration prefills."""
    from edgepack.runtime.decoding import cpu_session

    session = cpu_session(model_path)
    names = [o.name for o in session.get_outputs() if o.name.startswith("present.")]
    absmax: dict[str, np.ndarray] = {}
    for feed in feeds():
        for name, value in zip(names, session.run(names, feed), strict=True):
            channel = np.abs(value).max(axis=(0, 2)).reshape(-1)  # (B, kv, T, D) -> (kv * D,)
            absmax[name] = np.maximum(absmax.get(name, channel), channel)
    if not absmax:
        raise BadInputError("the INT8 KV cache needs calibration text; the calibration split gave none")
    return absmax


def int8_kv_cache(model: onnx.ModelProto, absmax: dict[str, np.ndarray]) -> dict[str, Any]:
    """Turn every GroupQueryAttention's cache into int8 (in place); returns what was done."""
    layers = 0
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        present_key, present_value = node.output[1], node.output[2]
        scales = []
        for name in (present_key, present_value):
            scale = np.maximum(absmax[name] / 127.0, SCALE_FLOOR).astype(np.float32)
            scales.append(f"{name}.scale")
            model.graph.initializer.append(numpy_helper.from_array(scale, scales[-1]))
        inputs = list(node.input) + [""] * (12 - len(node.input))
        del node.input[:]
        node.input.extend([*inputs[:12], *scales])
        node.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("kv_cache_bit_width", 8)])
        layers += 1
    if not layers:
        raise BadInputError("kv_cache int8 needs GroupQueryAttention nodes (a decoder exported by edgepack)")
    for value in [*model.graph.input, *model.graph.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.elem_type = TensorProto.INT8

    return {"kv_cache": "int8", "layers": layers, "scales": "per channel (kv_heads x head_dim), max |x| / 127 of the "
            "FP32 present keys (after RoPE) and values on the calibration text"}
