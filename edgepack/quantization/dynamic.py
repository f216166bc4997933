"""Dynamic INT8 (`quantize.mode: dynamic`): INT8 weights, activation ranges computed per input at run time.

onnxruntime.quantization's `quantize_dynamic` does the quantizing (MatMul -> DynamicQuantizeLinear + MatMulInteger,
which ORT fuses into DynamicQuantizeMatMul at session creation; fused Attention -> QAttention; embedding Gather /
EmbedLayerNormalization -> uint8 tables). What edgepack adds is the same plan as the static path: the family's
node choice (weight layers and embeddings, by graph pattern), SmoothQuant on the MatMul inputs (a dynamic range is
still one range per tensor, so outlier channels cost the same resolution; alphas are searched on calibration data
as for static INT8, whose per-tensor range bounds the per-input one), the fused graph on the CPU EP
(`quantize.graph`), and the accuracy budget with float fallback (`sensitivity.fit_budget`).

SmoothQuant under dynamic ranges needs one guard, measured on the out-of-domain split (MiniLM, fused graph, alphas
searched): the smoothed branch X/s has balanced channels on calibration-like text, but a channel that was quiet in
calibration (small s, large 1/s) can spike on other text (docstrings, code, padded batches), and a per-input range
then stretches to that one value and loses resolution everywhere: cosine min 0.936 (0.892 on padded batches) where
static INT8 keeps 0.983, whose calibrated range clips the spike instead. So each smoothed branch gets a `Clip` to its
calibrated range (one more calibration pass over the branch tensors): dynamic INT8 then holds 0.983 / 0.983 there,
and 0.998 / 0.995 in domain (without smoothing: 0.994 / 0.989).

Without SmoothQuant (`smoothquant: off`) dynamic INT8 reads no calibration data at all; it runs on CPU EPs only
(NPUs need static scales).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from edgepack.calibration_data import Feed
from edgepack.onnx_files import save_onnx
from edgepack.quantization.fused import graph_note, split_slow_kernels
from edgepack.quantization.quantize import (
    QuantizeOptions,
    Smoothing,
    _check_excluded_exist,
    _move_model,
    _plan_summary,
    build_within_budget,
    graph_to_quantize,
    smoothing_statistics,
    write_prepared,
)
from edgepack.quantization.recipes import QuantPlan, plan_quantization
from edgepack.quantization.sensitivity import QuantBudget

#: Op types handed to quantize_dynamic (the plan chooses the nodes among them)
DYNAMIC_OP_TYPES = ("MatMul", "Attention", "Gather", "EmbedLayerNormalization")


@dataclass(frozen=True)
class _DynamicWriter:
    """Writes dynamic INT8 models of one prepared (smoothed) graph, with any extra nodes left in float."""

    model_path: Path
    plan: QuantPlan
    per_channel: bool
    workdir: Path

    def __call__(self, excluded: frozenset[str]) -> Path:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        nodes = [n for n in self.plan.nodes_to_quantize or () if n not in excluded]
        path = self.workdir / f"dynamic-{len(excluded)}-{abs(hash(excluded)) % 10**8}.onnx"
        quantize_dynamic(self.model_path, path, op_types_to_quantize=list(DYNAMIC_OP_TYPES),
                         per_channel=self.per_channel, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                         nodes_to_exclude=[*self.plan.nodes_to_exclude, *sorted(excluded)],
                         extra_options={"MatMulConstBOnly": True,
                                        # fused contrib ops defeat ORT's shape inference: their outputs are float
                                        "DefaultTensorType": onnx.TensorProto.FLOAT})
        model = onnx.load(str(path))
        if split_slow_kernels(model):  # SkipLayerNormalization -> Sum + LayerNormalization (quantization.fused)
            save_onnx(model, path)
        return path


def clip_smoothed_branches(path: Path, model: onnx.ModelProto, workdir: Path, *,
                           calibration_feeds: Callable[[], Iterable[Feed]], n_calibration: int,
                           calibrator: str = "minmax") -> Path:
    """`model` with a Clip to the calibrated range after each SmoothQuant branch Mul (see the module docstring);
    `path` itself when nothing is smoothed."""
    import numpy as np
    from onnx import helper, numpy_helper

    from edgepack.quantization.calibrators import collect_tensor_ranges, make_calibrator

    branches = [n.output[0] for n in model.graph.node if n.op_type == "Mul" and n.name.endswith("/quant_branch")]
    if not branches:
        return path
    ranges = collect_tensor_ranges(path, calibration_feeds(), tensors=branches, calibrator=make_calibrator(calibrator),
                                   total=n_calibration)
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        nodes.append(node)
        if node.output[0] not in ranges:
            continue
        tensor = node.output[0]
        low, high = ranges[tensor]
        node.output[0] = f"{tensor}/unclipped"
        model.graph.initializer.extend([numpy_helper.from_array(np.array(low, np.float32), f"{tensor}/low"),
                                        numpy_helper.from_array(np.array(high, np.float32), f"{tensor}/high")])
        nodes.append(helper.make_node("Clip", [node.output[0], f"{tensor}/low", f"{tensor}/high"], [tensor],
                                      name=f"{tensor}/clip"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return save_onnx(model, workdir / "clipped.onnx")


def quantize_dynamic_int8(model_path: Path, out_path: Path, *, calibration_feeds: Callable[[], Iterable[Feed]],
                          n_calibration: int, options: QuantizeOptions | None = None,
                          budget: QuantBudget | None = None, check: tuple[Sequence[Feed], str] | None = None,
                          sensitivity_top: int = 0) -> dict[str, Any]:
    """Dynamic INT8 of `model_path` at `out_path` (on the `options.graph` form); metrics for the manifest.

    `calibration_feeds` is read only for SmoothQuant statistics (`options.smoothquant` search / recipe); the budget
    and `sensitivity_top` work as in `quantize_static`.
    """
    options = options if options is not None else QuantizeOptions()
    with tempfile.TemporaryDirectory(prefix="edgepack-dynamic-", dir=out_path.parent) as tmp:
        workdir = Path(tmp)
        source, fused_ops = graph_to_quantize(model_path, options.graph, workdir)
        model = onnx.load(str(source))
        _check_excluded_exist(model, options.exclude_nodes, graph=options.graph)
        plan = plan_quantization(model, family=options.family, exclude=options.exclude_nodes)
        smoothing: Smoothing = smoothing_statistics(source, model, plan, calibration_feeds=calibration_feeds,
                                                    n_calibration=n_calibration, smoothquant=options.smoothquant)
        prepared, prepared_model = write_prepared(source, model, smoothing, workdir)
        clipped = clip_smoothed_branches(prepared, prepared_model, workdir, calibration_feeds=calibration_feeds,
                                         n_calibration=n_calibration, calibrator=options.calibrator)
        build = _DynamicWriter(clipped, plan, options.per_channel, workdir)
        final, metrics = build_within_budget(build, plan, model_path, budget=budget, check=check,
                                             sensitivity_top=sensitivity_top)
        _move_model(final, out_path)
    metrics.update({
        "mode": "dynamic",
        "graph": options.graph,
        "fused_ops": fused_ops,
        "calibrated_tensors": 0,
        "calibrator_state_bytes": 0,
        "range_cache": None,
        "plan": _plan_summary(plan, model, graph_note(options.graph, "dynamic", fused_ops)),
        "smoothquant": {"mode": options.smoothquant, "layers": smoothing.choices},
        "tensor_ranges": {},
    })
    return metrics
