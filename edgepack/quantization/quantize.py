"""Static post-training INT8 (QDQ) driver.

onnxruntime.quantization does the quantizing (its `QDQQuantizer` inserts QuantizeLinear/DequantizeLinear and
per-channel weight scales). We supply what it gets wrong on transformers out of the box:
- the tensor ranges, from our streaming calibrators (`calibrators.py`: O(1) memory in the sample count,
  where ORT's histogram calibrators keep every activation and crash on MiniLM), per tensor by method;
- the node choice and the graph rewrite that tames activation outliers (SmoothQuant Muls, float residual
  branches), from the per-architecture recipe (`recipes.py`, `smoothquant.py`);
- a per-layer accuracy budget with float fallback of the most sensitive layers (`sensitivity.py`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgepack.artifacts import content_hash, write_json
from edgepack.calibration_data import Feed
from edgepack.errors import BadInputError, did_you_mean
from edgepack.onnx_files import model_digest, needs_external_data, save_onnx, without_weights
from edgepack.quantization.calibrators import (
    CALIBRATORS,
    RangeCalibrator,
    calibrator_options,
    collect_tensor_ranges,
    make_calibrator,
)
from edgepack.quantization.cnn import CnnOptions
from edgepack.quantization.fused import graph_note
from edgepack.quantization.recipes import BranchPoint, QuantPlan, detect_family, plan_quantization
from edgepack.quantization.sensitivity import QuantBudget, fit_budget, raise_unmet
from edgepack.quantization.smoothquant import (
    apply_smoothquant,
    collect_channel_absmax,
    collect_channel_stats,
    search_alphas,
)
from edgepack.reporter import get_reporter

SMOOTHQUANT_MODES = ("search", "recipe", "off")
#: INT8 graph forms: `qdq` (QuantizeLinear / DequantizeLinear pairs: every EP, NPUs included) or `fused`
#: (onnxruntime.transformers fusions lowered to ORT's integer CPU kernels, `quantization.fused`: CPU EP only)
GRAPHS = ("qdq", "fused")
_CACHE_VERSION = 2  # bump when the cached payload or what it means changes
#: Fewest calibration samples per range method. A moving average of one batch is plain MinMax; a histogram method
#: chooses a tail threshold, which a handful of sentences / images decides by accident (ORT and NNCF default to
#: hundreds of samples; 16 is a floor, not a recommendation).
MIN_SAMPLES = {"minmax": 1, "moving-average-minmax": 2, "percentile": 16, "entropy": 16, "mse": 16}


@dataclass(frozen=True)
class QuantizeOptions:
    calibrator: str = "minmax"  # default range method; the recipe may pick another per tensor
    family: str = "auto"
    per_channel: bool = True
    activation_type: str = "uint8"
    weight_type: str = "int8"
    exclude_nodes: tuple[str, ...] = ()
    #: SmoothQuant alphas: "search" (per layer, on calibration data), "recipe" (the family's per-role values)
    #: or "off" (no smoothing; shared activations still get their own float branch)
    smoothquant: str = "search"
    graph: str = "qdq"  # GRAPHS
    #: graph normalisation before quantizing (`exporters.normalize`); off only to study its effect
    normalize: bool = True
    #: CNN techniques for the cnn recipe (`quantization.cnn`: equalization, learned rounding, bias correction)
    cnn: CnnOptions = field(default_factory=CnnOptions)
    #: activation tensors quantized to 16 bits (uint16 QDQ, same calibrated range, 256x finer step; ORT's
    #: com.microsoft Q/DQ below opset 21): the few tensors whose 8-bit step dominates the error
    wide_activations: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        CALIBRATORS.get(self.calibrator)  # unknown name -> BadInputError listing the known ones
        for key, noun, value, known in (("smoothquant", "mode", self.smoothquant, SMOOTHQUANT_MODES),
                                        ("graph", "graph", self.graph, GRAPHS)):
            if value not in known:
                raise BadInputError(f"quantize.{key}: unknown {noun} '{value}'{did_you_mean(value, known)}; "
                                    f"use one of {', '.join(known)}")
        if self.graph == "fused" and self.activation_type != "uint8":
            raise BadInputError("quantize.graph fused: activation_type must be uint8 (ONNX Runtime's QAttention "
                                "takes uint8 inputs); use activation_type uint8 or graph qdq")
        if self.graph == "fused" and self.wide_activations:
            raise BadInputError("quantize.wide_activations needs graph qdq (the fused integer ops are 8-bit); "
                                "use graph qdq or drop wide_activations")


class PerTensorCalibrator(RangeCalibrator):
    """Routes each tensor to the calibrator its recipe asks for; one pass over the data serves them all."""

    name = "per-tensor"

    def __init__(self, default: str, methods: dict[str, str]) -> None:
        self._by_method = {m: make_calibrator(m) for m in {default, *methods.values()}}
        self._default = default
        self._methods = methods

    def _update(self, tensor: str, data: np.ndarray, low: float, high: float) -> None:  # checked by `update`
        self._by_method[self._methods.get(tensor, self._default)]._update(tensor, data, low, high)

    def ranges(self) -> dict[str, tuple[float, float]]:
        out: dict[str, tuple[float, float]] = {}
        for calibrator in self._by_method.values():
            out.update(calibrator.ranges())
        return out

    def state_bytes(self) -> int:
        return sum(c.state_bytes() for c in self._by_method.values())


def tensors_to_calibrate(model: onnx.ModelProto, plan: QuantPlan) -> list[str]:
    """Float activations entering or leaving the nodes the plan quantizes (what ORT's quantizer asks ranges for)."""
    inferred = onnx.shape_inference.infer_shapes(without_weights(model))  # > 2 GB: protobuf cannot serialize it
    float_tensors = {vi.name for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
                     if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    initializers = {init.name for init in model.graph.initializer}
    selected = set(plan.nodes_to_quantize) if plan.nodes_to_quantize is not None else None
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type not in plan.op_types_to_quantize or node.name in plan.nodes_to_exclude:
            continue
        if selected is not None and node.name not in selected:
            continue
        for tensor in [*node.input, *node.output]:
            if tensor and tensor in float_tensors and tensor not in initializers and tensor not in names:
                names.append(tensor)
    return names


def _quant_type(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[name]


@dataclass
class Smoothing:
    """The plan's branch points with their final alphas, and max|x| per channel of the smoothed tensors."""

    points: list[BranchPoint]
    absmax: dict[str, np.ndarray]
    choices: list[dict[str, Any]]  # per searched layer: tensor, role, alpha, error, error_unsmoothed


def smoothing_statistics(model_path: Path, model: onnx.ModelProto, plan: QuantPlan, *,
                         calibration_feeds: Callable[[], Iterable[Feed]], n_calibration: int,
                         smoothquant: str = "search") -> Smoothing:
    """One pass over the calibration data for SmoothQuant: "recipe" keeps the plan's per-role alphas, "search"
    picks one per layer (`smoothquant.search_alphas`), "off" smooths nothing."""
    points = list(plan.branch_points)
    if smoothquant == "off":
        points = [replace(p, alpha=None) for p in points]
    smoothed = [p.tensor for p in points if p.alpha is not None]
    if not smoothed:
        return Smoothing(points, {}, [])
    if smoothquant != "search":
        absmax = collect_channel_absmax(model_path, calibration_feeds(), tensors=smoothed, total=n_calibration)
        return Smoothing(points, absmax, [])
    stats = collect_channel_stats(model_path, calibration_feeds(), tensors=smoothed, total=n_calibration)
    choices = search_alphas(model, stats, points=points)
    chosen = {c.tensor: c.alpha for c in choices}
    points = [replace(p, alpha=chosen[p.tensor]) if p.tensor in chosen else p for p in points]
    return Smoothing(points, {name: st.absmax for name, st in stats.items()}, [
        {"tensor": c.tensor, "role": c.role, "alpha": c.alpha, "error": c.error, "error_unsmoothed": c.error_unsmoothed}
        for c in choices])


def write_prepared(model_path: Path, model: onnx.ModelProto, smoothing: Smoothing,
                   workdir: Path) -> tuple[Path, onnx.ModelProto]:
    """The model to calibrate and quantize: the plan's graph rewrite (SmoothQuant Muls / float-branch Identities)."""
    if not smoothing.points:
        return model_path, model
    rewritten = apply_smoothquant(model, smoothing.absmax, points=smoothing.points)
    return save_onnx(rewritten, workdir / "prepared.onnx"), rewritten


@dataclass(frozen=True)
class RangeCache:
    """Calibration results as JSON in `folder`, keyed by the model's and the data's hashes.

    Calibration (the SmoothQuant statistics pass and the range pass) is most of a static INT8 run; what it yields
    depends only on the FP32 model, the calibration data (`data_key`: a hash of the samples and how they are
    tokenized), the range methods and the graph plan. A rerun with another accuracy budget, fallback limit or
    weight/activation type reads the ranges back instead of running the data again.
    """

    folder: Path
    data_key: str

    def path(self, model_path: Path, options: QuantizeOptions, plan: QuantPlan) -> Path:
        key = content_hash({"model": model_digest(model_path), "data": self.data_key, "calibrator": options.calibrator,
                            "calibrator_options": calibrator_options(options.calibrator), "graph": options.graph,
                            "smoothquant": options.smoothquant, "methods": plan.range_methods,
                            "nodes": plan.nodes_to_quantize, "exclude": plan.nodes_to_exclude,
                            "points": [[p.tensor, list(p.matmuls), p.alpha] for p in plan.branch_points],
                            "normalize": options.normalize, "per_channel": options.per_channel,
                            "cnn": options.cnn.preparation_key(), "v": _CACHE_VERSION})
        return self.folder / f"ranges-{key}.json"

    def load(self, path: Path, plan: QuantPlan) -> tuple[Smoothing, dict[str, tuple[float, float]]] | None:
        if not path.is_file():
            return None
        try:
            payload = json.loads(path.read_text())
            alphas = payload["alphas"]
            points = [replace(p, alpha=alphas[p.tensor]) for p in plan.branch_points]
            smoothing = Smoothing(points, {k: np.asarray(v, np.float32) for k, v in payload["absmax"].items()},
                                  payload["choices"])
            return smoothing, {k: (float(lo), float(hi)) for k, (lo, hi) in payload["ranges"].items()}
        except (ValueError, KeyError, TypeError) as err:
            raise BadInputError(f"{path}: not a readable edgepack range cache ({type(err).__name__}: {err}); "
                                "delete the file and edgepack calibrates again") from err

    def save(self, path: Path, smoothing: Smoothing, ranges: dict[str, tuple[float, float]]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"alphas": {p.tensor: p.alpha for p in smoothing.points},
                          "absmax": {k: v.tolist() for k, v in smoothing.absmax.items()},
                          "choices": smoothing.choices,
                          "ranges": {k: [float(lo), float(hi)] for k, (lo, hi) in ranges.items()}})


@dataclass(frozen=True)
class _QDQWriter:
    """Writes QDQ models from one set of calibrated ranges, with any extra nodes left in float (for the budget)."""

    model_path: Path
    plan: QuantPlan
    ranges: dict[str, tuple[float, float]]
    options: QuantizeOptions
    workdir: Path
    #: the FP32 weights behind a CNN-prepared model (grid-rounded weights, corrected biases): a layer left in
    #: float gets them back, else "float" would keep its INT8 weight error
    float_weights: Path | None = None

    def __call__(self, excluded: frozenset[str]) -> Path:
        from onnxruntime.quantization import CalibrationMethod, TensorData, TensorsData
        from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

        tensors_range = TensorsData(CalibrationMethod.MinMax, {
            name: TensorData(lowest=np.array(lo, dtype=np.float32), highest=np.array(hi, dtype=np.float32))
            for name, (lo, hi) in self.ranges.items()})
        extra = {**self.plan.extra_options}
        if self.plan.tensor_overrides:
            extra["TensorQuantOverrides"] = self.plan.tensor_overrides
        nodes = None if self.plan.nodes_to_quantize is None else [
            n for n in self.plan.nodes_to_quantize if n not in excluded]
        model = onnx.load(str(self.model_path))  # the quantizer edits the model it is given
        if self.float_weights is not None:
            restore_float_weights(model, onnx.load(str(self.float_weights)),
                                  {*self.plan.nodes_to_exclude, *excluded})
        quantizer = QDQQuantizer(model, self.options.per_channel, False, _quant_type(self.options.weight_type),
                                 _quant_type(self.options.activation_type), tensors_range, nodes or [],
                                 [*self.plan.nodes_to_exclude, *sorted(excluded)],
                                 list(self.plan.op_types_to_quantize), extra)
        quantizer.quantize_model()
        keep_float(quantizer.model.model, {*self.plan.nodes_to_exclude, *excluded})
        if self.plan.float_outputs:
            float_graph_outputs(quantizer.model.model)
        path = self.workdir / f"qdq-{len(excluded)}-{abs(hash(excluded)) % 10**8}.onnx"
        # ORT's saver sorts the graph topologically (the quantizer appends weight DequantizeLinear nodes last)
        quantizer.model.save_model_to_file(str(path), use_external_data_format=needs_external_data(model))
        return path


@dataclass(frozen=True)
class _FusedWriter:
    """Writes fused integer-op models (`fused.lower_to_integer_ops`) from one set of ranges, any extra nodes float."""

    model_path: Path
    plan: QuantPlan
    ranges: dict[str, tuple[float, float]]
    workdir: Path
    per_channel: bool = True

    def __call__(self, excluded: frozenset[str]) -> Path:
        from edgepack.quantization.fused import lower_to_integer_ops

        chosen = set(self.plan.nodes_to_quantize or ()) - excluded - set(self.plan.nodes_to_exclude)
        model, _ = lower_to_integer_ops(onnx.load(str(self.model_path)), self.ranges, nodes=chosen,
                                        per_channel=self.per_channel)
        return save_onnx(model, self.workdir / f"fused-{len(excluded)}-{abs(hash(excluded)) % 10**8}.onnx")


def graph_to_quantize(model_path: Path, graph: str, workdir: Path) -> tuple[Path, dict[str, int]]:
    """The FP32 graph the plan is made on: the model itself (`qdq`), or its onnxruntime.transformers fusion
    (`fused`) with the fused-op counts."""
    if graph != "fused":
        return model_path, {}
    from edgepack.quantization.fused import fuse_transformer

    path = workdir / "fused-fp32.onnx"
    return path, fuse_transformer(model_path, path)


_WEIGHT_BIAS_QUANTIZED = ("Conv", "ConvTranspose", "Gemm")


def restore_float_weights(model: onnx.ModelProto, reference: onnx.ModelProto, names: set[str]) -> None:
    """The weight and bias initializers of nodes `names` take their values in `reference` (a bias the CNN
    preparation added, absent there, becomes zeros)."""
    values = {t.name: t for t in reference.graph.initializer}
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.name not in names:
            continue
        for name in node.input[1:3]:
            if name not in inits:
                continue
            if name in values:
                inits[name].CopyFrom(values[name])
            else:
                zeros = np.zeros(tuple(inits[name].dims), onnx.helper.tensor_dtype_to_np_dtype(inits[name].data_type))
                inits[name].CopyFrom(onnx.numpy_helper.from_array(zeros, name))


def keep_float(model: onnx.ModelProto, names: set[str]) -> int:
    """Make the float layers of a QDQ model stay float in ONNX Runtime; returns how many needed it.

    onnxruntime's `WeightBiasQuantization` optimizer (a level-1 session transformer) quantizes, per tensor, the float
    weight of every Conv / ConvTranspose / Gemm whose input comes straight from a DequantizeLinear, so a layer left in
    float on purpose (the accuracy budget's fallback, `exclude_nodes`) became a per-tensor INT8 layer at session
    creation: measured on EfficientNet-Lite0, the first depthwise Conv "in float" dropped top-1 agreement from 0.97
    to 0.47. Its input is routed through Max(x, x), an exact no-op the optimizer neither removes nor matches
    (an Identity or a Cast of the weight is folded first); a test checks the layer runs as a float Conv.
    """
    producers = {o: n for n in model.graph.node for o in n.output}
    count = 0
    for node in list(model.graph.node):
        if node.name not in names or node.op_type not in _WEIGHT_BIAS_QUANTIZED or not node.input:
            continue
        producer = producers.get(node.input[0])
        if producer is None or producer.op_type != "DequantizeLinear":
            continue
        kept = f"{node.input[0]}_kept_float_{count}"
        guard = onnx.helper.make_node("Max", [node.input[0], node.input[0]], [kept], name=f"{node.name}_keep_float")
        model.graph.node.insert(list(model.graph.node).index(node), guard)
        node.input[0] = kept
        count += 1
    return count


def float_graph_outputs(model: onnx.ModelProto) -> int:
    """Drop the QuantizeLinear -> DequantizeLinear pair in front of each graph output, so the last op's result
    leaves in float (ORT's QGemm / QLinear ops then write float); returns how many outputs changed."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    drop: set[int] = set()
    for output in graph.output:
        dq = producers.get(output.name)
        q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or readers.get(q.output[0], 0) != 1:
            continue
        source = producers.get(q.input[0])
        if source is None or readers.get(q.input[0], 0) != 1:
            continue
        source.output[list(source.output).index(q.input[0])] = output.name
        drop.update({id(q), id(dq)})
    if drop:
        keep = [n for n in graph.node if id(n) not in drop]
        del graph.node[:]
        graph.node.extend(keep)
        used = {name for node in graph.node for name in node.input}
        inits = [t for t in graph.initializer if t.name in used]  # the dropped pair's scale / zero point
        del graph.initializer[:]
        graph.initializer.extend(inits)
    return len(drop) // 2


def _fidelity_scorer(fp32_path: Path, feeds: Sequence[Feed], output: str) -> Callable[[Path], dict[str, float]]:
    """Embedding cosine of a candidate vs the FP32 model on `feeds` (held out from nothing: calibration samples)."""
    import onnxruntime as ort

    from edgepack.runtime.metrics import fidelity

    def run(path: Path) -> list[dict[str, np.ndarray]]:
        session_options = ort.SessionOptions()
        session_options.log_severity_level = 3  # foreign graphs: no page of graph.cc warnings per candidate
        session = ort.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])
        return [{output: session.run([output], feed)[0]} for feed in feeds]

    reference = run(fp32_path)
    return lambda path: fidelity(reference, run(path), output=output)


@dataclass(frozen=True)
class _Graph:
    """The model quantization works on: normalised (and, for the cnn recipe, CNN-prepared) FP32, saved in workdir."""

    path: Path
    model: onnx.ModelProto
    recipe: str
    per_channel: bool
    notes: dict[str, Any]
    float_weights: Path | None = None  # see _QDQWriter.float_weights


def _normalized(model_path: Path, model: onnx.ModelProto, options: QuantizeOptions, workdir: Path) -> _Graph:
    """`exporters.normalize` on the user's model (opset, Constant weights, BatchNorm, Pad, names, types)."""
    from edgepack.exporters.normalize import MIN_OPSET, default_opset, normalize_model

    recipe = detect_family(model) if options.family == "auto" else options.family
    if not options.normalize or options.graph == "fused":  # the fused graph is our own fusion of an FP32 export
        return _Graph(model_path, model, recipe, options.per_channel, {})
    normalized, report = normalize_model(model)
    get_reporter().info(f"- {report.summary()}")
    per_channel = options.per_channel
    notes: dict[str, Any] = {"normalization": report.as_dict()}
    if per_channel and default_opset(normalized) < MIN_OPSET:
        per_channel = False  # per-channel DequantizeLinear needs `axis` (opset 13)
        notes["per_channel_note"] = (f"per-tensor weights: the model stays at opset {default_opset(normalized)} "
                                     f"({report.opset_note}); per-channel needs opset {MIN_OPSET}")
    if not report.changed:
        return _Graph(model_path, model, recipe, per_channel, notes)
    return _Graph(save_onnx(normalized, workdir / "normalized.onnx"), normalized, recipe, per_channel, notes)


def _cnn_prepared(graph: _Graph, options: QuantizeOptions, *, calibration_feeds: Callable[[], Iterable[Feed]],
                  n_calibration: int, workdir: Path, cached: Path | None) -> _Graph:
    """For the cnn recipe: equalization, learned rounding, bias correction (`cnn.prepare_cnn`); a cached prepared
    model (same model, data and options) is reused as it is."""
    from edgepack.quantization.cnn import prepare_cnn

    if graph.recipe != "cnn" or not options.cnn.active:
        return graph
    target = cached or workdir / "cnn-prepared.onnx"
    float_path = target.with_name(target.stem + ".float.onnx")
    if cached is not None and cached.is_file() and float_path.is_file():
        model = onnx.load(str(cached))
        notes = {**graph.notes, "cnn": json.loads(cached.with_suffix(".json").read_text())}
        return replace(graph, path=cached, model=model, notes=notes, float_weights=float_path)
    prepared, reference, report = prepare_cnn(graph.model, calibration_feeds, n_samples=n_calibration,
                                              options=options.cnn, per_channel=graph.per_channel, workdir=workdir)
    target.parent.mkdir(parents=True, exist_ok=True)
    path = save_onnx(prepared, target)
    save_onnx(reference, float_path)
    if cached is not None:
        write_json(cached.with_suffix(".json"), report.as_dict())
    return replace(graph, path=path, model=prepared, notes={**graph.notes, "cnn": report.as_dict()},
                   float_weights=float_path)


def check_activation_names(model: onnx.ModelProto, tensors: Sequence[str], *, field: str) -> None:
    """Each of `tensors` is a node output or graph input of `model`, else a BadInputError naming `field` and the
    closest names (quantize.wide_activations, quantize.cnn.float_activations)."""
    known = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    for name in tensors:
        if name not in known:
            raise BadInputError(f"{field}: no tensor '{name}' in the model{did_you_mean(name, sorted(known))}; "
                                f"name a node output or graph input")


def widen_activations(plan: QuantPlan, model: onnx.ModelProto, tensors: Sequence[str]) -> QuantPlan:
    """`plan` with `tensors` quantized as uint16 (ORT TensorQuantOverrides; contrib Q/DQ below opset 21).

    A 16-bit tensor keeps its calibrated range; the ops around it run in float on CPU (no 16-bit integer
    kernels), QNN HTP runs them as 16-bit activations. A name that is no activation of `model` is a BadInputError.
    """
    if not tensors:
        return plan
    from onnxruntime.quantization import QuantType

    from edgepack.exporters.normalize import default_opset

    check_activation_names(model, tensors, field="quantize.wide_activations")
    overrides = {**plan.tensor_overrides, **{t: [{"quant_type": QuantType.QUInt16}] for t in tensors}}
    extra = {**plan.extra_options}
    if default_opset(model) < 21:
        extra["UseQDQContribOps"] = True
    notes = (*plan.notes, f"{len(tensors)} activation tensor(s) in 16 bits: {', '.join(tensors)}")
    return replace(plan, tensor_overrides=overrides, extra_options=extra, notes=notes)


def keep_float_activations(plan: QuantPlan, graph: _Graph, tensors: Sequence[str]) -> QuantPlan:
    """`plan` with the nodes around `tensors` excluded (`cnn.float_activation_nodes`), so those activations stay
    float; the excluded layers get their FP32 weights back (`restore_float_weights`). cnn recipe only."""
    if not tensors:
        return plan
    if graph.recipe != "cnn":
        raise BadInputError(f"quantize.cnn.float_activations applies to the cnn recipe; this model quantizes with "
                            f"the {graph.recipe} recipe: drop float_activations or set quantize.recipe cnn")
    from edgepack.quantization.cnn import float_activation_nodes

    nodes = [n for n in float_activation_nodes(graph.model, tensors) if n not in plan.nodes_to_exclude]
    notes = (*plan.notes, f"{len(tensors)} activation tensor(s) kept in float ({', '.join(tensors)}): "
                          f"{len(nodes)} node(s) left unquantized ({', '.join(nodes)})")
    return replace(plan, nodes_to_exclude=(*plan.nodes_to_exclude, *nodes), notes=notes)


def budget_candidates(plan: QuantPlan, model: onnx.ModelProto) -> list[str]:
    """Layers the accuracy budget may return to float: the plan's selected nodes, or (whole-graph recipes such as
    cnn) every quantized weight layer (Conv, ConvTranspose, Gemm, MatMul with a constant weight)."""
    if plan.nodes_to_quantize is not None:
        return list(plan.nodes_to_quantize)
    from edgepack.quantization.cnn import weight_layers

    excluded = set(plan.nodes_to_exclude)
    weights = {t.name for t in model.graph.initializer}
    found = [layer.name for layer in weight_layers(model)]
    found += [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in weights]
    return [name for name in found if name not in excluded and name]


def quantize_static(model_path: Path, out_path: Path, *, calibration_feeds: Callable[[], Iterable[Feed]],
                    n_calibration: int, options: QuantizeOptions = QuantizeOptions(),
                    budget: QuantBudget | None = None, check: tuple[Sequence[Feed], str] | None = None,
                    cache: RangeCache | None = None, sensitivity_top: int = 0) -> dict[str, Any]:
    """Quantize `model_path` to QDQ INT8 at `out_path`; return metrics and the plan for the manifest.

    The model is first normalised (`exporters.normalize`: opset >= 13, Constant weights to initializers, BatchNorm
    and Pad folded into convolutions) and, for the cnn recipe, prepared (`cnn.prepare_cnn`: cross-layer
    equalization, learned rounding, bias correction). With a `budget` and `check` = (feeds, output name), fidelity
    vs FP32 is measured on those feeds and the most sensitive layers fall back to float until the budget holds
    (`sensitivity.fit_budget`); an unmeetable budget raises GateFailedError (exit 3) naming the best reached and
    the layers tried. `sensitivity_top` > 0 ranks every layer by leave-one-out sensitivity on `check` even when no
    fallback is needed (metrics["budget"]["sensitivity_top"]). With a `cache`, calibration results are read from /
    written to it (`RangeCache`).
    """
    with tempfile.TemporaryDirectory(prefix="edgepack-quantize-", dir=out_path.parent) as tmp:
        workdir = Path(tmp)
        source, fused_ops = graph_to_quantize(model_path, options.graph, workdir)
        model = onnx.load(str(source))
        _check_excluded_exist(model, options.exclude_nodes, graph=options.graph)
        graph = _normalized(source, model, options, workdir)
        plan = widen_activations(plan_quantization(graph.model, family=options.family,
                                                   exclude=options.exclude_nodes), graph.model,
                                 options.wide_activations)
        plan = keep_float_activations(plan, graph, options.cnn.float_activations)
        _check_something_to_quantize(plan, graph.model, model_path)
        _check_sample_count(n_calibration, {options.calibrator, *plan.range_methods.values()})
        effective = replace(options, per_channel=graph.per_channel)
        cache_path = cache.path(source, effective, plan) if cache is not None else None
        graph = _cnn_prepared(graph, effective, calibration_feeds=calibration_feeds, n_calibration=n_calibration,
                              workdir=workdir, cached=None if cache_path is None else cache_path.with_name(
                                  cache_path.name.replace("ranges-", "prepared-").replace(".json", ".onnx")))
        cached = cache.load(cache_path, plan) if cache is not None and cache_path is not None else None
        if cached is not None:
            smoothing, ranges = cached
            prepared, _ = write_prepared(graph.path, graph.model, smoothing, workdir)
            state_bytes = 0
        else:
            smoothing = smoothing_statistics(graph.path, graph.model, plan, calibration_feeds=calibration_feeds,
                                             n_calibration=n_calibration, smoothquant=options.smoothquant)
            prepared, prepared_model = write_prepared(graph.path, graph.model, smoothing, workdir)
            tensors = _tensors_for_graph(prepared_model, plan, options.graph)
            calibrator = PerTensorCalibrator(options.calibrator,
                                             {t: m for t, m in plan.range_methods.items() if t in tensors})
            ranges = collect_tensor_ranges(prepared, calibration_feeds(), tensors=tensors, calibrator=calibrator,
                                           total=n_calibration)
            state_bytes = calibrator.state_bytes()
            if cache is not None and cache_path is not None:
                cache.save(cache_path, smoothing, ranges)
        build: Callable[[frozenset[str]], Path] = (
            _FusedWriter(prepared, plan, ranges, workdir, effective.per_channel) if options.graph == "fused"
            else _QDQWriter(prepared, plan, ranges, effective, workdir, graph.float_weights))
        final, budget_record = build_within_budget(build, plan, model_path, budget=budget, check=check,
                                                   sensitivity_top=sensitivity_top, model=graph.model)
        metrics: dict[str, Any] = {**graph.notes, **budget_record}
        if options.cnn.int4:
            final, metrics["int4"] = _int4_weights(final, graph, options, model_path, check=check, workdir=workdir,
                                                   calibration_feeds=calibration_feeds, n_calibration=n_calibration)
        _move_model(final, out_path)
    metrics.update({
        "graph": options.graph,
        "fused_ops": fused_ops,
        "calibrated_tensors": len(ranges),
        "calibrator_state_bytes": state_bytes,
        "range_cache": None if cache_path is None else {"path": str(cache_path), "hit": cached is not None},
        "plan": _plan_summary(plan, model, graph_note(options.graph, "static", fused_ops)),
        "smoothquant": {"mode": options.smoothquant, "layers": smoothing.choices},
        "tensor_ranges": {k: [float(lo), float(hi)] for k, (lo, hi) in ranges.items()},
    })
    return metrics


def _int4_weights(final: Path, graph: _Graph, options: QuantizeOptions, fp32_path: Path, *,
                  check: tuple[Sequence[Feed], str] | None, workdir: Path,
                  calibration_feeds: Callable[[], Iterable[Feed]], n_calibration: int) -> tuple[Path, dict[str, Any]]:
    """`quantize.cnn.int4_*`: the chosen layers of the INT8 QDQ model get INT4 weights (`cnn_int4.apply_int4`);
    `int4_max_cosine_rise` is judged, and the result's fidelity recorded, on the budget samples (`check`)."""
    from edgepack.quantization.cnn_int4 import apply_int4

    if graph.recipe != "cnn" or options.graph != "qdq":
        raise BadInputError(f"quantize.cnn.int4_layers / int4_largest apply to the cnn recipe's QDQ graph; this "
                            f"model quantizes with the {graph.recipe} recipe, graph {options.graph}: drop them "
                            "(or set quantize.recipe cnn, graph qdq)")
    cnn = options.cnn
    score = None
    if check is not None:
        scorer = _fidelity_scorer(fp32_path, check[0], check[1])

        def score(model: onnx.ModelProto) -> float:
            path = save_onnx(model, workdir / "int4-candidate.onnx")
            return 1.0 - scorer(path)["cosine_mean"]

    record = apply_int4(final, graph.float_weights or graph.path, calibration_feeds, names=cnn.int4_layers,
                        largest=cnn.int4_largest, block_size=cnn.int4_block_size, n_samples=n_calibration,
                        bias_correction=cnn.bias_correction, out_path=workdir / "int4.onnx",
                        max_cosine_rise=cnn.int4_max_cosine_rise, score=score, kernel=cnn.int4_kernel)
    if not record["layers"]:
        return final, record
    if check is not None:
        record["fidelity"] = _fidelity_scorer(fp32_path, check[0], check[1])(workdir / "int4.onnx")
    get_reporter().info(f"- INT4 weights: {len(record['layers'])} layers, {record['int4_elements']:,} weights")
    return workdir / "int4.onnx", record


def _tensors_for_graph(model: onnx.ModelProto, plan: QuantPlan, graph: str) -> list[str]:
    """What to calibrate: the QDQ quantizer's tensors, or (fused) the activation input of each lowered node."""
    if graph != "fused":
        return tensors_to_calibrate(model, plan)
    from edgepack.quantization.fused import weight_node_inputs

    return weight_node_inputs(model, set(plan.nodes_to_quantize or ()) - set(plan.nodes_to_exclude))


def build_within_budget(build: Callable[[frozenset[str]], Path], plan: QuantPlan, fp32_path: Path, *,
                        budget: QuantBudget | None, check: tuple[Sequence[Feed], str] | None,
                        sensitivity_top: int, model: onnx.ModelProto | None = None) -> tuple[Path, dict[str, Any]]:
    """The model `build` writes with nothing in float, or, under a budget, with the fewest most-sensitive layers in
    float that meet it (`sensitivity.fit_budget`); the budget record for the manifest. Static and dynamic INT8
    share it. With the `model`, whole-graph recipes (cnn) may return any weight layer (`budget_candidates`)."""
    if (budget is None and not sensitivity_top) or check is None:
        return build(frozenset()), {}
    budget = budget if budget is not None else QuantBudget(max_cosine_drop=None)
    score = _fidelity_scorer(fp32_path, check[0], check[1])
    candidates = budget_candidates(plan, model) if model is not None else list(plan.nodes_to_quantize or [])
    result = fit_budget(candidates, build=build, score=score, budget=budget, rank_always=sensitivity_top > 0)
    record = {"max_cosine_drop": budget.max_cosine_drop, "met": result.met, "check_samples": len(check[0]),
              "fallback_nodes": list(result.excluded), "candidates": len(candidates),
              "check_fidelity": result.scores, "history": result.history,
              "sensitivity_top": [vars(s) for s in result.sensitivity[:max(sensitivity_top, 10)]]}
    if not result.met:
        raise_unmet(result, budget)
    return result.artifact, {"budget": record}


def _move_model(src: Path, dst: Path) -> None:
    """Move a saved model (and its external data file, if any) into place."""
    if not src.with_name(src.name + ".data").exists():
        os.replace(src, dst)
        return
    model = onnx.load(str(src))  # > 2 GB: rewrite so the .onnx names its own external data file
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=0)


def _check_something_to_quantize(plan: QuantPlan, model: onnx.ModelProto, model_path: Path) -> None:
    """A plan that selects no node is a user-facing dead end, not an empty list (ORT reads [] as "every node")."""
    if plan.nodes_to_quantize is not None and not plan.nodes_to_quantize:
        ops = sorted({n.op_type for n in model.graph.node})
        raise BadInputError(f"{model_path}: the {plan.notes[0].removeprefix('family: ')} quantization recipe finds no "
                            f"layer to quantize: it takes {', '.join(plan.op_types_to_quantize)} nodes with constant "
                            f"weights and the graph has ops {', '.join(ops)}; name another recipe (--recipe / "
                            "quantize.recipe; transformer-encoder also quantizes embedding Gathers) or ship it in FP32")


def _check_sample_count(n_calibration: int, methods: Iterable[str]) -> None:
    for method in sorted(methods):
        needed = MIN_SAMPLES.get(method, 1)
        if n_calibration < needed:
            raise BadInputError(f"calibrator '{method}' needs at least {needed} calibration samples, got "
                                f"{n_calibration} (data.n_calibration / --samples); add samples or use minmax")


def _check_excluded_exist(model: onnx.ModelProto, exclude: Sequence[str], *, graph: str = "qdq") -> None:
    names = {n.name for n in model.graph.node}
    for name in exclude:
        if name not in names:
            where = "the fused graph (q/k/v MatMuls are inside Attention_<i>; name those, or use graph qdq)" \
                if graph == "fused" else "the model"
            raise BadInputError(f"quantize.exclude_nodes: node '{name}' is not in {where}{did_you_mean(name, names)}")


def _plan_summary(plan: QuantPlan, model: onnx.ModelProto, *extra_notes: str) -> dict[str, Any]:
    return {
        "op_types_to_quantize": list(plan.op_types_to_quantize),
        "nodes_to_quantize": None if plan.nodes_to_quantize is None else len(plan.nodes_to_quantize),
        "nodes_to_exclude": list(plan.nodes_to_exclude),
        "range_methods": sorted(set(plan.range_methods.values())),
        "notes": [*plan.notes, *extra_notes],
        "nodes_total": len(model.graph.node),
    }
