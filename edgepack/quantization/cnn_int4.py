"""INT4 weights for the largest layers of a static INT8 CNN (W4A8 mixed precision, `quantize.cnn.int4_*`).

After ORT's quantizer has written the INT8 QDQ model, the chosen layers' weights are replaced by 4-bit codes in
blocks along the reduction axis (input channels), each block with its own scale and zero point, read by an
opset-21 DequantizeLinear (`axis`, `block_size`); activations stay INT8. Which layers: `int4_layers` (node names)
and / or the `int4_largest` largest eligible ones, largest first (in MobileNet-class networks the classifier and
the last stages' 1x1 convolutions hold most of the bytes; their single-layer INT4 sensitivity on EfficientNet-Lite0
is within a factor of two of each other, docs/benchmarks.md). Eligible: 1x1 Conv with group 1, Gemm, MatMul with a
constant weight that ORT quantized; depthwise and k x k convolutions stay INT8 (small, and their blocks would mix
kernel taps).

Rounding is GPTQ (`blockwise.quantize_gptq`: the second moment X^T X of each layer's input from the FP32
reference graph on the calibration samples), then bias correction: the mean output error the 4-bit weight causes,
E[x] (W4 - W), is subtracted from the layer's bias (the bias becomes a float initializer: the layer no longer runs
as an integer kernel, so its INT32 bias form has no use).

Why our own: onnxruntime.quantization's QDQ quantizer writes INT4 weights by round-to-nearest only, with one
`BlockSize` for every weight and the blocks along the per-channel (output) axis; nothing in it picks layers by
size, rounds with calibration data or corrects the bias.

How a chosen layer runs (`int4_kernel`): `matmul-nbits` (for the CPU EP) makes it ONNX Runtime's 4-bit GEMM
(com.microsoft MatMulNBits; a stride-1 1x1 Conv becomes Transpose -> MatMulNBits -> Transpose, as ONNX Runtime
has no 4-bit Conv kernel); `dequantize` keeps it standard ONNX for NPU EPs: the blocked DequantizeLinear above
and the float layer. On the CPU EP the dequantize form is not fused into QLinearConv: the weight is dequantized
at every run, and on EfficientNet-Lite0 with its 6 largest layers at INT4 a run took 9.0 ms against 3.2 ms for
the MatMulNBits form (and 2.4 ms all-INT8; same codes, same logits; AMD EPYC Zen 5, 2 threads, three
interleaved passes in one process; docs/benchmarks.md has the search's figures). MatMulNBits' accuracy_level
stays 0 (float compute): level 4 (int8 activations) measured no faster on these shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgepack.calibration_data import Feed
from edgepack.errors import BadInputError
from edgepack.quantization.blockwise import BlockSpec, pack, quantize_gptq

#: opset and IR version that carry 4-bit tensors and blocked DequantizeLinear
INT4_OPSET = 21
INT4_IR_VERSION = 10
#: block sizes tried, largest first, when the configured one does not divide a layer's input width
_BLOCKS = (256, 128, 64, 32, 16)


@dataclass(frozen=True)
class Int4Target:
    """A weight layer of the QDQ model whose weight is an INT8 DequantizeLinear of a constant."""

    node: onnx.NodeProto
    dq: onnx.NodeProto  # the weight's DequantizeLinear
    weight: str  # the FP32 initializer of the layer in the reference graph
    input: str  # the layer's activation input (in the reference graph's names)
    transposed: bool  # weight stored (N, K) (Conv, Gemm transB=1) rather than (K, N)
    shape: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def width(self) -> int:
        """K: the reduction width (input channels)."""
        return self.shape[1] if self.transposed else self.shape[0]

    @property
    def elements(self) -> int:
        return int(np.prod(self.shape))


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def eligible_layers(qdq: onnx.ModelProto, reference: onnx.ModelProto) -> list[Int4Target]:
    """The layers INT4 can take, largest weight first (ties in graph order)."""
    producers = {o: n for n in qdq.graph.node for o in n.output}
    qinits = {t.name for t in qdq.graph.initializer}
    ref_nodes = {n.name: n for n in reference.graph.node}
    ref_inits = {t.name: t for t in reference.graph.initializer}
    found = []
    for node in qdq.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        dq = producers.get(node.input[1])
        ref = ref_nodes.get(node.name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in qinits or ref is None:
            continue
        if ref.input[1] not in ref_inits:
            continue
        shape = tuple(ref_inits[ref.input[1]].dims)
        if node.op_type == "Conv":
            if _attr(node, "group", 1) != 1 or len(shape) != 4 or shape[2:] != (1, 1):
                continue
            transposed = True
        elif node.op_type == "Gemm":
            if _attr(node, "transA", 0) or len(shape) != 2:
                continue
            transposed = bool(_attr(node, "transB", 0))
        else:
            if len(shape) != 2:
                continue
            transposed = False
        target = Int4Target(node, dq, ref.input[1], ref.input[0], transposed, shape)
        if block_for(target.width, _BLOCKS[0]) is None:
            continue
        found.append(target)
    order = {id(t): i for i, t in enumerate(found)}
    return sorted(found, key=lambda t: (-t.elements, order[id(t)]))


def block_for(width: int, block_size: int) -> int | None:
    """The largest power of two <= block_size (and >= 16) that divides `width`, or None."""
    return next((b for b in _BLOCKS if b <= block_size and width % b == 0), None)


def choose_layers(targets: Sequence[Int4Target], *, names: Sequence[str], largest: int) -> list[Int4Target]:
    """`names` (each must be an eligible layer) plus the `largest` largest eligible layers."""
    by_name = {t.name: t for t in targets}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        listed = ", ".join(t.name for t in targets[:8]) or "none"
        raise BadInputError(f"quantize.cnn.int4_layers: {', '.join(unknown)} is not a quantized 1x1 Conv / Gemm / "
                            f"MatMul of this model; eligible (largest first): {listed}")
    chosen = {t.name: t for t in targets[:largest]}
    chosen.update({n: by_name[n] for n in names})
    return sorted(chosen.values(), key=lambda t: -t.elements)


def _moments(reference_path: Path, targets: Sequence[Int4Target], feeds: Iterable[Feed],
             n_samples: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per layer input: E[x x^T] (K, K) and E[x] (K,) over the calibration samples and spatial positions."""
    from edgepack.quantization.cnn import _activations

    names = sorted({t.input for t in targets})
    second: dict[str, np.ndarray] = {}
    first: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}

    def visit(_: int, acts: dict[str, np.ndarray]) -> None:
        for name, x in acts.items():
            x = np.asarray(x, np.float64)
            flat = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1]) if x.ndim == 4 else x.reshape(-1, x.shape[-1])
            second[name] = second.get(name, 0) + flat.T @ flat
            first[name] = first.get(name, 0) + flat.sum(0)
            rows[name] = rows.get(name, 0) + flat.shape[0]

    _activations(reference_path, feeds, names, visit, limit=n_samples)
    return ({n: (second[n] / rows[n]).astype(np.float32) for n in names},
            {n: (first[n] / rows[n]).astype(np.float32) for n in names})


