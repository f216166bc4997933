"""Static INT8 in ONNX Runtime's fused CPU kernels: QAttention, MatMulIntegerToFloat, QEmbedLayerNormalization.

Why this exists. ONNX Runtime's profiler on all-MiniLM-L6-v2 (CPU EP, `edgepack.runtime.op_profile`) shows that the
QDQ model spends most of its time outside its integer GEMMs: each of its 24 activation QuantizeLinear, 18 SmoothQuant
Muls, 44 Adds, 24 Transposes and the unfused float attention (two MatMuls, Softmax, mask Add per layer) is a separate
kernel launch with its own pass over memory and, on 2 threads, its own thread-pool hand-off. ORT does not fuse
attention in either graph at session creation (our torch export does not match its Attention pattern), and it has no
fusion from QDQ into its quantized attention op. What fuses is `onnxruntime.transformers.optimizer` (offline:
Attention, SkipLayerNormalization, BiasGelu, EmbedLayerNormalization), but onnxruntime.quantization then turns
Attention into QAttention only in *dynamic* mode (a DynamicQuantizeLinear before every op, 7-bit attention weights),
and its static QDQ quantizer has no Attention handler. So the last step is ours: a registry from fused op type to a
handler that writes the integer op with *calibrated* scales (one QuantizeLinear per activation, no range pass at run
time), per-column symmetric int8 weights as onnxruntime's quantizer computes them (`quant_utils` scale rules), and
the SmoothQuant Muls of the plan in front.

The ops written are com.microsoft contrib ops of the CPU EP (x86 and ARM builds, the .ort mobile format included);
QNN HTP, NNAPI and CoreML do not run them: those EPs take the QDQ graph (`quantize.graph: qdq`).

Per layer of a BERT encoder the graph becomes
    [Mul 1/s] -> QuantizeLinear -> QAttention -> QuantizeLinear -> MatMulIntegerToFloat(+bias) -> Sum (residual)
    -> LayerNormalization -> [Mul 1/s] -> QuantizeLinear -> MatMulIntegerToFloat(+bias) -> Gelu -> [Mul 1/s]
    -> QuantizeLinear -> MatMulIntegerToFloat(+bias) -> Sum -> LayerNormalization
(QAttention runs Q K^T, softmax and the probabilities x V in float, per head, inside the op.) The optimizer's
SkipLayerNormalization and BiasGelu are split again (`split_slow_kernels`): their ORT CPU kernels cost more than the
ops they replace. MiniLM, CPU time per run, 2 threads: FP32 27 ms; this graph 9.3 ms (with SkipLayerNormalization and
BiasGelu 12.3 ms); the QDQ graph 12.2 ms; ORT's own fused dynamic INT8 12.6 ms.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgepack.registry import Registry

MS_DOMAIN = "com.microsoft"
#: Ops this module writes, and the float ops it lowers (for tests and the report)
INTEGER_OPS = ("QAttention", "MatMulIntegerToFloat", "QEmbedLayerNormalization")


def fuse_transformer(model_path: Path, out_path: Path) -> dict[str, int]:
    """FP32 -> FP32 with onnxruntime.transformers' BERT fusions (Attention, SkipLayerNormalization, BiasGelu /
    FastGelu, EmbedLayerNormalization); heads and width are read from the graph. Returns the fused-op counts (all 0
    when the graph matches none of ORT's patterns: the lowering then quantizes its MatMuls only)."""
    from onnxruntime.transformers.optimizer import optimize_model

    from edgepack.onnx_files import save_onnx

    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its fusion log is a page of INFO / WARNING lines per model
    try:
        optimized = optimize_model(str(model_path), model_type="bert", num_heads=0, hidden_size=0, opt_level=0,
                                   use_gpu=False)
    finally:
        quiet.setLevel(level)
    model = optimized.model
    _name_nodes(model)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):  # the optimizer adds it only when saving
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    save_onnx(model, out_path)
    counts = optimized.get_fused_operator_statistics()
    return {op: int(n) for op, n in counts.items() if n}


