"""CNN-grade post-training INT8: cross-layer equalization, learned rounding and bias correction on the ONNX graph.

onnxruntime.quantization rounds each weight to the nearest INT8 step and leaves the rest to the user; Qualcomm
AIMET and Intel NNCF add the techniques below, which ONNX Runtime lacks, so they are written here (on the float
graph, before ORT's quantizer runs; each one is measured in docs/benchmarks.md on EfficientNet-Lite0):

- **Cross-layer equalization** (Nagel et al. 2019, AIMET `equalize_model`): for two weight layers in a row with at
  most a ReLU between them (Conv -> Conv, Conv -> depthwise Conv -> Conv in depthwise-separable blocks), output
  channel c of the first is scaled by 1 / s_c and input channel c of the second by s_c, with
  s_c = sqrt(r1_c / r2_c) (r = the channels' weight ranges), so both layers' per-channel ranges become equal; the
  float function is unchanged because ReLU(x / s) = ReLU(x) / s for s > 0. ReLU6 (Clip 0..6) is not scale
  equivariant: `relu6="replace"` turns it into ReLU first, as AIMET does (the FP32 function changes where an
  activation exceeded 6), `relu6="keep"` leaves those pairs alone.
- **Learned rounding** (AdaRound, Nagel et al. 2020): per layer, the choice of rounding each weight up or down is
  optimised on the calibration set to minimise || W x - W~ x ||^2 (x: the layer's FP32 input), with the rectified
  sigmoid relaxation and the annealed regulariser of the paper; the result is a weight on the same INT8 grid.
- **Float activations** (`float_activations`, mixed precision as AIMET's AMP / NNCF's ignored scope would keep it):
  an activation tensor kept in float, with the layer that computes it (traced back through elementwise
  activations such as ReLU6) and every layer that reads it; ORT's QDQ quantizer puts no Q/DQ on a tensor between
  unquantized nodes. For the one activation whose 8-bit step dominates the error (EfficientNet-Lite0's stem conv
  output, ranked on calibration crops) this removes most of the INT8 error for two small float convolutions.
- **Bias correction** (Nagel et al. 2019, "empirical" form): the mean output error a layer's quantized weights
  cause, E[(W~ - W) * x] per output channel, is subtracted from its bias. E is over the calibration set and every
  output position: the layer is linear, so it is computed exactly (padding included) from the mean input image of
  the layer, accumulated one sample at a time.

The weights written back are already on the INT8 grid ORT's quantizer uses (symmetric, per output channel,
scale = max|w| / 127), so ORT reproduces them exactly: the rounding chosen here is the rounding shipped.

>>> options = CnnOptions(bias_correction=True, rounding="adaround")
>>> prepared, float_reference, report = prepare_cnn(model, feeds, n_samples=64, options=options)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgepack.calibration_data import Feed
from edgepack.errors import BadInputError
from edgepack.reporter import get_reporter

_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm")
_QMAX = 127  # symmetric INT8 weights, as onnxruntime's WeightSymmetric per-channel quantizer
#: AdaRound's rectified sigmoid stretch (zeta, gamma) and regulariser schedule, as in the paper / AIMET.
_ZETA, _GAMMA = 1.1, -0.1
_BETA_START, _BETA_END, _WARMUP = 20.0, 2.0, 0.2
#: Memory for the layer inputs AdaRound keeps per pass over the data (layers are grouped to fit).
_ADAROUND_BYTES = 512 * 2**20
#: Rounds of pairwise equalization (AIMET iterates the pairs of a depthwise-separable triplet the same way).
_CLE_ROUNDS = 3


@dataclass(frozen=True)
class CnnOptions:
    """Which techniques run before ORT's quantizer (recipe `quantize.cnn`)."""

    equalize: bool = False
    relu6: Literal["keep", "replace"] = "keep"
    rounding: Literal["nearest", "adaround"] = "nearest"
    bias_correction: bool = True
    adaround_iterations: int = 300
    adaround_samples: int = 32
    adaround_batch: int = 4
    adaround_regularization: float = 0.01
    seed: int = 0
    #: activation tensors kept in float with their producing and reading layers (`float_activation_nodes`)
    float_activations: tuple[str, ...] = ()
    #: INT4 weights (W4A8) for these layers and for the `int4_largest` largest eligible ones (`cnn_int4`), in
    #: blocks of `int4_block_size` input channels (a smaller power of two where it does not divide the width)
    int4_layers: tuple[str, ...] = ()
    int4_largest: int = 0
    int4_block_size: int = 128
    #: and as many more as add at most this to the INT8 model's 1 - cosine vs FP32 on the budget samples
    #: (`cnn_int4.select_by_budget`)
    int4_max_cosine_rise: float | None = None
    #: matmul-nbits (MatMulNBits; a 1x1 Conv between Transposes) | dequantize (blocked DequantizeLinear + the
    #: float layer) (`cnn_int4._write_matmul_nbits`)
    int4_kernel: Literal["matmul-nbits", "dequantize"] = "matmul-nbits"

    def __post_init__(self) -> None:
        object.__setattr__(self, "float_activations", tuple(self.float_activations))
        object.__setattr__(self, "int4_layers", tuple(self.int4_layers))
        if self.int4_largest < 0:
            raise BadInputError(f"quantize.cnn.int4_largest must be >= 0, got {self.int4_largest}")
        if self.int4_block_size not in (16, 32, 64, 128, 256):
            raise BadInputError(f"quantize.cnn.int4_block_size {self.int4_block_size}: choose 16, 32, 64, 128 or 256")
        if self.int4_kernel not in ("matmul-nbits", "dequantize"):
            raise BadInputError(f"quantize.cnn.int4_kernel {self.int4_kernel!r}: choose matmul-nbits or dequantize")
        for name in ("adaround_iterations", "adaround_samples", "adaround_batch"):
            if getattr(self, name) < 1:
                raise BadInputError(f"quantize.cnn.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def active(self) -> bool:
        return self.equalize or self.bias_correction or self.rounding != "nearest"

    @property
    def int4(self) -> bool:
        return bool(self.int4_layers or self.int4_largest or self.int4_max_cosine_rise is not None)

    def preparation_key(self) -> dict[str, Any]:
        """The options the calibration and the prepared graph depend on (the INT4 pass runs after both)."""
        return {k: v for k, v in asdict(self).items() if not k.startswith("int4_")}


@dataclass
class CnnReport:
    """What each technique did (the quantize manifest's `cnn` entry)."""

    equalized_pairs: int = 0
    relu6_replaced: int = 0
    weight_range_spread: dict[str, float] = field(default_factory=dict)  # before / after CLE (mean max/min ratio)
    rounded_layers: int = 0
    rounding: str = "nearest"
    #: per layer: output MSE on the calibration inputs with nearest rounding vs the learned rounding
    adaround: list[dict[str, Any]] = field(default_factory=list)
    corrected_layers: int = 0
    mean_abs_bias_shift: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


# ---------------------------------------------------------------------------------------------- weight layers


@dataclass(frozen=True)
class WeightLayer:
    """A Conv / ConvTranspose / Gemm whose weight is an initializer: what quantizing its weight needs."""

    node: onnx.NodeProto
    weight: str
    bias: str | None
    axis: int  # the output-channel axis of the weight (ORT's per-channel axis)

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def op_type(self) -> str:
        return self.node.op_type

    def attr(self, name: str, default: Any) -> Any:
        for a in self.node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default


def weight_layers(model: onnx.ModelProto) -> list[WeightLayer]:
    """Every Conv / ConvTranspose / Gemm with an initializer weight (float), in graph order."""
    inits = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type not in _WEIGHT_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if inits[node.input[1]].data_type != onnx.TensorProto.FLOAT or node.input[0] in inits:
            continue
        bias = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            if next((a.i for a in node.attribute if a.name == "transA"), 0):
                continue
            axis = 0 if trans_b else 1
        else:
            axis = 0 if node.op_type == "Conv" else 1
        found.append(WeightLayer(node, node.input[1], bias, axis))
    return found


def channel_scales(weight: np.ndarray, axis: int, *, per_channel: bool) -> np.ndarray:
    """ORT's symmetric INT8 weight scale, max|w| / 127, per output channel (broadcastable to `weight`)."""
    if per_channel:
        moved = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
        absmax = np.abs(moved).max(axis=1)
        shape = [1] * weight.ndim
        shape[axis] = -1
        absmax = absmax.reshape(shape)
    else:
        absmax = np.array(np.abs(weight).max()).reshape([1] * weight.ndim)
    scale = absmax.astype(np.float64) / _QMAX
    return np.where(scale > 0, scale, 1.0)


def round_to_grid(weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Nearest-rounded INT8 weight in float (what ORT's quantizer would produce), shape of `weight`."""
    return (np.clip(np.rint(weight / scale), -_QMAX, _QMAX) * scale).astype(weight.dtype)


#: Elementwise activations a float tensor is traced back through to the layer that computes it.
_ACTIVATIONS = ("Clip", "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh")


def float_activation_nodes(model: onnx.ModelProto, tensors: Sequence[str]) -> list[str]:
    """The nodes to leave unquantized so that each of `tensors` stays float: the node computing it, traced back
    through elementwise activations (a Clip reading a Conv: the Conv too), and every node reading it. A name that
    is no node output or graph input of `model` is a BadInputError with the closest names."""
    from edgepack.quantization.quantize import check_activation_names

    check_activation_names(model, tensors, field="quantize.cnn.float_activations")
    producers = {o: node for node in model.graph.node for o in node.output}
    nodes: list[str] = []
    for tensor in tensors:
        node = producers.get(tensor)
        while node is not None:
            nodes.append(node.name)
            node = producers.get(node.input[0]) if node.op_type in _ACTIVATIONS and node.input else None
        nodes += [n.name for n in model.graph.node if tensor in n.input]
    return list(dict.fromkeys(nodes))


# -------------------------------------------------------------------------------------------------- the driver


def prepare_cnn(model: onnx.ModelProto, calibration_feeds: Callable[[], Iterable[Feed]], *, n_samples: int,
                options: CnnOptions, per_channel: bool = True,
                workdir: Path | None = None) -> tuple[onnx.ModelProto, onnx.ModelProto, CnnReport]:
    """A copy of `model` with equalized, grid-rounded weights and corrected biases; the FP32 model it must
    reproduce (equalized, not rounded: what a layer left in float takes its weights from); what each step did."""
    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    report = CnnReport(rounding=options.rounding)
    layers = weight_layers(prepared)
    if not layers:
        report.notes.append("no Conv / ConvTranspose / Gemm with constant weights: nothing to prepare")
        return prepared, model, report
    if options.equalize:
        equalize(prepared, options, report)
        layers = weight_layers(prepared)
    reference = onnx.ModelProto()
    reference.CopyFrom(prepared)  # FP32 after CLE: what the rounded model must reproduce
    with tempfile.TemporaryDirectory(prefix="edgepack-cnn-", dir=workdir) as tmp:
        reference_path = Path(tmp) / "reference.onnx"
        _save(reference, reference_path)
        inits = {t.name: t for t in prepared.graph.initializer}
        originals = {layer.name: numpy_helper.to_array(inits[layer.weight]).copy() for layer in layers}
        if options.rounding == "adaround":
            learned = adaround(reference_path, layers, originals, calibration_feeds, options=options,
                               per_channel=per_channel, n_samples=n_samples, report=report)
        else:
            learned = {}
        for layer in layers:
            w = originals[layer.name]
            rounded = learned.get(layer.name)
            if rounded is None:
                rounded = round_to_grid(w, channel_scales(w, layer.axis, per_channel=per_channel))
            _set(prepared, inits, layer.weight, rounded)
        report.rounded_layers = len(layers)
        if options.bias_correction:
            correct_biases(prepared, reference_path, layers, originals, calibration_feeds, n_samples=n_samples,
                           report=report)
    return prepared, reference, report


def _save(model: onnx.ModelProto, path: Path) -> Path:
    from edgepack.onnx_files import save_onnx

    return save_onnx(model, path)


def _set(model: onnx.ModelProto, inits: dict[str, onnx.TensorProto], name: str, value: np.ndarray) -> None:
    """Replace initializer `name`'s value; a weight shared by several nodes is refused (each layer rounds its own)."""
    readers = sum(name in node.input for node in model.graph.node)
    tensor = inits[name]
    if readers > 1:
        raise BadInputError(f"weight '{name}' is shared by {readers} nodes; CNN preparation needs one weight per "
                            "layer: turn quantize.cnn off or export the model with untied weights")
    tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))


# ------------------------------------------------------------------------------------------------ running ORT


def _activations(model_path: Path, feeds: Iterable[Feed], names: Sequence[str],
                 visit: Callable[[int, dict[str, np.ndarray]], None], *, limit: int | None = None) -> int:
    """Run `feeds` through ONNX Runtime with `names` as extra outputs; `visit(i, {name: array})` per feed."""
    import onnxruntime as ort

    from edgepack.quantization.calibrators import save_augmented

    model = onnx.load(str(model_path))
    with tempfile.TemporaryDirectory(prefix="edgepack-cnn-acts-") as folder:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(save_augmented(model, list(names), Path(folder))), options,
                                       providers=["CPUExecutionProvider"])
        count = 0
        for index, feed in enumerate(feeds):
            if limit is not None and index >= limit:
                break
            outputs = session.run(list(names), feed)
            visit(index, dict(zip(names, outputs, strict=True)))
            count += 1
        del session
    return count


