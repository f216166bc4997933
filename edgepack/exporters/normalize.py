"""Graph normalisation for ONNX files from any exporter, before quantization.

ONNX files written by other toolchains (Paddle2ONNX, tf2onnx, older torch exports, hand-edited graphs) differ from
what onnxruntime's quantizer expects: opset 11-12 (per-channel DequantizeLinear needs `axis`, opset >= 13), weights
held in `Constant` nodes instead of initializers (the quantizer sees them as activations and calibrates them; ORT
logs hundreds of "Removing initializer" warnings), BatchNormalization left unfused (a float op between the Conv and
its quantized output), explicit `Pad` nodes before strided convolutions (each one runs in float between a
DequantizeLinear and a QuantizeLinear: measured at a third of EfficientNet-Lite0's INT8 time), and unnamed nodes
(the quantizer selects nodes by name). ONNX Runtime's `quant_pre_process` would do part of this, but its symbolic
shape inference stops on such graphs ("Incomplete symbolic shape inference"), so the passes are ours, each small
and counted:

- `upgrade_opset`: the default domain to opset 13 with onnx's version converter (when below 13);
- `name_nodes`: every node gets a unique, stable name (before the folds, which name what they write after their
  node; again at the end, for nodes the passes made);
- `constants_to_initializers`: `Constant` nodes become initializers; initializers leave the graph inputs;
- `fold_constants`: nodes whose inputs are all constant are evaluated once (onnx's reference evaluator);
- `fold_batch_norms`: BatchNormalization folded into the Conv / ConvTranspose that feeds it (per output channel);
- `fuse_pads`: a zero `Pad` of spatial axes moves into the next Conv's `pads`;
- `infer_types`: onnx shape inference; where it cannot type a tensor, ONNX Runtime's own inference at session
  creation does, so quantization never stops on an incomplete inference.

>>> model, report = normalize_model(onnx.load("paddle_model.onnx"))        # doctest: +SKIP
>>> report.as_dict()["batch_norms_folded"]                                  # doctest: +SKIP
{'Conv': 12, 'ConvTranspose': 2}
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

#: The opset per-channel QDQ needs (DequantizeLinear's `axis`).
MIN_OPSET = 13
#: Largest tensor (elements) `fold_constants` materialises: a folded ConstantOfShape must not blow up the file.
_MAX_FOLD_ELEMENTS = 1 << 24
#: Ops never folded: random or stateful outputs.
_NO_FOLD = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                      "Bernoulli", "If", "Loop", "Scan", "Constant", "Dropout", "QuantizeLinear",
                      "DequantizeLinear"})
_CONV_LIKE = ("Conv", "ConvTranspose")


@dataclass
class NormalizationReport:
    """What each pass changed (written into the quantize manifest)."""

    opset_from: int = 0
    opset_to: int = 0
    opset_note: str | None = None
    nodes_named: int = 0
    constants_to_initializers: int = 0
    initializers_removed_from_inputs: int = 0
    constants_folded: int = 0
    batch_norms_folded: Counter[str] = field(default_factory=Counter)
    batch_norms_left: int = 0
    pads_fused: int = 0
    shape_inference: str = "complete"
    untyped_tensors: int = 0

    @property
    def changed(self) -> bool:
        return any((self.opset_to != self.opset_from, self.nodes_named, self.constants_to_initializers,
                    self.initializers_removed_from_inputs, self.constants_folded, sum(self.batch_norms_folded.values()),
                    self.pads_fused))

    def as_dict(self) -> dict[str, Any]:
        return {"opset": {"from": self.opset_from, "to": self.opset_to, "note": self.opset_note},
                "nodes_named": self.nodes_named, "constants_to_initializers": self.constants_to_initializers,
                "initializers_removed_from_inputs": self.initializers_removed_from_inputs,
                "constants_folded": self.constants_folded, "batch_norms_folded": dict(self.batch_norms_folded),
                "batch_norms_left": self.batch_norms_left, "pads_fused": self.pads_fused,
                "shape_inference": self.shape_inference, "untyped_tensors": self.untyped_tensors}

    def summary(self) -> str:
        """One line for the reporter and the plan notes."""
        parts = []
        if self.opset_to != self.opset_from:
            parts.append(f"opset {self.opset_from} -> {self.opset_to}")
        elif self.opset_note:
            parts.append(self.opset_note)
        for count, text in ((self.constants_to_initializers, "Constant nodes -> initializers"),
                            (self.constants_folded, "constant nodes folded"),
                            (sum(self.batch_norms_folded.values()), "BatchNormalization folded"),
                            (self.pads_fused, "Pad fused into Conv"), (self.nodes_named, "nodes named")):
            if count:
                parts.append(f"{count} {text}")
        if self.batch_norms_left:
            parts.append(f"{self.batch_norms_left} BatchNormalization left (no Conv before it)")
        if self.shape_inference != "complete":
            parts.append(f"shape inference {self.shape_inference}")
        return "graph normalised: " + (", ".join(parts) if parts else "nothing to change")


def normalize_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, NormalizationReport]:
    """A normalised copy of `model` (the input is not modified) and what changed."""
    model = _copy(model)
    report = NormalizationReport()
    upgrade_opset_in_place(model, report)
    report.nodes_named = name_nodes(model)  # first: the folds name what they make after the node they fold into
    report.constants_to_initializers, report.initializers_removed_from_inputs = constants_to_initializers(model)
    report.constants_folded = fold_constants(model)
    report.batch_norms_folded = fold_batch_norms(model)
    report.batch_norms_left = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    report.pads_fused = fuse_pads(model)
    report.nodes_named += name_nodes(model)  # nodes the passes made
    _drop_unused_initializers(model)
    model = infer_types(model, report)
    return model, report


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


# --------------------------------------------------------------------------------------------------- passes


def name_nodes(model: onnx.ModelProto) -> int:
    """Give every unnamed (or duplicate-named) node a unique name `<op>_<index>`; the count renamed.

    ONNX Runtime's quantizer selects and excludes nodes by name, so every node needs one. The names are stable (the
    same graph gets the same names) and never take a name another node already has: the first node with a name keeps
    it, later duplicates and unnamed nodes get `<op>_<position>` (`_<k>` appended on a clash)."""
    taken: set[str] = set()
    keeps: list[bool] = []
    for node in model.graph.node:
        keeps.append(bool(node.name) and node.name not in taken)
        taken.add(node.name)
    renamed = 0
    for index, (node, keep) in enumerate(zip(model.graph.node, keeps, strict=True)):
        if keep:
            continue
        base = f"{node.op_type}_{index}"
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        node.name = name
        taken.add(name)
        renamed += 1
    return renamed


def upgrade_opset_in_place(model: onnx.ModelProto, report: NormalizationReport) -> None:
    """Default-domain opset below 13 -> 13 (onnx.version_converter); a failure is noted, not raised."""
    from onnx import version_converter

    report.opset_from = report.opset_to = default_opset(model)
    if report.opset_from >= MIN_OPSET or report.opset_from == 0:
        return
    try:
        converted = version_converter.convert_version(model, MIN_OPSET)
    except Exception as err:  # the converter raises RuntimeError / ConvertError / ValidationError subclasses
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        report.opset_note = f"opset {report.opset_from} kept: onnx's version converter failed ({reason})"
        return
    model.CopyFrom(converted)
    model.ir_version = max(model.ir_version, 7)
    report.opset_to = default_opset(model)


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a Constant node, or None for a form we do not read (sparse_value)."""
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


