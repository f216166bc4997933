"""Static post-training INT8 (QDQ) driver.

onnxruntime.quantization does the quantizing (its `QDQQuantizer` inserts QuantizeLinear/DequantizeLinear and
per-channel weight scales). We supply what it gets wrong on transformers out of the box:
- the tensor ranges, from our streaming calibrators (`calibrators.py`: O(1) memory in the sample count,
  where ORT's histogram calibrators keep every activation and crash on MiniLM), per tensor by method;
- the node choice, from the per-architecture recipe (`recipes.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgepack.calibration_data import Feed
from edgepack.errors import BadInputError
from edgepack.quantization.calibrators import CALIBRATORS, RangeCalibrator, collect_tensor_ranges, make_calibrator
from edgepack.quantization.recipes import QuantPlan, plan_quantization


@dataclass(frozen=True)
class QuantizeOptions:
    calibrator: str = "minmax"  # default range method; the recipe may pick another per tensor
    family: str = "auto"
    per_channel: bool = True
    activation_type: str = "uint8"
    weight_type: str = "int8"
    exclude_nodes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        CALIBRATORS.get(self.calibrator)  # unknown name -> BadInputError listing the known ones


class PerTensorCalibrator(RangeCalibrator):
    """Routes each tensor to the calibrator its recipe asks for; one pass over the data serves them all."""

    name = "per-tensor"

    def __init__(self, default: str, methods: dict[str, str]) -> None:
        self._by_method = {m: make_calibrator(m) for m in {default, *methods.values()}}
        self._default = default
        self._methods = methods

    def _update(self, tensor: str, data: np.ndarray) -> None:  # data already checked finite by `update`
        self._by_method[self._methods.get(tensor, self._default)]._update(tensor, data)

    def ranges(self) -> dict[str, tuple[float, float]]:
        out: dict[str, tuple[float, float]] = {}
        for calibrator in self._by_method.values():
            out.update(calibrator.ranges())
        return out

    def state_bytes(self) -> int:
        return sum(c.state_bytes() for c in self._by_method.values())


def tensors_to_calibrate(model: onnx.ModelProto, plan: QuantPlan) -> list[str]:
    """Float activations entering or leaving the nodes the plan quantizes (what ORT's quantizer asks ranges for)."""
    inferred = onnx.shape_inference.infer_shapes(model)
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


def quantize_static(model_path: Path, out_path: Path, *, calibration_feeds: Callable[[], Iterable[Feed]],
                    n_calibration: int, options: QuantizeOptions = QuantizeOptions()) -> dict[str, Any]:
    """Quantize `model_path` to QDQ INT8 at `out_path`; return metrics and the plan for the manifest."""
    from onnxruntime.quantization import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    model = onnx.load(str(model_path))
    plan = plan_quantization(model, family=options.family, exclude=options.exclude_nodes)
    _check_excluded_exist(model, options.exclude_nodes)
    tensors = tensors_to_calibrate(model, plan)
    calibrator = PerTensorCalibrator(options.calibrator, {t: m for t, m in plan.range_methods.items() if t in tensors})
    ranges = collect_tensor_ranges(model_path, calibration_feeds(), tensors=tensors, calibrator=calibrator,
                                   total=n_calibration)
    tensors_range = TensorsData(CalibrationMethod.MinMax, {
        name: TensorData(lowest=np.array(lo, dtype=np.float32), highest=np.array(hi, dtype=np.float32))
        for name, (lo, hi) in ranges.items()})
    extra = {**plan.extra_options}
    if plan.tensor_overrides:
        extra["TensorQuantOverrides"] = plan.tensor_overrides
    quantizer = QDQQuantizer(model, options.per_channel, False, _quant_type(options.weight_type),
                             _quant_type(options.activation_type), tensors_range,
                             list(plan.nodes_to_quantize) if plan.nodes_to_quantize is not None else [],
                             list(plan.nodes_to_exclude), list(plan.op_types_to_quantize), extra)
    quantized = quantizer.quantize_model()
    onnx.save_model(quantized, str(out_path), save_as_external_data=quantized.ByteSize() >= 2**31)
    return {
        "calibrated_tensors": len(ranges),
        "calibrator_state_bytes": calibrator.state_bytes(),
        "plan": _plan_summary(plan, model),
        "tensor_ranges": {k: [float(lo), float(hi)] for k, (lo, hi) in ranges.items()},
    }


def _check_excluded_exist(model: onnx.ModelProto, exclude: Sequence[str]) -> None:
    names = {n.name for n in model.graph.node}
    for name in exclude:
        if name not in names:
            from edgepack.errors import did_you_mean

            raise BadInputError(f"quantize.exclude_nodes: node '{name}' is not in the model{did_you_mean(name, names)}")


def _plan_summary(plan: QuantPlan, model: onnx.ModelProto) -> dict[str, Any]:
    return {
        "op_types_to_quantize": list(plan.op_types_to_quantize),
        "nodes_to_quantize": None if plan.nodes_to_quantize is None else len(plan.nodes_to_quantize),
        "nodes_to_exclude": list(plan.nodes_to_exclude),
        "range_methods": sorted(set(plan.range_methods.values())),
        "notes": list(plan.notes),
        "nodes_total": len(model.graph.node),
    }