# -------------------------------------------------------------------------------------------- bias correction


def correct_biases(model: onnx.ModelProto, reference_path: Path, layers: Sequence[WeightLayer],
                   originals: dict[str, np.ndarray], calibration_feeds: Callable[[], Iterable[Feed]], *,
                   n_samples: int, report: CnnReport) -> None:
    """b_o -= E[((W~ - W) * x)_o], E over the calibration samples and output positions (one FP32 pass)."""
    means: dict[str, dict[tuple[int, ...], list[Any]]] = {layer.name: {} for layer in layers}
    inputs = {layer.node.input[0]: layer.name for layer in layers}

    def visit(_: int, acts: dict[str, np.ndarray]) -> None:
        for tensor, layer in inputs.items():
            x = acts[tensor]  # (B, C, ...)
            entry = means[layer].setdefault(tuple(x.shape[1:]), [np.zeros(x.shape[1:]), 0])
            entry[0] += x.sum(axis=0, dtype=np.float64)
            entry[1] += x.shape[0]

    get_reporter().info(f"- bias correction: mean inputs of {len(layers)} weight layers")
    _activations(reference_path, calibration_feeds(), list(inputs), visit, limit=n_samples)
    inits = {t.name: t for t in model.graph.initializer}
    shifts = []
    for layer in layers:
        delta = numpy_helper.to_array(inits[layer.weight]).astype(np.float64) - originals[layer.name]
        shift = _mean_output(layer, delta, means[layer.name])  # (C_out,)
        if shift is None:
            continue
        bias_name = _ensure_bias(model, layer, inits, channels=shift.size)
        bias = numpy_helper.to_array(inits[bias_name]).astype(np.float64)
        _set(model, inits, bias_name, (bias - shift).astype(np.float32))
        shifts.append(float(np.abs(shift).mean()))
    report.corrected_layers = len(shifts)
    report.mean_abs_bias_shift = float(np.mean(shifts)) if shifts else 0.0


