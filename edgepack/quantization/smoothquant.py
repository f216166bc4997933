"""SmoothQuant on an ONNX graph: move activation outlier scale into the weights of the MatMuls that read it.

Xiao et al. 2023 (SmoothQuant): for X (T, C) @ W (C, N), X W = (X diag(1/s)) (diag(s) W) exactly, and with
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) the outlier channels of X shrink while W absorbs them, so both
quantize well. We write our own rewrite because onnxruntime's `SmoothQuant` extra option goes through Intel Neural
Compressor (not installed here) and folds the 1/s into the previous op, which is wrong for BERT: it is post-LayerNorm
(the LayerNorm output is also the residual stream, so its gamma cannot absorb 1/s) and GELU does not commute with
scaling. So 1/s is an explicit `Mul` on the MatMul branch only (a (C,) vector broadcast over (B, T, C); ~4% of
MiniLM's INT8 run time at seq 128), and the residual keeps reading the unscaled float tensor.

The rewrite is exact in FP32 (tests: max |diff| < 1e-5). Run it before calibrating: the quantizer then sees the Mul
output as the MatMul input and calibrates its (smaller) range. Branch points without an alpha get an `Identity`
instead, only to give the MatMuls their own copy of a shared tensor (onnxruntime drops the Identity at load).

>>> import numpy as np
>>> [round(float(s), 3) for s in smoothing_scales(np.array([8.0, 1.0]), np.array([0.5, 0.5]), alpha=0.5)]
[4.0, 1.414]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgepack.errors import BadInputError
from edgepack.quantization.recipes import BranchPoint
from edgepack.reporter import get_reporter

if TYPE_CHECKING:
    from edgepack.calibration_data import Feed

_EPS = 1e-5  # floor for max|X_j| and max|W_j|: a dead channel must not give s = 0 or inf


def smoothing_scales(act_absmax: np.ndarray, weight_absmax: np.ndarray, *, alpha: float) -> np.ndarray:
    """s (C,) = max|X_j|^alpha / max|W_j|^(1-alpha), both floored at 1e-5 (SmoothQuant eq. 4)."""
    if not 0.0 <= alpha <= 1.0:
        raise BadInputError(f"SmoothQuant alpha {alpha} is outside [0, 1]; use e.g. 0.5 (default) to 0.85")
    act = np.maximum(np.asarray(act_absmax, np.float64), _EPS)
    weight = np.maximum(np.asarray(weight_absmax, np.float64), _EPS)
    return (act**alpha / weight ** (1.0 - alpha)).astype(np.float32)


def apply_smoothquant(model: onnx.ModelProto, tensor_absmax: Mapping[str, np.ndarray], *,
                      points: Sequence[BranchPoint]) -> onnx.ModelProto:
    """A copy of `model` where each point's MatMuls read `Mul(tensor, 1/s)` with weights diag(s) @ W.

    `tensor_absmax[point.tensor]` is max|X| per channel (C,) over calibration data (`collect_channel_absmax`);
    points with `alpha=None` need none and get an Identity branch. A weight also read by a node outside the point
    (tied weights) is copied before scaling. The input model is not modified.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    initializers = {t.name: t for t in graph.initializer}
    readers = _weight_readers(graph)
    nodes = {n.name: n for n in graph.node}
    inserted: dict[str, onnx.NodeProto] = {}   # tensor -> branch node, placed after the tensor's producer
    for point in points:
        matmuls = [nodes[name] for name in point.matmuls]
        branch = f"{point.tensor}/quant_branch"
        if point.alpha is None:
            inserted[point.tensor] = helper.make_node("Identity", [point.tensor], [branch], name=branch)
        else:
            scale = _smooth_weights(graph, initializers, readers, matmuls, point, tensor_absmax)
            inv = numpy_helper.from_array((1.0 / scale).astype(np.float32), f"{branch}/inv_scale")  # (C,)
            graph.initializer.append(inv)
            inserted[point.tensor] = helper.make_node("Mul", [point.tensor, inv.name], [branch], name=branch)
        for node in matmuls:
            node.input[0] = branch
    _insert_after_producers(graph, inserted)
    return out