def graph_note(graph: str, mode: str, fused_ops: Mapping[str, int]) -> str:
    """One line for the manifest / report: which INT8 graph was written and which EPs can run it."""
    if graph != "fused":
        return (f"graph qdq ({mode}): QuantizeLinear/DequantizeLinear pairs in the exported graph, for every EP "
                "(QNN HTP, NNAPI, CoreML, CPU)" if mode == "static" else
                f"graph qdq ({mode}): ONNX Runtime's dynamic integer ops on the exported graph (CPU EPs)")
    fused = ", ".join(f"{op} {n}" for op, n in sorted(fused_ops.items())) or "no pattern matched"
    return (f"graph fused ({mode}): onnxruntime.transformers fusions ({fused}) in ONNX Runtime's integer CPU kernels "
            "(QAttention, MatMulIntegerToFloat, QEmbedLayerNormalization: com.microsoft ops of the CPU EP only; "
            "use graph qdq for QNN HTP, NNAPI, CoreML)")


def _name_nodes(model: onnx.ModelProto) -> None:
    """The optimizer leaves some Cast / Constant nodes unnamed; quantization selects nodes by name."""
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_fused_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


# ------------------------------------------------------------------------------------------------ quantization math


def activation_params(low: float, high: float) -> tuple[np.float32, np.uint8]:
    """uint8 asymmetric (scale, zero point) for a calibrated range, as onnxruntime's quantizer computes them."""
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    zero, scale = compute_scale_zp(np.array(low, np.float32), np.array(high, np.float32), np.array(0, np.uint8),
                                   np.array(255, np.uint8), symmetric=False)
    return np.float32(scale), np.uint8(zero)


