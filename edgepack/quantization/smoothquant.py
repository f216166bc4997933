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
from dataclasses import dataclass
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


@dataclass
class ChannelStats:
    """Streaming statistics of one activation (B, T, C) over calibration data, O(C + max_rows * C) memory."""

    absmax: np.ndarray   # (C,) max |x| per channel
    low: np.ndarray      # (C,) min x per channel
    high: np.ndarray     # (C,) max x per channel
    rows: np.ndarray     # (R, C) uniform sample without replacement of the token rows seen, R <= max_rows
    seen: int = 0        # token rows folded so far

    def fold(self, values: np.ndarray, rng: np.random.Generator, max_rows: int) -> None:
        """Add one activation batch (..., C); `max_rows` 0 keeps the statistics only (no row sample, no draws)."""
        flat = values.reshape(-1, values.shape[-1]).astype(np.float32, copy=False)  # (B*T, C)
        np.maximum(self.absmax, np.abs(flat).max(axis=0), out=self.absmax)
        np.minimum(self.low, flat.min(axis=0), out=self.low)
        np.maximum(self.high, flat.max(axis=0), out=self.high)
        if max_rows:
            self._sample_rows(flat, rng, max_rows)
        self.seen += flat.shape[0]

    def _sample_rows(self, flat: np.ndarray, rng: np.random.Generator, max_rows: int) -> None:
        """Reservoir sampling (Vitter's algorithm R) of the rows of `flat` (M, C) into `rows`."""
        free = max(0, min(max_rows - self.rows.shape[0], flat.shape[0]))
        if free:
            self.rows = np.concatenate([self.rows, flat[:free]])
        index = self.seen + np.arange(free, flat.shape[0]) + 1  # (M,) 1-based position of each remaining row
        slots = (rng.random(index.size) * index).astype(np.int64)  # row i replaces slot j < R with chance R / i
        for row, slot in zip(free + np.flatnonzero(slots < max_rows), slots[slots < max_rows], strict=True):
            self.rows[slot] = flat[row]

    @classmethod
    def empty(cls, channels: int) -> ChannelStats:
        return cls(np.zeros(channels, np.float32), np.full(channels, np.inf, np.float32),
                   np.full(channels, -np.inf, np.float32), np.zeros((0, channels), np.float32))


def collect_channel_stats(model_path: Path, feeds: Iterable[Feed], *, tensors: Sequence[str],
                          total: int | None = None, max_rows: int = 512, seed: int = 0) -> dict[str, ChannelStats]:
    """Per-channel max|x|, min, max and a seeded uniform sample of `max_rows` token rows of each of `tensors`.

    ONNX Runtime runs a copy of the model with `tensors` added as graph outputs (name-only ValueInfo); memory is
    O(channels * max_rows) per tensor, not O(samples). The rows feed the per-layer alpha search (`search_alphas`).
    """
    import tempfile

    import onnxruntime as ort

    from edgepack.quantization.calibrators import save_augmented

    if not tensors:
        return {}
    stats: dict[str, ChannelStats] = {}
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="edgepack-smoothquant-") as folder:
        path = save_augmented(onnx.load(str(model_path)), tensors, Path(folder))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for feed in get_reporter().track(feeds, total=total, title="SmoothQuant channel statistics"):
            for name, values in zip(tensors, session.run(list(tensors), feed), strict=True):
                if name not in stats:
                    stats[name] = ChannelStats.empty(values.shape[-1])
                stats[name].fold(values, rng, max_rows)
    return stats


def collect_channel_absmax(model_path: Path, feeds: Iterable[Feed], *, tensors: Sequence[str],
                           total: int | None = None) -> dict[str, np.ndarray]:
    """max|x| per channel (last axis) of each of `tensors`, over all `feeds`; memory O(channels), not O(samples)."""
    stats = collect_channel_stats(model_path, feeds, tensors=tensors, total=total, max_rows=0)
    return {name: s.absmax for name, s in stats.items()}


# ------------------------------------------------------------------------------------------ per-layer alpha search

#: Candidates of the per-layer search: no smoothing (None), then alpha 0.0, 0.05, ..., 1.0.
ALPHA_GRID: tuple[float | None, ...] = (None, *(round(0.05 * i, 2) for i in range(21)))


@dataclass(frozen=True)
class AlphaChoice:
    tensor: str
    role: str
    alpha: float | None            # None: no smoothing won (the branch keeps an Identity, no Mul)
    error: float                   # relative INT8 output error of the chosen candidate (worst of the kernels)
    error_unsmoothed: float        # the same without smoothing
    errors: dict[str, tuple[float, float]]  # candidate ("none" or alpha) -> (exact, AVX2 u8s8) relative error