def constants_to_initializers(model: onnx.ModelProto) -> tuple[int, int]:
    """Constant nodes -> initializers (same tensor names); initializers dropped from the graph inputs (IR >= 4)."""
    graph = model.graph
    keep, moved = [], 0
    for node in graph.node:
        value = _constant_value(node) if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
        if value is None:
            keep.append(node)
            continue
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        moved += 1
    if moved:
        del graph.node[:]
        graph.node.extend(keep)
    initializers = {t.name for t in graph.initializer}
    removed = 0
    if model.ir_version >= 4:
        inputs = [v for v in graph.input if v.name not in initializers]
        removed = len(graph.input) - len(inputs)
        if removed:
            del graph.input[:]
            graph.input.extend(inputs)
    return moved, removed


def fold_constants(model: onnx.ModelProto) -> int:
    """Evaluate, once, every node whose inputs are all initializers (the exporter's shape arithmetic, a weight's
    Transpose); its outputs become initializers. Returns the number of nodes folded."""
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    values = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    opsets = list(model.opset_import)
    keep, folded = [], 0
    for node in graph.node:
        if not _foldable(node, values, outputs):
            keep.append(node)
            continue
        try:
            results = _evaluate(ReferenceEvaluator, node, values, opsets)
        except Exception:  # an op the reference evaluator lacks stays in the graph
            keep.append(node)
            continue
        if results is None:
            keep.append(node)
            continue
        for name, array in zip(node.output, results, strict=True):
            tensor = numpy_helper.from_array(np.asarray(array), name)
            graph.initializer.append(tensor)
            values[name] = tensor
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
    return folded


def _foldable(node: onnx.NodeProto, values: dict[str, onnx.TensorProto], outputs: set[str]) -> bool:
    if node.op_type in _NO_FOLD or node.domain not in ("", "ai.onnx") or not node.input:
        return False
    if any(o in outputs for o in node.output) or any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute):
        return False
    return all(not name or name in values for name in node.input)