@dataclass
class _Rounded:
    q: Any  # blockwise.BlockQuantized, codes (N, K)
    bias: np.ndarray | None
    record: dict[str, Any]


class Int4Builder:
    """The INT8 QDQ model and its FP32 reference; builds the model with any set of layers at INT4.

    Each layer is GPTQ-rounded once (input moments from one FP32 pass over the calibration samples), so trying
    many sets (the budget's sensitivity ranking) costs a graph rewrite each, not a rounding."""

    def __init__(self, qdq_path: Path, reference_path: Path, calibration_feeds: Callable[[], Iterable[Feed]], *,
                 block_size: int, n_samples: int, bias_correction: bool, kernel: str = "matmul-nbits") -> None:
        self.reference_path = reference_path
        self.kernel = kernel
        self.reference = onnx.load(str(reference_path))
        self.qdq = onnx.load(str(qdq_path))
        self.targets = eligible_layers(self.qdq, self.reference)
        if self.targets:
            self.qdq = _to_int4_opset(self.qdq)
            self.targets = eligible_layers(self.qdq, self.reference)
        self.calibration_feeds = calibration_feeds
        self.block_size, self.n_samples, self.bias_correction = block_size, n_samples, bias_correction
        self._rounded: dict[str, _Rounded] = {}

    def _round(self, chosen: Sequence[Int4Target]) -> None:
        todo = [t for t in chosen if t.name not in self._rounded]
        if not todo:
            return
        hessians, means = _moments(self.reference_path, todo, self.calibration_feeds(), self.n_samples)
        ref_inits = {t.name: t for t in self.reference.graph.initializer}
        inits = {t.name: t for t in self.qdq.graph.initializer}
        producers = {o: n for n in self.qdq.graph.node for o in n.output}
        for target in todo:
            w = numpy_helper.to_array(ref_inits[target.weight]).astype(np.float32)
            kn = w.reshape(w.shape[0], -1).T if target.transposed else w  # (K, N)
            block = block_for(target.width, self.block_size)
            assert block is not None  # eligible_layers kept only widths some block divides
            second = hessians[target.input]
            q = quantize_gptq(kn, second, BlockSpec(bits=4, block_size=block, symmetric=False))
            delta = q.dequantize() - kn  # (K, N)
            shift = means[target.input] @ delta if self.bias_correction else None
            err = float(np.einsum("kn,kl,ln->", delta, second, delta)
                        / max(float(np.einsum("kn,kl,ln->", kn, second, kn)), 1e-30))
            self._rounded[target.name] = _Rounded(q, _bias(target, producers, inits, ref_inits, shift), {
                "layer": target.name, "elements": target.elements, "block_size": block,
                "relative_output_error": round(err, 6)})

    def build(self, names: Sequence[str]) -> onnx.ModelProto:
        """A copy of the QDQ model with the layers `names` at INT4 (each must be eligible)."""
        model = onnx.ModelProto()
        model.CopyFrom(self.qdq)
        chosen = choose_layers(eligible_layers(model, self.reference), names=names, largest=0)
        self._round(chosen)
        inits = {t.name: t for t in model.graph.initializer}
        for target in chosen:
            rounded = self._rounded[target.name]
            if self.kernel == "matmul-nbits" and _plain_product(target.node):
                _write_matmul_nbits(model, inits, target, rounded.q, rounded.bias)
            else:
                q = rounded.q
                _write_weight(model, inits, target, q.codes, q.scales, q.zeros)
                if rounded.bias is not None:
                    _set_bias(model, inits, target.node, rounded.bias)
        _drop_unused(model)
        return model

    def records(self, names: Sequence[str]) -> list[dict[str, Any]]:
        return [self._rounded[n].record for n in sorted(names, key=lambda n: -self._elements(n))]

    def _elements(self, name: str) -> int:
        return next(t.elements for t in self.targets if t.name == name)