def int8_output_error(rows: np.ndarray, low: np.ndarray, high: np.ndarray, weight: np.ndarray,
                      scale: np.ndarray | None, *, reference: np.ndarray | None = None) -> tuple[float, float]:
    """Relative error ||X W - Y_int8||^2 / ||X W||^2 of X W in INT8 on sampled rows X (R, C), for W (C, N), with
    activations X/s and weights s W: (exact integer dot products, AVX2 u8s8 kernel).

    Activations: uint8 asymmetric, one range per tensor, from the exact per-channel min / max of X over all of
    the calibration data (X/s ranges over [min_c low_c/s_c, max_c high_c/s_c]); weights: int8 symmetric per
    output channel (absmax / 127.5): the schemes onnxruntime's quantizer writes with this recipe.

    The second figure models x86 CPUs without VNNI (AVX2, AVX-512F): onnxruntime's MLAS multiplies u8 x s8 with
    VPMADDUBSW, which adds each pair of neighbouring products along C into a saturating int16 (onnxruntime
    documents this as the reason for its `reduce_range` option). Smoothing moves outliers into the weights, so
    heavy smoothing (large alpha) makes pairs such as 255 * 127 + 255 * 127 saturate: on MiniLM's q/k/v inputs
    the exact error keeps falling up to alpha 0.9 while the AVX2 error is lowest near 0.3, which is what the
    end-to-end cosine on this kind of CPU shows. Only pairs of same-sign weights whose largest sampled inputs
    reach 32767 can saturate, so the excess is computed for those pairs alone.
    """
    s = np.ones(weight.shape[0], np.float32) if scale is None else scale.astype(np.float32)  # (C,)
    lo = min(0.0, float((low / s).min()))
    hi = max(0.0, float((high / s).max()))
    step = (hi - lo) / 255.0 or 1.0
    zero = float(np.round(-lo / step))  # Python floats keep the arrays float32 (NumPy 2 promotion rules)
    xq = np.clip(np.round(rows / s / step) + zero, 0, 255)                   # (R, C) raw uint8 values
    w = weight * s[:, None]                                                  # (C, N)
    wstep = np.abs(w).max(axis=0) / 127.5                                    # (N,)
    wstep[wstep == 0] = 1.0
    wq = np.clip(np.round(w / wstep), -128, 127)                             # (C, N) int8 values
    reference = rows @ weight if reference is None else reference            # (R, N) float X W
    norm = max(float(np.sum(reference**2)), 1e-30)
    exact = ((xq - zero) @ wq) * step * wstep                                # (R, N)
    error = float(np.sum((exact - reference) ** 2)) / norm
    pairs = weight.shape[0] // 2
    wa, wb = wq[0 : 2 * pairs : 2], wq[1 : 2 * pairs : 2]                    # (C/2, N) each
    top = xq.max(axis=0)                                                     # (C,) largest uint8 per channel
    ta, tb = top[0 : 2 * pairs : 2, None], top[1 : 2 * pairs : 2, None]      # (C/2, 1) each
    can_saturate = ((ta * np.maximum(wa, 0) + tb * np.maximum(wb, 0) > 32767)     # inputs are >= 0, so a pair
                    | (ta * np.minimum(wa, 0) + tb * np.minimum(wb, 0) < -32768))  # overflows only these ways
    j, n = np.nonzero(can_saturate)                                          # (P,) candidate pairs
    if j.size == 0:
        return error, error
    products = xq[:, 2 * j] * wa[j, n] + xq[:, 2 * j + 1] * wb[j, n]         # (R, P)
    excess = products - np.clip(products, -32768, 32767)                     # (R, P), 0 where no saturation
    lost = np.zeros_like(exact)                                              # (R, N)
    order = np.argsort(n, kind="stable")                                     # group the pairs by column
    columns, starts = np.unique(n[order], return_index=True)
    lost[:, columns] = np.add.reduceat(excess[:, order], starts, axis=1)
    saturated = exact - lost * step * wstep
    return error, float(np.sum((saturated - reference) ** 2)) / norm


def search_alphas(model: onnx.ModelProto, stats: Mapping[str, ChannelStats], *, points: Sequence[BranchPoint],
                  grid: Sequence[float | None] = ALPHA_GRID) -> list[AlphaChoice]:
    """For each point with an alpha, the candidate in `grid` with the smallest INT8 output error of its MatMuls.

    SmoothQuant's paper tunes one alpha per model by hand; the best alpha differs per layer (on MiniLM from 0.3 at
    the q/k/v inputs to 0.85 after GELU), so, as Intel Neural Compressor's auto-alpha does, we choose it per layer
    on calibration data: the error of X W in simulated INT8 (`int8_output_error`) over sampled rows of X, with
    the q/k/v (or other sibling) weights concatenated. The score is the worse of the exact and the AVX2 u8s8 (int16
    saturating) kernels, so one model suits ARM / VNNI CPUs and NPUs as well as older x86 (the exact error alone
    picks alpha 0.8-0.95 for q/k/v, which saturates on AVX2: end-to-end cosine 0.9966 vs 0.9972). Points without an
    alpha are not searched.
    """
    initializers = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    choices = []
    for point in points:
        if point.alpha is None:
            continue
        if point.tensor not in stats:
            raise BadInputError(f"SmoothQuant: no channel statistics for tensor '{point.tensor}'; "
                                "collect them with collect_channel_stats over the calibration data first")
        st = stats[point.tensor]
        weight = np.concatenate([numpy_helper.to_array(initializers[nodes[m].input[1]]) for m in point.matmuls],
                                axis=1).astype(np.float32)  # (C, sum N_i)
        weight_absmax = np.abs(weight).max(axis=1)  # (C,)
        reference = st.rows @ weight                # (R, N)
        errors: dict[str, tuple[float, float]] = {}
        for alpha in grid:
            scale = None if alpha is None else smoothing_scales(st.absmax, weight_absmax, alpha=alpha)
            errors["none" if alpha is None else str(alpha)] = int8_output_error(
                st.rows, st.low, st.high, weight, scale, reference=reference)
        best = min(errors, key=lambda k: max(errors[k]))
        choices.append(AlphaChoice(point.tensor, point.role, None if best == "none" else float(best),
                                   max(errors[best]), max(errors["none"]), errors))
    return choices