def _smooth_weights(graph: onnx.GraphProto, initializers: dict[str, onnx.TensorProto],
                    readers: dict[str, set[str]], matmuls: Sequence[onnx.NodeProto], point: BranchPoint,
                    tensor_absmax: Mapping[str, np.ndarray]) -> np.ndarray:
    """Scale each MatMul's B (C, N) rows by s; return s (C,)."""
    if point.tensor not in tensor_absmax:
        raise BadInputError(f"SmoothQuant: no per-channel max|x| for tensor '{point.tensor}'; "
                            "collect it with collect_channel_absmax over the calibration data first")
    weights = [numpy_helper.to_array(initializers[n.input[1]]) for n in matmuls]   # each (C, N_i)
    act = np.asarray(tensor_absmax[point.tensor], np.float32).reshape(-1)        # (C,)
    if any(w.ndim != 2 or w.shape[0] != act.shape[0] for w in weights):
        shapes = [w.shape for w in weights]
        raise BadInputError(f"SmoothQuant: tensor '{point.tensor}' has {act.shape[0]} channels but its MatMul "
                            f"weights have shapes {shapes}; re-collect max|x| on this model")
    weight_absmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)    # (C,)
    scale = smoothing_scales(act, weight_absmax, alpha=float(point.alpha or 0.0))
    group = {n.name for n in matmuls}
    for node, weight in zip(matmuls, weights, strict=True):
        name = node.input[1]
        scaled = numpy_helper.from_array((weight * scale[:, None]).astype(weight.dtype), name)
        if readers[name] - group:  # tied weight: another node still needs the original
            scaled.name = f"{name}/smoothed/{node.name}"
            graph.initializer.append(scaled)
            node.input[1] = scaled.name
        else:
            initializers[name].CopyFrom(scaled)
    return scale


def _weight_readers(graph: onnx.GraphProto) -> dict[str, set[str]]:
    readers: dict[str, set[str]] = {t.name: set() for t in graph.initializer}
    for node in graph.node:
        for name in node.input:
            if name in readers:
                readers[name].add(node.name)
    return readers


def _insert_after_producers(graph: onnx.GraphProto, inserted: dict[str, onnx.NodeProto]) -> None:
    """Keep the node list topologically sorted: each new node right after the node producing its input."""
    pending = dict(inserted)
    graph_inputs = {i.name for i in graph.input}
    ordered = [pending.pop(t) for t in list(pending) if t in graph_inputs]
    for node in graph.node:
        ordered.append(node)
        ordered.extend(pending.pop(t) for t in node.output if t in pending)
    if pending:  # produced by nothing: an initializer; the branch can go first
        ordered[:0] = pending.values()
    del graph.node[:]
    graph.node.extend(ordered)


def collect_channel_absmax(model_path: Path, feeds: Iterable[Feed], *, tensors: Sequence[str],
                           total: int | None = None) -> dict[str, np.ndarray]:
    """max|x| per channel (last axis) of each of `tensors`, over all `feeds`; memory O(channels), not O(samples).

    ONNX Runtime runs a copy of the model with `tensors` added as graph outputs (name-only ValueInfo).
    """
    import tempfile

    import onnxruntime as ort

    if not tensors:
        return {}
    model = onnx.load(str(model_path))
    existing = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in existing)
    absmax: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="edgepack-smoothquant-") as folder:
        path = Path(folder) / "augmented.onnx"
        large = sum(t.ByteSize() for t in model.graph.initializer) >= 2**31 - 2**24  # protobuf's 2 GiB limit
        onnx.save_model(model, str(path), save_as_external_data=large)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for feed in get_reporter().track(feeds, total=total, title="SmoothQuant channel ranges"):
            for name, values in zip(tensors, session.run(list(tensors), feed), strict=True):
                channel = np.abs(values.reshape(-1, values.shape[-1])).max(axis=0)  # (C,) over (B*T, C)
                absmax[name] = np.maximum(absmax[name], channel) if name in absmax else channel
    return absmax