def weight_per_column(weight: np.ndarray, *, per_channel: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """W (K, N) -> (int8 (K, N), scale (N,) or () per tensor): symmetric in [-127, 127], onnxruntime's
    `quantize_data(symmetric=True)` rule (scale = max|W_n| / 127; an all-zero column gets scale 1)."""
    absmax = np.abs(weight).max(axis=0).astype(np.float32)          # (N,)
    if not per_channel:
        absmax = np.array(absmax.max(), np.float32)                 # ()
    scale = np.where(absmax > 0, absmax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    quantized = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
    return quantized, scale


def table_per_tensor(table: np.ndarray) -> tuple[np.ndarray, np.float32, np.uint8]:
    """uint8 asymmetric per-tensor quantization of a lookup table / LayerNorm vector (what QEmbedLayerNormalization
    takes)."""
    scale, zero = activation_params(float(table.min()), float(table.max()))
    quantized = np.clip(np.round(table / scale) + int(zero), 0, 255).astype(np.uint8)
    return quantized, scale, zero


# ---------------------------------------------------------------------------------------------------- the lowering


@dataclass
class Lowering:
    """State of one rewrite: the float graph's initializers, the calibrated ranges, what was written."""

    initializers: dict[str, onnx.TensorProto]
    ranges: Mapping[str, tuple[float, float]]
    new_initializers: list[onnx.TensorProto] = field(default_factory=list)
    quantized_inputs: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # tensor -> (q, scale, zp)
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    lowered: dict[str, int] = field(default_factory=dict)  # op type written -> count
    per_channel: bool = True  # weight scales per output column (else one per tensor)

    def constant(self, name: str, array: np.ndarray) -> str:
        self.new_initializers.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.initializers[name])

    def quantize_input(self, tensor: str) -> tuple[str, str, str]:
        """QuantizeLinear(tensor) with its calibrated scale, once per tensor; -> (uint8 tensor, scale, zero point)."""
        if tensor not in self.quantized_inputs:
            low, high = self.ranges[tensor]
            scale, zero = activation_params(low, high)
            names = (f"{tensor}/quantized", self.constant(f"{tensor}/scale", np.array(scale, np.float32)),
                     self.constant(f"{tensor}/zero_point", np.array(zero, np.uint8)))
            self.nodes.append(helper.make_node("QuantizeLinear", [tensor, names[1], names[2]], [names[0]],
                                               name=f"{tensor}/QuantizeLinear"))
            self.quantized_inputs[tensor] = names
        return self.quantized_inputs[tensor]

    def emit(self, node: onnx.NodeProto) -> None:
        self.nodes.append(node)
        self.lowered[node.op_type] = self.lowered.get(node.op_type, 0) + 1


#: A handler writes the integer form of one node into the Lowering and returns True, or returns False to leave the
#: node in float (an unsupported variant of the op).
Handler = Callable[[onnx.NodeProto, Lowering], bool]
LOWERINGS: Registry[Handler] = Registry("fused INT8 lowering")


@LOWERINGS.register("Attention")
def _attention(node: onnx.NodeProto, low: Lowering) -> bool:
    """Attention(x, W_qkv (C, 3C), b, mask_index) -> QuantizeLinear + QAttention (per-column int8 W_qkv)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if "qkv_hidden_sizes" in attrs or len(node.input) > 4 or node.input[1] not in low.initializers:
        return False  # QAttention has no qkv_hidden_sizes and no past / attention_bias inputs here
    x, scale, zero = low.quantize_input(node.input[0])
    weight, w_scale = weight_per_column(low.weight(node.input[1]), per_channel=low.per_channel)
    w_name = low.constant(f"{node.input[1]}/int8", weight)
    s_name = low.constant(f"{node.input[1]}/scale", w_scale)
    mask = node.input[3] if len(node.input) > 3 else ""
    keep = {k: v for k, v in attrs.items() if k in ("num_heads", "unidirectional", "mask_filter_value", "scale")}
    low.emit(helper.make_node("QAttention", [x, w_name, node.input[2], scale, s_name, mask, zero], list(node.output),
                              name=f"{node.name}/QAttention", domain=MS_DOMAIN, **keep))
    return True


@LOWERINGS.register("MatMul")
def _matmul(node: onnx.NodeProto, low: Lowering) -> bool:
    """MatMul(x, W (K, N)) -> QuantizeLinear + MatMulIntegerToFloat (per-column int8 W, zero point 0)."""
    if node.input[1] not in low.initializers or len(low.initializers[node.input[1]].dims) != 2:
        return False
    x, scale, zero = low.quantize_input(node.input[0])
    weight, w_scale = weight_per_column(low.weight(node.input[1]), per_channel=low.per_channel)
    w_name = low.constant(f"{node.input[1]}/int8", weight)
    s_name = low.constant(f"{node.input[1]}/scale", w_scale)
    low.emit(helper.make_node("MatMulIntegerToFloat", [x, w_name, scale, s_name, zero], list(node.output),
                              name=f"{node.name}/MatMulIntegerToFloat", domain=MS_DOMAIN))
    return True


@LOWERINGS.register("Gather")
def _gather(node: onnx.NodeProto, low: Lowering) -> bool:
    """Gather(table (V, C), ids) of an embedding the optimizer did not fuse -> Gather(uint8 table) + DequantizeLinear
    (per tensor, as the QDQ graph stores it): only the gathered rows are dequantized."""
    if node.input[0] not in low.initializers or len(low.initializers[node.input[0]].dims) != 2:
        return False
    q, scale, zero = table_per_tensor(low.weight(node.input[0]))
    table = low.constant(f"{node.input[0]}/uint8", q)
    s_name = low.constant(f"{node.input[0]}/scale", np.array(scale, np.float32))
    z_name = low.constant(f"{node.input[0]}/zero_point", np.array(zero, np.uint8))
    rows = f"{node.output[0]}/uint8"
    low.emit(helper.make_node("Gather", [table, node.input[1]], [rows], name=f"{node.name}/uint8",
                              **{a.name: helper.get_attribute_value(a) for a in node.attribute}))
    low.emit(helper.make_node("DequantizeLinear", [rows, s_name, z_name], [node.output[0]],
                              name=f"{node.name}/DequantizeLinear"))
    return True


@LOWERINGS.register("EmbedLayerNormalization")
def _embed_layer_norm(node: onnx.NodeProto, low: Lowering) -> bool:
    """EmbedLayerNormalization -> QEmbedLayerNormalization: word / position / segment tables and LayerNorm gamma /
    beta in uint8 per tensor (the op's only form; onnxruntime's dynamic quantizer writes the same)."""
    inputs = list(node.input) + [""] * (8 - len(node.input))
    if len(node.input) > 8 or not all(inputs[i] in low.initializers for i in (2, 3, 5, 6)):
        return False  # position_ids input, or tables computed at run time
    tables = [2, 3, 4, 5, 6]  # word, position, segment, gamma, beta
    quantized: dict[int, tuple[str, str, str]] = {}
    for i in tables:
        if not inputs[i]:
            continue
        q, scale, zero = table_per_tensor(low.weight(inputs[i]))
        quantized[i] = (low.constant(f"{inputs[i]}/uint8", q),
                        low.constant(f"{inputs[i]}/scale", np.array(scale, np.float32)),
                        low.constant(f"{inputs[i]}/zero_point", np.array(zero, np.uint8)))

    def part(i: int, k: int) -> str:
        return quantized[i][k] if i in quantized else ""

    q_inputs = [inputs[0], inputs[1], part(2, 0), part(3, 0), part(4, 0), part(5, 0), part(6, 0), inputs[7],
                part(2, 1), part(3, 1), part(4, 1), part(5, 1), part(6, 1),
                part(2, 2), part(3, 2), part(4, 2), part(5, 2), part(6, 2)]
    epsilon = {a.name: helper.get_attribute_value(a) for a in node.attribute}.get("epsilon", 1e-12)
    low.emit(helper.make_node("QEmbedLayerNormalization", q_inputs, list(node.output)[:2],
                              name=f"{node.name}/QEmbedLayerNormalization", domain=MS_DOMAIN, epsilon=epsilon))
    return True


def split_slow_kernels(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrite, in place, the fused float ops whose CPU kernels are slower than the ops they fused; returns counts.

    Measured with CPU time per run on (1, 128, 384) / (1, 128, 1536) tensors, ORT 1.32 (scripts/bench_quant.py's op
    profile shows the same in the whole model): SkipLayerNormalization takes 0.25 ms where Add + LayerNormalization
    take 0.04 ms (its kernel normalizes with a scalar loop and a division per element), and BiasGelu 0.18 ms where
    the bias inside MatMulIntegerToFloat's output stage plus Gelu take 0.12 ms. So:
      SkipLayerNormalization(x, skip, gamma, beta, bias) -> [bias into the MatMulIntegerToFloat producing x] Sum(x,
          skip) -> LayerNormalization(gamma, beta)   (a separate bias Add when x comes from another op)
      BiasGelu(x, bias) -> [bias into the MatMulIntegerToFloat producing x] Gelu(x)
    ORT does not fuse them back at session creation (its SkipLayerNormFusion matches Add, not Sum; BiasGeluFusion
    needs a bias Add, gone here). Nodes with more than one output used stay, and SkipLayerNormalization stays in
    graphs below opset 17 (no ONNX LayerNormalization).
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in model.graph.output}
    nodes: list[onnx.NodeProto] = []
    counts = {"SkipLayerNormalization": 0, "BiasGelu": 0}
    has_layer_norm = any(op.domain in ("", "ai.onnx") and op.version >= 17 for op in model.opset_import)

    def add_bias(x: str, bias: str, name: str) -> str:
        """x + bias: folded into the MatMulIntegerToFloat that makes x when only this node reads it."""
        source = producer.get(x)
        if source is not None and source.op_type == "MatMulIntegerToFloat" and readers.get(x) == 1 and \
                x not in outputs and (len(source.input) < 7 or not source.input[6]):
            source.input.extend([""] * (7 - len(source.input)))
            source.input[6] = bias
            return x
        nodes.append(helper.make_node("Add", [x, bias], [f"{name}/bias_out"], name=f"{name}/bias"))
        return f"{name}/bias_out"

    for node in model.graph.node:
        used = [o for o in node.output[1:] if o and (readers.get(o) or o in outputs)]
        if node.op_type == "SkipLayerNormalization" and node.domain == MS_DOMAIN and not used and has_layer_norm:
            eps = {a.name: helper.get_attribute_value(a) for a in node.attribute}.get("epsilon", 1e-12)
            x = add_bias(node.input[0], node.input[4], node.name) if len(node.input) > 4 and node.input[4] \
                else node.input[0]
            # Sum, not Add: ORT's SkipLayerNormFusion matches Add -> LayerNormalization and would put the slow
            # kernel back (it accepts the symbolic batch / sequence axes); Sum of two is the same elementwise add
            nodes.append(helper.make_node("Sum", [x, node.input[1]], [f"{node.name}/sum"], name=f"{node.name}/sum"))
            ln_inputs = [f"{node.name}/sum", node.input[2]] + ([node.input[3]] if len(node.input) > 3 and
                                                                node.input[3] else [])
            nodes.append(helper.make_node("LayerNormalization", ln_inputs, [node.output[0]], name=node.name,
                                          axis=-1, epsilon=eps))
            counts["SkipLayerNormalization"] += 1
        elif node.op_type == "BiasGelu" and node.domain == MS_DOMAIN:
            x = add_bias(node.input[0], node.input[1], node.name)
            nodes.append(helper.make_node("Gelu", [x], list(node.output), name=node.name, domain=MS_DOMAIN))
            counts["BiasGelu"] += 1
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return {k: v for k, v in counts.items() if v}


def lower_to_integer_ops(model: onnx.ModelProto, ranges: Mapping[str, tuple[float, float]], *,
                         nodes: set[str], per_channel: bool = True) -> tuple[onnx.ModelProto, dict[str, int]]:
    """A copy of `model` with each node named in `nodes` (Attention, MatMul with a constant 2-D weight,
    EmbedLayerNormalization) replaced by its integer form; `ranges` holds (low, high) of each lowered node's
    activation input. Returns the model and the count of integer ops written per type.

    Nodes of other types, or variants a handler declines, stay float. Float weights no longer read are dropped.
    """
    low = Lowering({t.name: t for t in model.graph.initializer}, ranges, per_channel=per_channel)
    for node in model.graph.node:
        handler = LOWERINGS.get(node.op_type) if node.name in nodes and node.op_type in LOWERINGS else None
        if handler is None or not handler(node, low):
            low.nodes.append(node)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(low.nodes)
    read = {name for n in low.nodes for name in n.input} | {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in read] + low.new_initializers
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    if not any(op.domain == MS_DOMAIN for op in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    _drop_stale_value_info(out)
    split_slow_kernels(out)
    return out, dict(low.lowered)


def _drop_stale_value_info(model: onnx.ModelProto) -> None:
    """Value infos of tensors that no longer exist (the lowered nodes' float weights) would confuse checkers."""
    produced = {o for n in model.graph.node for o in n.output} | {t.name for t in model.graph.initializer} | {
        i.name for i in model.graph.input}
    keep = [vi for vi in model.graph.value_info if vi.name in produced]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


def weight_node_inputs(model: onnx.ModelProto, nodes: set[str]) -> list[str]:
    """The activation inputs the lowering quantizes (input 0 of each lowerable node in `nodes`): what to calibrate."""
    out: list[str] = []
    for node in model.graph.node:
        if node.name in nodes and node.op_type in ("Attention", "MatMul") and node.input[0] not in out:
            out.append(node.input[0])
    return out


__all__ = ["INTEGER_OPS", "LOWERINGS", "TensorProto", "activation_params", "fuse_transformer", "graph_note",
           "lower_to_integer_ops", "table_per_tensor", "weight_node_inputs", "weight_per_column"]