def select_by_budget(builder: Int4Builder, forced: Sequence[str], score: Callable[[onnx.ModelProto], float], *,
                     max_cosine_rise: float, min_share: float = 0.01) -> tuple[list[str], dict[str, Any]]:
    """The most layers at INT4 (beyond `forced`) whose model's 1 - cosine vs FP32 (`score`) is at most
    `max_cosine_rise` above the all-INT8 model's.

    Each eligible layer holding at least `min_share` of the eligible weights is put alone at INT4 (with `forced`)
    and scored; layers are ranked by score rise per weight (the bytes a layer saves for the error it costs:
    EfficientNet-Lite0's expand convs are cheap, its project convs, which feed the residual sums, are not), and the
    longest prefix of that ranking within the budget is found by bisection (scores rise along the ranking).
    The score is on calibration samples, which GPTQ's statistics came from: it reads optimistic (EfficientNet-Lite0:
    a rise of 0.0012 there was 0.006 on held-out crops), so the budget is a knob to search, judged held out."""
    total = sum(t.elements for t in builder.targets)
    candidates = [t for t in builder.targets if t.name not in forced and t.elements >= min_share * total]
    int8 = score(builder.build([]))
    base = score(builder.build(forced)) if forced else int8
    rise = {t.name: max(score(builder.build([*forced, t.name])) - base, 0.0) for t in candidates}
    ranked = sorted(candidates, key=lambda t: (rise[t.name] / t.elements, -t.elements))
    low, high, scores = 0, len(ranked), {0: base}  # prefix `low` is within the budget (or nothing is)
    while low < high:
        mid = (low + high + 1) // 2
        scores[mid] = score(builder.build([*forced, *(t.name for t in ranked[:mid])]))
        if scores[mid] - int8 <= max_cosine_rise:
            low = mid
        else:
            high = mid - 1
    chosen = [*forced, *(t.name for t in ranked[:low])]
    return chosen, {"max_cosine_rise": max_cosine_rise, "int8_score": int8, "score": scores[low],
                    "within_budget": scores[low] - int8 <= max_cosine_rise,
                    "sensitivity": {t.name: float(f"{rise[t.name]:.4g}") for t in ranked},
                    "scored_models": 2 + len(candidates) + len(scores) - 1}