def _evaluate(evaluator: Any, node: onnx.NodeProto, values: dict[str, onnx.TensorProto],
              opsets: Iterable[onnx.OperatorSetIdProto]) -> list[np.ndarray] | None:
    feeds = {name: numpy_helper.to_array(values[name]) for name in node.input if name}
    graph = helper.make_graph([node], "fold", [helper.make_tensor_value_info(n, values[n].data_type, None)
                                               for n in feeds], [onnx.ValueInfoProto(name=o) for o in node.output])
    results = evaluator(helper.make_model(graph, opset_imports=list(opsets))).run(None, feeds)
    if any(np.asarray(r).size > _MAX_FOLD_ELEMENTS for r in results):
        return None
    return [np.asarray(r) for r in results]


def fold_batch_norms(model: onnx.ModelProto) -> Counter[str]:
    """Fold BatchNormalization (inference form) into the Conv / ConvTranspose whose only reader it is.

    y = gamma (conv(x) + b - mean) / sqrt(var + eps) + beta = conv'(x) + b', with each output channel o of the
    weight scaled by a_o = gamma_o / sqrt(var_o + eps) and b'_o = (b_o - mean_o) a_o + beta_o. A Conv weight is
    (C_out, C_in / group, k...); a ConvTranspose weight is (C_in, C_out / group, k...), so output channel
    g * (C_out / group) + j is column j of group g's rows.
    """
    graph = model.graph
    values = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers = Counter(i for n in graph.node for i in n.input)
    outputs = {o.name for o in graph.output}
    folded: Counter[str] = Counter()
    drop: set[int] = set()
    for bn in graph.node:
        conv = producer.get(bn.input[0]) if bn.op_type == "BatchNormalization" else None
        if conv is None or not _bn_foldable(bn, conv, values, readers, outputs):
            continue
        _fold_one(graph, conv, bn, values)
        conv.output[0] = bn.output[0]
        drop.add(id(bn))
        folded[conv.op_type] += 1
    if drop:
        keep = [n for n in graph.node if id(n) not in drop]
        del graph.node[:]
        graph.node.extend(keep)
    return folded


def _bn_foldable(bn: onnx.NodeProto, conv: onnx.NodeProto, values: dict[str, onnx.TensorProto],
                 readers: Counter[str], outputs: set[str]) -> bool:
    if conv.op_type not in _CONV_LIKE or len(bn.output) != 1 or len(conv.output) != 1:
        return False
    if readers[conv.output[0]] != 1 or conv.output[0] in outputs:
        return False
    if any(a.name == "training_mode" and a.i for a in bn.attribute):
        return False
    weights = [conv.input[1]] + ([conv.input[2]] if len(conv.input) > 2 and conv.input[2] else [])
    return all(name in values for name in [*weights, *bn.input[1:5]])