def _ensure_bias(model: onnx.ModelProto, layer: WeightLayer, inits: dict[str, onnx.TensorProto], *,
                 channels: int) -> str:
    if layer.bias is not None:
        return layer.bias
    name = f"{layer.name}.bias_corrected"
    tensor = numpy_helper.from_array(np.zeros(channels, np.float32), name)
    model.graph.initializer.append(tensor)
    inits[name] = model.graph.initializer[-1]
    node = layer.node
    while len(node.input) < 2:
        node.input.append("")
    if len(node.input) == 2:
        node.input.append(name)
    else:
        node.input[2] = name
    return name


def _mean_output(layer: WeightLayer, delta: np.ndarray,
                 means: dict[tuple[int, ...], list[Any]]) -> np.ndarray | None:
    """E over samples and output positions of layer(x; delta): the layer is linear in its weight and input."""
    total = sum(count for _, count in means.values())
    if not total:
        return None
    acc = None
    for summed, count in means.values():
        mean_x = summed / count  # (C, ...)
        if layer.op_type == "Conv":
            per_channel = _conv_mean_output(layer, mean_x, delta) * count
        else:
            out = apply_layer(layer, mean_x[None], delta)  # (1, C_out, ...)
            per_channel = out.reshape(out.shape[0], out.shape[1], -1).mean(axis=2)[0] * count
        acc = per_channel if acc is None else acc + per_channel
    return None if acc is None else acc / total