def apply_int4(qdq_path: Path, reference_path: Path, calibration_feeds: Callable[[], Iterable[Feed]], *,
               names: Sequence[str], largest: int, block_size: int, n_samples: int, bias_correction: bool,
               out_path: Path, max_cosine_rise: float | None = None,
               score: Callable[[onnx.ModelProto], float] | None = None,
               kernel: str = "matmul-nbits") -> dict[str, Any]:
    """Rewrite the chosen layers of the QDQ model at `qdq_path` with GPTQ-rounded INT4 weights; save at `out_path`.

    `reference_path`: the FP32 graph the QDQ model was quantized from (same node names; its weights are the ones
    rounded and its activations give the layers' input statistics). Chosen: `names`, the `largest` largest eligible
    layers, and with `max_cosine_rise` (and `score`: 1 - cosine vs FP32 of a model on calibration samples) as
    many more as that budget allows (`select_by_budget`)."""
    builder = Int4Builder(qdq_path, reference_path, calibration_feeds, block_size=block_size, n_samples=n_samples,
                          bias_correction=bias_correction, kernel=kernel)
    forced = [t.name for t in choose_layers(builder.targets, names=names, largest=largest)]
    budget = None
    if max_cosine_rise is not None and builder.targets:
        if score is None:
            raise BadInputError("quantize.cnn.int4_max_cosine_rise needs samples to score on: set "
                                "quantize.budget_samples")
        forced, budget = select_by_budget(builder, forced, score, max_cosine_rise=max_cosine_rise)
    if not forced:
        return {"layers": [], "budget": budget,
                "note": "no layer at INT4" if builder.targets else
                "no eligible layer (1x1 Conv / Gemm / MatMul with an INT8 weight)"}
    onnx.save_model(builder.build(forced), str(out_path))
    records = builder.records(forced)
    return {"layers": records, "int4_elements": sum(r["elements"] for r in records), "block_size": block_size,
            "rounding": "gptq", "bias_correction": bias_correction, "budget": budget, "kernel": kernel}