def _fold_one(graph: onnx.GraphProto, conv: onnx.NodeProto, bn: onnx.NodeProto,
              values: dict[str, onnx.TensorProto]) -> None:
    gamma, beta, mean, var = (numpy_helper.to_array(values[n]).astype(np.float64) for n in bn.input[1:5])
    eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    scale = gamma / np.sqrt(var + eps)  # (C_out,)
    weight = numpy_helper.to_array(values[conv.input[1]])
    group = next((a.i for a in conv.attribute if a.name == "group"), 1)
    if conv.op_type == "Conv":
        folded = weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))
    else:
        c_in, c_out_g = weight.shape[:2]
        grouped = weight.reshape(group, c_in // group, c_out_g, *weight.shape[2:])  # (g, C_in/g, C_out/g, k...)
        folded = (grouped * scale.reshape(group, 1, c_out_g, *([1] * (weight.ndim - 2)))).reshape(weight.shape)
    bias = (numpy_helper.to_array(values[conv.input[2]]).astype(np.float64)
            if len(conv.input) > 2 and conv.input[2] else np.zeros_like(mean))
    new_bias = (bias - mean) * scale + beta
    dtype = weight.dtype
    w_name, b_name = f"{conv.name}.weight_bn_folded", f"{conv.name}.bias_bn_folded"
    graph.initializer.extend([numpy_helper.from_array(folded.astype(dtype), w_name),
                              numpy_helper.from_array(new_bias.astype(dtype), b_name)])
    values[w_name], values[b_name] = graph.initializer[-2], graph.initializer[-1]
    conv.input[1] = w_name
    if len(conv.input) > 2:
        conv.input[2] = b_name
    else:
        conv.input.append(b_name)


def fuse_pads(model: onnx.ModelProto) -> int:
    """A zero, constant-mode Pad of the spatial axes whose only reader is a Conv moves into the Conv's pads."""
    graph = model.graph
    values = {t.name: t for t in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    drop: set[int] = set()
    for pad in graph.node:
        if pad.op_type != "Pad" or pad.output[0] in outputs:
            continue
        consumers = readers.get(pad.output[0], [])
        spatial = _spatial_pads(pad, values)
        if spatial is None or len(consumers) != 1 or consumers[0].op_type != "Conv":
            continue
        conv = consumers[0]
        if not _add_conv_pads(conv, spatial):
            continue
        conv.input[0] = pad.input[0]
        drop.add(id(pad))
    if drop:
        keep = [n for n in graph.node if id(n) not in drop]
        del graph.node[:]
        graph.node.extend(keep)
    return len(drop)


def _spatial_pads(pad: onnx.NodeProto, values: dict[str, onnx.TensorProto]) -> list[int] | None:
    """[begin..., end...] of the axes after (N, C) when the Pad is zero, constant-mode and leaves N, C alone."""
    mode = next((a.s.decode() for a in pad.attribute if a.name == "mode"), "constant")
    attr = next((list(a.ints) for a in pad.attribute if a.name == "pads"), None)  # opset < 11 keeps them here
    if mode != "constant" or any(a.name == "value" and a.f != 0.0 for a in pad.attribute):
        return None
    if attr is None:
        attr = _pad_input(pad, values)
    if attr is None:
        return None
    rank = len(attr) // 2
    begins, ends = attr[:rank], attr[rank:]
    if rank < 3 or any(begins[:2]) or any(ends[:2]) or any(v < 0 for v in attr):
        return None
    return begins[2:] + ends[2:]


def _pad_input(pad: onnx.NodeProto, values: dict[str, onnx.TensorProto]) -> list[int] | None:
    """Opset >= 11 pads from the constant input 1, when the pad value (input 2) is 0 and no axes (input 3) are set."""
    if len(pad.input) < 2 or pad.input[1] not in values or (len(pad.input) > 3 and pad.input[3]):
        return None
    value = pad.input[2] if len(pad.input) > 2 else ""
    if value and (value not in values or np.any(numpy_helper.to_array(values[value]) != 0)):
        return None
    return [int(v) for v in numpy_helper.to_array(values[pad.input[1]]).reshape(-1)]


def _add_conv_pads(conv: onnx.NodeProto, spatial: list[int]) -> bool:
    auto_pad = next((a.s.decode() for a in conv.attribute if a.name == "auto_pad"), "NOTSET")
    if auto_pad not in ("NOTSET", ""):
        return False
    old = next((a for a in conv.attribute if a.name == "pads"), None)
    current = list(old.ints) if old is not None else [0] * len(spatial)
    if len(current) != len(spatial):
        return False
    merged = [a + b for a, b in zip(current, spatial, strict=True)]
    if old is not None:
        conv.attribute.remove(old)
    conv.attribute.append(helper.make_attribute("pads", merged))
    return True


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    graph = model.graph
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def infer_types(model: onnx.ModelProto, report: NormalizationReport) -> onnx.ModelProto:
    """onnx shape inference; tensors it leaves untyped are typed by ONNX Runtime at session creation."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as err:  # onnx raises InferenceError and plain RuntimeErrors
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        report.shape_inference = f"failed ({reason}); types from ONNX Runtime"
        inferred = model
    typed = {v.name for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
             if v.type.tensor_type.elem_type}
    typed |= {t.name for t in inferred.graph.initializer}
    missing = [o for n in inferred.graph.node for o in n.output if o and o not in typed]
    if missing:
        found = _ort_types(inferred, missing)
        inferred.graph.value_info.extend(helper.make_tensor_value_info(name, elem, None)
                                         for name, elem in found.items())
        report.untyped_tensors = len(missing) - len(found)
        if report.shape_inference == "complete":
            report.shape_inference = f"partial ({len(missing)} tensors typed by ONNX Runtime)"
    return inferred


def _ort_types(model: onnx.ModelProto, names: list[str]) -> dict[str, int]:
    """Element types of `names`, from an ONNX Runtime session on a copy with them as outputs."""
    import onnxruntime as ort

    probe = _copy(model)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in existing)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # a graph ORT cannot load is reported by the quantizer with its own message
        return {}
    found = {}
    for output in session.get_outputs():
        if output.name in names and output.type.startswith("tensor("):
            elem = _ORT_TYPES.get(output.type[len("tensor("):-1])
            if elem is not None:
                found[output.name] = elem
    return found


_ORT_TYPES = {"float": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16, "double": onnx.TensorProto.DOUBLE,
              "int64": onnx.TensorProto.INT64, "int32": onnx.TensorProto.INT32, "int8": onnx.TensorProto.INT8,
              "uint8": onnx.TensorProto.UINT8, "bool": onnx.TensorProto.BOOL}