def _conv_mean_output(layer: WeightLayer, mean_x: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Mean over output positions of conv(mean_x; delta), (C_out,), from the mean input under each kernel tap.

    sum_{c, k} delta[o, c, k] * T[c, k], with T[c, k] the mean of the padded input at position p * stride + k *
    dilation over all output positions p: exact (padding included), and a few strided means instead of a
    float64 convolution of every layer (measured 16 s -> under a second on EfficientNet-Lite0).
    """
    import itertools

    kernel = delta.shape[2:]
    dims = len(kernel)
    strides = list(layer.attr("strides", [1] * dims))
    dilations = list(layer.attr("dilations", [1] * dims))
    pads = list(layer.attr("pads", [0] * (2 * dims)))
    padded = np.pad(mean_x, [(0, 0)] + [(pads[i], pads[i + dims]) for i in range(dims)])  # (C, H + pads, ...)
    reach = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    out = [(n - r) // s + 1 for n, r, s in zip(padded.shape[1:], reach, strides, strict=True)]
    taps = np.empty((padded.shape[0], *kernel))  # (C, k...)
    for offset in itertools.product(*(range(k) for k in kernel)):
        window = tuple(slice(o * d, o * d + (n - 1) * s + 1, s)
                       for o, d, n, s in zip(offset, dilations, out, strides, strict=True))
        taps[(slice(None), *offset)] = padded[(slice(None), *window)].reshape(padded.shape[0], -1).mean(axis=1)
    group = int(layer.attr("group", 1))
    c_out, c_in_group = delta.shape[:2]
    grouped = taps.reshape(group, c_in_group, *kernel)  # (g, C_in / g, k...)
    rows = delta.reshape(group, c_out // group, c_in_group, -1)  # (g, C_out / g, C_in / g, K)
    return np.einsum("gock,gck->go", rows, grouped.reshape(group, c_in_group, -1)).reshape(c_out)


def apply_layer(layer: WeightLayer, x: Any, weight: Any) -> Any:
    """The layer's linear part (no bias) on x (B, C, ...) with `weight`: numpy in, numpy out; torch in, torch out."""
    import torch

    as_numpy = isinstance(x, np.ndarray)
    xt = torch.as_tensor(x, dtype=torch.float64 if as_numpy else None)
    wt = torch.as_tensor(weight, dtype=xt.dtype)
    out = _torch_layer(layer, xt, wt)
    return out.numpy() if as_numpy else out


def _torch_layer(layer: WeightLayer, x: Any, w: Any) -> Any:
    import torch
    import torch.nn.functional as F

    if layer.op_type == "Gemm":
        if not layer.attr("transB", 0):
            w = w.t()
        return torch.flatten(x, 1) @ w.t() * float(layer.attr("alpha", 1.0))
    dims = w.ndim - 2
    strides = list(layer.attr("strides", [1] * dims))
    dilations = list(layer.attr("dilations", [1] * dims))
    group = int(layer.attr("group", 1))
    pads = list(layer.attr("pads", [0] * (2 * dims)))
    if layer.attr("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"", ""):
        raise BadInputError(f"{layer.name}: auto_pad is not supported by the CNN preparation; normalise the graph "
                            "(explicit pads) or turn quantize.cnn off")
    if layer.op_type == "Conv":
        conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        # ONNX pads: [begin_1..begin_n, end_1..end_n]; F.pad wants (begin_n, end_n, ..., begin_1, end_1)
        spec = [p for i in reversed(range(dims)) for p in (pads[i], pads[i + dims])]
        return conv(F.pad(x, spec), w, None, strides, 0, dilations, group)
    if any(pads[i] != pads[i + dims] for i in range(dims)):
        raise BadInputError(f"{layer.name}: ConvTranspose with asymmetric pads is not supported by the CNN "
                            "preparation; turn quantize.cnn off")
    conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
    output_padding = list(layer.attr("output_padding", [0] * dims))
    return conv_t(x, w, None, strides, pads[:dims], output_padding, group, dilations)


# ---------------------------------------------------------------------------------------------------- AdaRound


def adaround(reference_path: Path, layers: Sequence[WeightLayer], originals: dict[str, np.ndarray],
             calibration_feeds: Callable[[], Iterable[Feed]], *, options: CnnOptions, per_channel: bool,
             n_samples: int, report: CnnReport) -> dict[str, np.ndarray]:
    """Learned rounding of every layer's weight on its FP32 inputs; layers grouped so inputs fit in memory."""
    import torch

    samples = min(n_samples, options.adaround_samples)
    sizes = _input_bytes(reference_path, layers, calibration_feeds)
    threads = torch.get_num_threads()
    # Small per-step convolutions: one thread is ~10x faster than two fighting over busy cores (measured).
    torch.set_num_threads(1)
    try:
        return _adaround_groups(reference_path, layers, originals, calibration_feeds, options=options,
                                per_channel=per_channel, samples=samples, sizes=sizes, report=report)
    finally:
        torch.set_num_threads(threads)


def _adaround_groups(reference_path: Path, layers: Sequence[WeightLayer], originals: dict[str, np.ndarray],
                     calibration_feeds: Callable[[], Iterable[Feed]], *, options: CnnOptions, per_channel: bool,
                     samples: int, sizes: dict[str, int], report: CnnReport) -> dict[str, np.ndarray]:
    learned: dict[str, np.ndarray] = {}
    for group in _groups(layers, sizes, samples):
        stored: dict[str, list[np.ndarray]] = {layer.node.input[0]: [] for layer in group}

        def keep(_: int, acts: dict[str, np.ndarray], stored: dict[str, list[np.ndarray]] = stored) -> None:
            for name, value in acts.items():
                stored[name].append(value)

        _activations(reference_path, calibration_feeds(), list(stored), keep, limit=samples)
        for layer in get_reporter().track(group, total=len(group), title="learned rounding (AdaRound)"):
            x = np.concatenate(stored[layer.node.input[0]])
            learned[layer.name], entry = _adaround_layer(layer, originals[layer.name], x, options=options,
                                                         per_channel=per_channel)
            report.adaround.append(entry)
        del stored
    return learned


def _input_bytes(reference_path: Path, layers: Sequence[WeightLayer],
                 calibration_feeds: Callable[[], Iterable[Feed]]) -> dict[str, int]:
    sizes: dict[str, int] = {}

    def visit(_: int, acts: dict[str, np.ndarray]) -> None:
        sizes.update({name: value.nbytes for name, value in acts.items()})

    _activations(reference_path, calibration_feeds(), [layer.node.input[0] for layer in layers], visit, limit=1)
    return sizes


def _groups(layers: Sequence[WeightLayer], sizes: dict[str, int], samples: int) -> list[list[WeightLayer]]:
    groups: list[list[WeightLayer]] = [[]]
    used = 0
    for layer in layers:
        need = sizes.get(layer.node.input[0], 0) * samples
        if groups[-1] and used + need > _ADAROUND_BYTES:
            groups.append([])
            used = 0
        groups[-1].append(layer)
        used += need
    return [g for g in groups if g]


def _adaround_layer(layer: WeightLayer, weight: np.ndarray, x: np.ndarray, *, options: CnnOptions,
                    per_channel: bool) -> tuple[np.ndarray, dict[str, Any]]:
    """AdaRound on one layer: V (shape of W) with h(V) in [0, 1] the fraction added to floor(W / s).

    Each step reconstructs a random window of the output (`_PATCH` x `_PATCH` positions of `adaround_batch`
    samples): a convolution is local, so a window of its padded input gives that window of its output exactly,
    and a step costs a 16 x 16 patch instead of a 112 x 112 image.
    """
    import torch

    scale_np = channel_scales(weight, layer.axis, per_channel=per_channel)
    scale = torch.as_tensor(scale_np, dtype=torch.float32)
    w = torch.as_tensor(weight, dtype=torch.float32)
    floor = torch.floor(w / scale)
    rest = (w / scale - floor).clamp(1e-4, 1 - 1e-4)
    # h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1) starts at the fractional part: V = logit of it
    v = torch.log((rest - _GAMMA) / (_ZETA - rest)).clone().requires_grad_(True)
    windows = _Windows(layer, torch.as_tensor(x, dtype=torch.float32), kernel=weight.shape[2:],
                       batch=options.adaround_batch, seed=options.seed)
    nearest = torch.clamp(torch.round(w / scale), -_QMAX, _QMAX) * scale
    optimizer = torch.optim.Adam([v], lr=1e-2)
    iterations = options.adaround_iterations
    for step in range(iterations):
        window, apply = windows.draw()
        with torch.no_grad():
            target = apply(window, w)
        h = torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)
        soft = torch.clamp(floor + h, -_QMAX, _QMAX) * scale
        loss = torch.mean((apply(window, soft) - target) ** 2)
        if step >= _WARMUP * iterations:  # after warm-up, the regulariser pushes every h to 0 or 1
            progress = (step - _WARMUP * iterations) / max(1.0, (1 - _WARMUP) * iterations)
            beta = _BETA_END + 0.5 * (_BETA_START - _BETA_END) * (1 + math.cos(math.pi * progress))
            loss = loss + options.adaround_regularization * torch.sum(1 - torch.abs(2 * h - 1) ** beta)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        hard = (torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA >= 0.5).float()
        learned = torch.clamp(floor + hard, -_QMAX, _QMAX) * scale
        mse_nearest, mse = windows.error(w, nearest), windows.error(w, learned)
    if mse > mse_nearest:  # never ship a rounding worse than nearest on the data it was fitted on
        learned, mse = nearest, mse_nearest
    entry = {"layer": layer.name, "mse_nearest": mse_nearest, "mse_learned": mse,
             "flipped": float((hard != torch.round(rest)).float().mean())}
    return learned.numpy().astype(weight.dtype), entry


#: Output window (positions per spatial axis) one AdaRound step reconstructs.
_PATCH = 16


class _Windows:
    """Random output windows of a layer over its stored inputs, and the function that computes them."""

    def __init__(self, layer: WeightLayer, x: Any, *, kernel: Sequence[int], batch: int, seed: int) -> None:
        import torch
        import torch.nn.functional as F

        self.layer, self.batch = layer, min(batch, x.shape[0])
        self.generator = torch.Generator().manual_seed(seed)
        self.local = layer.op_type == "Conv" and x.ndim >= 3
        if self.local:
            dims = x.ndim - 2
            pads = list(layer.attr("pads", [0] * (2 * dims)))
            spec = [p for i in reversed(range(dims)) for p in (pads[i], pads[i + dims])]
            self.x = F.pad(x, spec)  # (N, C, H + pads, ...): windows of it need no padding
            self.strides = list(layer.attr("strides", [1] * dims))
            dilations = list(layer.attr("dilations", [1] * dims))
            self.reach = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
            self.out = [(n - r) // s + 1 for n, r, s in zip(self.x.shape[2:], self.reach, self.strides, strict=True)]
        else:
            self.x = x

    def _apply(self, window: Any, weight: Any) -> Any:
        if not self.local:
            return _torch_layer(self.layer, window, weight)
        import torch.nn.functional as F

        dims = window.ndim - 2
        conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        return conv(window, weight, None, self.strides, 0, list(self.layer.attr("dilations", [1] * dims)),
                    int(self.layer.attr("group", 1)))

    def draw(self) -> tuple[Any, Any]:
        import torch

        index = torch.randint(0, self.x.shape[0], (self.batch,), generator=self.generator)
        if not self.local:
            return self.x[index], self._apply
        slices = [slice(None), slice(None)]  # batch, channels
        for size, reach, stride in zip(self.out, self.reach, self.strides, strict=True):
            length = min(_PATCH, size)
            start = int(torch.randint(0, size - length + 1, (1,), generator=self.generator))
            slices.append(slice(start * stride, (start + length - 1) * stride + reach))
        return self.x[tuple(slices)][index], self._apply  # slice (a view) first: only the window is copied

    def error(self, reference_weight: Any, weight: Any) -> float:
        """Output MSE over (up to 8 of) the stored samples, whole outputs."""
        import torch

        with torch.no_grad():
            x = self.x[:8]
            return float(torch.mean((self._apply(x, weight) - self._apply(x, reference_weight)) ** 2))


# ------------------------------------------------------------------------------------- cross-layer equalization


def equalize(model: onnx.ModelProto, options: CnnOptions, report: CnnReport) -> None:
    """Scale channels between consecutive weight layers (at most a ReLU between) so their ranges are equal."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    if options.relu6 == "replace":
        report.relu6_replaced = _relu6_to_relu(model, inits)
    pairs = _equalizable_pairs(model)
    report.weight_range_spread["before"] = _spread(model, pairs)
    for _ in range(_CLE_ROUNDS):  # a layer in two pairs (expand -> depthwise -> project) converges in a few rounds
        for first, second in pairs:
            _equalize_pair(model, inits, first, second)
    report.equalized_pairs = len(pairs)
    report.weight_range_spread["after"] = _spread(model, pairs)


def _relu6_to_relu(model: onnx.ModelProto, inits: dict[str, onnx.TensorProto]) -> int:
    count = 0
    for node in model.graph.node:
        if node.op_type == "Clip" and _clip_bounds(node, inits) == (0.0, 6.0):
            del node.input[1:]
            node.op_type = "Relu"
            del node.attribute[:]
            count += 1
    return count


def _clip_bounds(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[float, float] | None:
    def value(index: int, attr: str, default: float) -> float | None:
        if len(node.input) > index and node.input[index]:
            if node.input[index] not in inits:
                return None
            return float(numpy_helper.to_array(inits[node.input[index]]))
        return next((a.f for a in node.attribute if a.name == attr), default)

    low, high = value(1, "min", -math.inf), value(2, "max", math.inf)
    return None if low is None or high is None else (low, high)


def _equalizable_pairs(model: onnx.ModelProto) -> list[tuple[WeightLayer, WeightLayer]]:
    """(first, second) Conv pairs: first's output, through at most one ReLU, is read only by second."""
    layers = {layer.node.input[0]: layer for layer in weight_layers(model) if layer.op_type == "Conv"}
    by_name = {layer.name: layer for layer in weight_layers(model) if layer.op_type == "Conv"}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    pairs = []
    for first in by_name.values():
        tensor = first.node.output[0]
        nxt = readers.get(tensor, [])
        if len(nxt) == 1 and nxt[0].op_type == "Relu" and tensor not in outputs:
            tensor = nxt[0].output[0]
            nxt = readers.get(tensor, [])
        if len(nxt) != 1 or tensor in outputs or tensor not in layers:
            continue
        second = layers[tensor]
        if _pair_shapes_fit(model, first, second):
            pairs.append((first, second))
    return pairs


def _pair_shapes_fit(model: onnx.ModelProto, first: WeightLayer, second: WeightLayer) -> bool:
    inits = {t.name: t for t in model.graph.initializer}
    w1 = inits[first.weight].dims
    w2 = inits[second.weight].dims
    group1, group2 = int(first.attr("group", 1)), int(second.attr("group", 1))
    if group1 != 1 and group1 != w1[0]:
        return False  # grouped (not depthwise) first layer: its output channels are not independent rows
    depthwise2 = group2 == w2[0] and w2[1] == 1
    return (group2 == 1 and w2[1] == w1[0]) or (depthwise2 and w2[0] == w1[0])


def _equalize_pair(model: onnx.ModelProto, inits: dict[str, onnx.TensorProto], first: WeightLayer,
                   second: WeightLayer) -> None:
    w1 = numpy_helper.to_array(inits[first.weight]).astype(np.float64)  # (C, ...)
    w2 = numpy_helper.to_array(inits[second.weight]).astype(np.float64)  # (C2, C, ...) or depthwise (C, 1, ...)
    depthwise2 = int(second.attr("group", 1)) == w2.shape[0] and w2.shape[1] == 1
    r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)  # (C,)
    r2 = (np.abs(w2).reshape(w2.shape[0], -1).max(axis=1) if depthwise2
          else np.abs(w2).transpose(1, 0, *range(2, w2.ndim)).reshape(w2.shape[1], -1).max(axis=1))  # (C,)
    s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.maximum(r2, 1e-12)), 1.0)  # (C,)
    shape1 = (-1,) + (1,) * (w1.ndim - 1)
    _set(model, inits, first.weight, (w1 / s.reshape(shape1)).astype(np.float32))
    if first.bias is not None:
        b1 = numpy_helper.to_array(inits[first.bias]).astype(np.float64)
        _set(model, inits, first.bias, (b1 / s).astype(np.float32))
    shape2 = (-1,) + (1,) * (w2.ndim - 1) if depthwise2 else (1, -1) + (1,) * (w2.ndim - 2)
    # a depthwise second layer keeps its bias: its output channel c sees x_c / s_c times s_c
    _set(model, inits, second.weight, (w2 * s.reshape(shape2)).astype(np.float32))


def _spread(model: onnx.ModelProto, pairs: Sequence[tuple[WeightLayer, WeightLayer]]) -> float:
    """Mean over the first layers of the pairs of max / min per-channel weight range (1 = perfectly equal)."""
    inits = {t.name: t for t in model.graph.initializer}
    ratios = []
    for first, _ in pairs:
        w = numpy_helper.to_array(inits[first.weight])
        r = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
        r = r[r > 0]
        if r.size:
            ratios.append(float(r.max() / r.min()))
    return float(np.mean(ratios)) if ratios else 1.0