def _write_weight(model: onnx.ModelProto, inits: dict[str, onnx.TensorProto], target: Int4Target,
                  codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> None:
    """The weight's DequantizeLinear reads uint4 codes in blocks along the input axis (a fresh set of inputs)."""
    n, k = codes.shape
    blocks = scales.shape[1]
    if target.transposed:  # (N, K, 1, 1) / (N, K): blocks on axis 1
        code_arr, scale_arr, zero_arr = codes, scales, zeros
        tail = (1,) * (len(target.shape) - 2)
        code_shape, scale_shape, axis = target.shape, (n, blocks, *tail), 1
    else:  # (K, N): blocks on axis 0
        code_arr, scale_arr, zero_arr = codes.T, scales.T, zeros.T
        code_shape, scale_shape, axis = (k, n), (blocks, n), 0
    base = target.dq.input[0] + "_int4"
    new = [_uint4(base, code_arr, code_shape),
           numpy_helper.from_array(np.ascontiguousarray(scale_arr).reshape(scale_shape).astype(np.float32),
                                   base + "_scale"),
           _uint4(base + "_zero_point", zero_arr, scale_shape)]
    for tensor in new:
        model.graph.initializer.append(tensor)
        inits[tensor.name] = tensor
    target.dq.ClearField("input")
    target.dq.input.extend([t.name for t in new])
    target.dq.ClearField("attribute")
    target.dq.attribute.extend([helper.make_attribute("axis", axis),
                                helper.make_attribute("block_size", int(k // blocks))])


def _uint4(name: str, values: np.ndarray, shape: Sequence[int]) -> onnx.TensorProto:
    """A UINT4 initializer, two codes per byte, low nibble first (ONNX's packed raw_data layout)."""
    return helper.make_tensor(name, onnx.TensorProto.UINT4, list(shape), pack(np.asarray(values).ravel(), 4).tobytes(),
                              raw=True)


def _bias(target: Int4Target, producers: dict[str, onnx.NodeProto], inits: dict[str, onnx.TensorProto],
          ref_inits: dict[str, onnx.TensorProto], shift: np.ndarray | None) -> np.ndarray | None:
    """The layer's float bias: the reference's FP32 bias minus the INT4 mean output error (`shift`); None for a
    layer without bias and without correction."""
    node = target.node
    has_bias = node.op_type != "MatMul" and len(node.input) > 2 and bool(node.input[2])
    if not has_bias and shift is None:
        return None
    bias = (_reference_bias(node.input[2], producers, inits, ref_inits, target) if has_bias
            else np.zeros(target.shape[0] if target.transposed else target.shape[1], np.float32))
    return bias if shift is None else (bias - shift).astype(np.float32)


def _set_bias(model: onnx.ModelProto, inits: dict[str, onnx.TensorProto], node: onnx.NodeProto,
              bias: np.ndarray) -> None:
    name = f"{node.name}_int4_bias"
    tensor = numpy_helper.from_array(bias.astype(np.float32), name)
    model.graph.initializer.append(tensor)
    inits[name] = tensor
    if len(node.input) < 3:
        node.input.append(name)
    else:
        node.input[2] = name


def _plain_product(node: onnx.NodeProto) -> bool:
    """A MatMul, a Gemm that is one (alpha = beta = 1), or a 1x1 Conv that is one per pixel (stride 1, no
    padding): ONNX Runtime's MatMulNBits computes it."""
    if node.op_type == "MatMul":
        return True
    if node.op_type == "Conv":
        return (all(s == 1 for s in _attr(node, "strides", [1, 1])) and not any(_attr(node, "pads", [0] * 4))
                and _attr(node, "auto_pad", b"NOTSET") in (b"NOTSET", b"VALID"))
    return node.op_type == "Gemm" and _attr(node, "alpha", 1.0) == 1.0 and _attr(node, "beta", 1.0) == 1.0


def _write_matmul_nbits(model: onnx.ModelProto, inits: dict[str, onnx.TensorProto], target: Int4Target,
                        q: Any, bias: np.ndarray | None) -> None:
    """The Gemm / MatMul / 1x1 Conv becomes com.microsoft MatMulNBits (its bias input takes the float bias):
    ONNX Runtime's 4-bit GEMM kernel, instead of dequantizing the weight at every run. A 1x1 Conv reads its
    (N, C, H, W) input as (N, H, W, C) rows: Transpose -> MatMulNBits -> Transpose back (there is no 4-bit Conv
    kernel in ONNX Runtime; on 7x7 / 14x14 maps the two transposes cost far less than the per-run dequantize).
    accuracy_level 0 (float compute): 4 (int8 activations in the kernel) measured no faster on these shapes."""
    from edgepack.quantization.blockwise import matmul_nbits_arrays

    arrays = matmul_nbits_arrays(q)
    base = target.dq.input[0] + "_int4"
    names = {"B": base, "scales": base + "_scale", "zero_points": base + "_zero_point"}
    for key, name in names.items():
        tensor = numpy_helper.from_array(arrays[key], name)
        model.graph.initializer.append(tensor)
        inits[name] = tensor
    conv = target.node.op_type == "Conv"
    rows, out = target.node.input[0], target.node.output[0]
    nodes = []
    if conv:
        rows, out = f"{target.name}_nhwc", f"{target.name}_nhwc_out"
        nodes.append(helper.make_node("Transpose", [target.node.input[0]], [rows], name=f"{target.name}_to_nhwc",
                                      perm=[0, 2, 3, 1]))
    inputs = [rows, *names.values()]
    if bias is not None:
        bias_name = f"{target.name}_int4_bias"
        model.graph.initializer.append(numpy_helper.from_array(bias.astype(np.float32), bias_name))
        inputs += ["", bias_name]  # g_idx unused
    n, k = q.codes.shape
    nodes.append(helper.make_node("MatMulNBits", inputs, [out], name=target.name, domain="com.microsoft", K=k, N=n,
                                  bits=4, block_size=q.spec.block_size, accuracy_level=0))
    if conv:
        nodes.append(helper.make_node("Transpose", [out], [target.node.output[0]], name=f"{target.name}_to_nchw",
                                      perm=[0, 3, 1, 2]))
    index = list(model.graph.node).index(target.node)
    model.graph.node.remove(target.node)
    for offset, node in enumerate(nodes):
        model.graph.node.insert(index + offset, node)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _reference_bias(current: str, producers: dict[str, onnx.NodeProto], inits: dict[str, onnx.TensorProto],
                    ref_inits: dict[str, onnx.TensorProto], target: Int4Target) -> np.ndarray:
    """The FP32 bias of the layer: the reference graph's (not the INT8-corrected one the QDQ model carries)."""
    dq = producers.get(current)
    source = dq.input[0] if dq is not None and dq.op_type == "DequantizeLinear" else current
    for name in (source.removesuffix("_quantized"), current):
        if name in ref_inits:
            return numpy_helper.to_array(ref_inits[name]).astype(np.float32)
    if current in inits:
        return numpy_helper.to_array(inits[current]).astype(np.float32)
    raise BadInputError(f"quantize.cnn.int4: the bias of {target.name} ({current}) is neither an initializer nor "
                        "a DequantizeLinear of one; drop the layer from int4_layers")


def _to_int4_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model at opset 21 (onnx's version converter: ReduceMean's axes become an input, ...), IR version 10."""
    from onnx import version_converter

    from edgepack.exporters.normalize import default_opset

    if default_opset(model) < INT4_OPSET:
        model = version_converter.convert_version(model, INT4_OPSET)
    model.ir_version = max(model.ir_version, INT4_IR_VERSION)
    return model


def _drop_unused(model: onnx.ModelProto) -> None:
    """Remove nodes nothing reads (the replaced biases' DequantizeLinear) and initializers nothing reads."""
    outputs = {o.name for o in model.graph.output}
    while True:
        used = {i for n in model.graph.node for i in n.input} | outputs
        dead = [n for n in model.graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            model.graph.node.remove(node)
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
