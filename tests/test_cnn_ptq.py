"""CNN-grade PTQ on a tiny depthwise-separable CNN: each technique's measured error reduction, and calibrators that
stay sound on ReLU6 outputs. Errors are measured against FP32 on held-out inputs (not the calibration ones)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgepack.exporters.normalize import normalize_model
from edgepack.quantization.calibrators import CALIBRATORS, make_calibrator
from edgepack.quantization.cnn import (
    CnnOptions,
    CnnReport,
    channel_scales,
    equalize,
    prepare_cnn,
    round_to_grid,
    weight_layers,
)
from edgepack.quantization.quantize import QuantizeOptions, quantize_static
from tests.tiny_models import make_mobilenet


def smooth_images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(n, 3, 8, 8)).astype(np.float32)
    return [np.repeat(np.repeat(c[None], 4, axis=2), 4, axis=3) for c in coarse]  # (1, 3, 32, 32) each


CALIBRATION, HELD_OUT = smooth_images(32, 0), smooth_images(16, 1)


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory) -> onnx.ModelProto:
    """TinyMobileNet exported and normalised (BatchNorm folded: wide per-channel weight ranges, as in real nets)."""
    path = tmp_path_factory.mktemp("mobilenet") / "model.onnx"
    torch.onnx.export(make_mobilenet(), torch.from_numpy(CALIBRATION[0]), str(path), input_names=["pixel_values"],
                      output_names=["logits"], opset_version=17, dynamo=False)
    model, _ = normalize_model(onnx.load(str(path)))
    return model


def outputs(model: onnx.ModelProto, feeds: list[np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"pixel_values": x})[0] for x in feeds])  # (N, 10)


def error(model: onnx.ModelProto, reference: np.ndarray) -> float:
    """Mean squared logit error against FP32 on the held-out inputs."""
    return float(np.mean((outputs(model, HELD_OUT) - reference) ** 2))


def calibration():
    return ({"pixel_values": x} for x in CALIBRATION)


def nearest_rounded(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every weight rounded to ORT's per-channel INT8 grid, nothing else (the weight error ORT ships)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    inits = {t.name: t for t in copy.graph.initializer}
    for layer in weight_layers(copy):
        w = numpy_helper.to_array(inits[layer.weight])
        inits[layer.weight].CopyFrom(numpy_helper.from_array(
            round_to_grid(w, channel_scales(w, layer.axis, per_channel=True)), layer.weight))
    return copy


def test_bias_correction_removes_most_of_the_weight_rounding_error(mobilenet):
    reference = outputs(mobilenet, HELD_OUT)
    nearest = error(nearest_rounded(mobilenet), reference)
    corrected, _, report = prepare_cnn(mobilenet, calibration, n_samples=32, options=CnnOptions(bias_correction=True))
    assert report.corrected_layers == 8 and report.mean_abs_bias_shift > 0
    with_correction = error(corrected, reference)
    assert with_correction < 0.5 * nearest, (nearest, with_correction)  # measured: about 3x smaller


def test_learned_rounding_lowers_every_layers_error_and_the_models(mobilenet):
    reference = outputs(mobilenet, HELD_OUT)
    nearest = error(nearest_rounded(mobilenet), reference)
    options = CnnOptions(rounding="adaround", bias_correction=False, adaround_iterations=200, adaround_samples=16)
    learned, _, report = prepare_cnn(mobilenet, calibration, n_samples=32, options=options)
    layers = report.adaround
    assert len(layers) == 8 and all(e["mse_learned"] <= e["mse_nearest"] for e in layers)
    assert sum(e["mse_learned"] for e in layers) < 0.8 * sum(e["mse_nearest"] for e in layers)
    assert error(learned, reference) < nearest
    inits = {t.name: numpy_helper.to_array(t) for t in learned.graph.initializer}
    for layer in weight_layers(learned):  # still on ORT's INT8 grid: ORT reproduces the learned rounding exactly
        w = inits[layer.weight]
        assert np.allclose(round_to_grid(w, channel_scales(w, layer.axis, per_channel=True)), w, atol=1e-7)


def _two_convs(relu: str) -> onnx.ModelProto:
    """Conv -> ReLU -> Conv with output channels of very different ranges (what BatchNorm folding leaves)."""
    rng = np.random.default_rng(3)
    w1 = rng.normal(size=(8, 3, 3, 3)).astype(np.float32) * np.logspace(-1.5, 1, 8, dtype=np.float32)[:, None,
                                                                                                       None, None]
    w2 = rng.normal(size=(4, 8, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "b1"),
             numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.zeros(4, np.float32), "b2")]
    act = [helper.make_node("Relu", ["c1"], ["a1"], name="relu")] if relu == "relu" else \
        [helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"], name="relu6")]
    inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"), numpy_helper.from_array(np.array(6, np.float32),
                                                                                               "hi")]
    nodes = [helper.make_node("Conv", ["pixel_values", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"), *act,
             helper.make_node("Conv", ["a1", "w2", "b2"], ["logits_map"], name="conv2"),
             helper.make_node("GlobalAveragePool", ["logits_map"], ["pooled"], name="gap"),
             helper.make_node("Flatten", ["pooled"], ["logits"], name="flatten")]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT,
                                                                           [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_cross_layer_equalization_keeps_the_function_and_helps_per_tensor_weights():
    model = _two_convs("relu")
    reference = outputs(model, HELD_OUT)
    options = CnnOptions(equalize=True, bias_correction=False)
    equalized, _, report = prepare_cnn(model, calibration, n_samples=32, options=options, per_channel=False)
    assert report.equalized_pairs == 1 and report.weight_range_spread["after"] < 0.15 * report.weight_range_spread[
        "before"]  # measured 167 -> 17 (max / min channel range of the first layer)
    fp32 = onnx.ModelProto()
    fp32.CopyFrom(model)
    equalize(fp32, options, CnnReport())
    assert np.abs(outputs(fp32, HELD_OUT) - reference).max() < 1e-4  # ReLU(x / s) = ReLU(x) / s: same function
    plain, _, _ = prepare_cnn(model, calibration, n_samples=32, options=CnnOptions(bias_correction=False),
                           per_channel=False)
    # per-tensor INT8 weights: the narrow channels were rounded to nothing; equalized, they survive
    assert error(equalized, reference) < 0.5 * error(plain, reference)  # measured: 3.3x smaller
    relu6 = _two_convs("relu6")  # ReLU6 is not scale-equivariant: the pair is left alone unless asked
    _, _, kept = prepare_cnn(relu6, calibration, n_samples=32, options=options, per_channel=False)
    assert kept.equalized_pairs == 0
    _, _, replaced = prepare_cnn(relu6, calibration, n_samples=32, per_channel=False,
                              options=CnnOptions(equalize=True, relu6="replace", bias_correction=False))
    assert replaced.relu6_replaced == 1 and replaced.equalized_pairs == 1


def test_histogram_calibrators_keep_a_relu6_range():
    """70% exact zeros and a spike at 6 (a ReLU6 output): entropy chose 0.375 (128 of 2048 bins) before."""
    rng = np.random.default_rng(0)
    values = np.clip(rng.normal(1.0, 3.0, size=200_000), 0.0, 6.0).astype(np.float32)
    values[rng.random(values.size) < 0.5] = 0.0
    for name in ("entropy", "mse", "percentile"):
        calibrator = make_calibrator(name)
        for sample, chunk in enumerate(np.array_split(values, 20)):
            calibrator.update("relu6_out", chunk, sample=sample)
        low, high = calibrator.ranges()["relu6_out"]
        assert low == 0.0 and high > 5.0, (name, high)


@pytest.mark.parametrize("calibrator", sorted(CALIBRATORS.names()))
def test_every_calibrator_quantizes_the_relu6_cnn_with_high_agreement(mobilenet, tmp_path, calibrator):
    path = tmp_path / "fp32.onnx"
    onnx.save(mobilenet, path)
    reference = outputs(mobilenet, HELD_OUT)
    quantize_static(path, tmp_path / "int8.onnx", calibration_feeds=calibration, n_calibration=32,
                    options=QuantizeOptions(calibrator=calibrator))
    got = outputs(onnx.load(str(tmp_path / "int8.onnx")), HELD_OUT)
    cosine = np.sum(got * reference, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
    assert np.mean(got.argmax(1) == reference.argmax(1)) >= 0.9 and cosine.mean() > 0.99, (calibrator, cosine.mean())


@pytest.mark.parametrize(("c_in", "c_out", "group", "kernel", "stride", "dilation", "pads"), [
    (8, 16, 1, 3, 2, 1, [0, 0, 1, 1]),  # strided, asymmetric (TF "same") padding
    (8, 8, 8, 5, 1, 2, [2, 2, 2, 2]),  # depthwise, dilated
    (6, 4, 2, 3, 1, 1, [1, 1, 1, 1]),  # grouped
])
def test_bias_correction_mean_output_equals_the_convolution(c_in, c_out, group, kernel, stride, dilation, pads):
    from edgepack.quantization.cnn import WeightLayer, _conv_mean_output, apply_layer

    node = helper.make_node("Conv", ["x", "w"], ["y"], strides=[stride] * 2, dilations=[dilation] * 2, group=group,
                            pads=pads, name="conv")
    layer = WeightLayer(node, "w", None, 0)
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(c_in, 17, 15)), rng.normal(size=(c_out, c_in // group, kernel, kernel))
    direct = apply_layer(layer, x[None], w)[0].reshape(c_out, -1).mean(axis=1)
    assert np.abs(_conv_mean_output(layer, x, w) - direct).max() < 1e-12


def test_a_range_cache_keeps_the_prepared_model_so_a_new_budget_skips_calibration(mobilenet, tmp_path):
    from edgepack.quantization.quantize import RangeCache
    from edgepack.quantization.sensitivity import QuantBudget

    path = tmp_path / "fp32.onnx"
    onnx.save(mobilenet, path)
    cache = RangeCache(tmp_path / "cache", "data-key")
    first = quantize_static(path, tmp_path / "a.onnx", calibration_feeds=calibration, n_calibration=32, cache=cache)
    assert not first["range_cache"]["hit"] and len(list((tmp_path / "cache").glob("prepared-*.onnx"))) == 2

    def no_data():
        raise AssertionError("a cache hit must not read the calibration data")

    check = ([{"pixel_values": x} for x in HELD_OUT[:4]], "logits")
    second = quantize_static(path, tmp_path / "b.onnx", calibration_feeds=no_data, n_calibration=32, cache=cache,
                             budget=QuantBudget(max_cosine_drop=0.5), check=check)
    assert second["range_cache"]["hit"] and second["cnn"] == first["cnn"]
    assert np.array_equal(outputs(onnx.load(str(tmp_path / "a.onnx")), HELD_OUT),
                          outputs(onnx.load(str(tmp_path / "b.onnx")), HELD_OUT))


def test_a_wide_activation_is_quantized_in_16_bits_and_lowers_the_error(mobilenet, tmp_path):
    """quantize.wide_activations: the first conv's output as uint16 (ORT contrib Q/DQ at opset 17); every
    activation in 16 bits halves the logit error on held-out inputs (this tiny net's error is spread over all of
    them); an unknown tensor name is one BadInputError naming it."""
    from edgepack.errors import BadInputError

    path = tmp_path / "fp32.onnx"
    onnx.save(mobilenet, path)
    reference = outputs(mobilenet, HELD_OUT)
    first_conv = next(n for n in mobilenet.graph.node if n.op_type == "Conv")
    stem = next(n for n in mobilenet.graph.node if first_conv.output[0] in n.input).output[0]  # its activation
    errors = {}
    for name, wide in (("8-bit", ()), ("16-bit", (stem,)), ("all", "all")):
        if wide == "all":
            eight = onnx.load(str(tmp_path / "8-bit.onnx"))
            inits = {t.name for t in eight.graph.initializer}
            wide = tuple(n.input[0] for n in eight.graph.node if n.op_type == "QuantizeLinear" and n.input[0]
                         not in inits and n.input[0] in {o for m in mobilenet.graph.node for o in m.output})
        metrics = quantize_static(path, tmp_path / f"{name}.onnx", calibration_feeds=calibration, n_calibration=32,
                                  options=QuantizeOptions(calibrator="mse", wide_activations=wide))
        model = onnx.load(str(tmp_path / f"{name}.onnx"))
        wide_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == stem]
        assert len(wide_q) == 1
        zero_point = next(t for t in model.graph.initializer if t.name == wide_q[0].input[2])
        assert zero_point.data_type == (TensorProto.UINT16 if wide else TensorProto.UINT8)
        assert (wide_q[0].domain == "com.microsoft") == bool(wide)
        assert any("16 bits" in note for note in metrics["plan"]["notes"]) == bool(wide)
        errors[name] = error(model, reference)
    assert errors["16-bit"] <= errors["8-bit"] and errors["all"] < 0.5 * errors["8-bit"], errors
    with pytest.raises(BadInputError, match="no tensor 'nope'"):
        quantize_static(path, tmp_path / "bad.onnx", calibration_feeds=calibration, n_calibration=32,
                        options=QuantizeOptions(wide_activations=("nope",)))


def stem_dominated(model: onnx.ModelProto, factor: float = 16.0) -> onnx.ModelProto:
    """The tiny MobileNet with half of its first conv's output channels `factor` x smaller and the depthwise
    weights reading them `factor` x larger (as BatchNorm folding leaves EfficientNet-Lite's stem): those channels
    get few steps of the per-tensor 8-bit grid and the next layer amplifies their rounding, so that activation
    dominates the INT8 error. (The ReLU6 of the scaled channels then clips at 6 * factor: another FP32 function,
    the reference of every variant.)"""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    inits = {t.name: t for t in copy.graph.initializer}
    first = weight_layers(copy)[0]
    clip = next(n for n in copy.graph.node if first.node.output[0] in n.input)
    second = next(layer for layer in weight_layers(copy) if layer.node.input[0] == clip.output[0])
    w1, w2 = (numpy_helper.to_array(inits[layer.weight]).copy() for layer in (first, second))
    half = np.arange(w1.shape[0]) % 2 == 1
    w1[half] /= factor
    w2[half] *= factor
    for name, value in ((first.weight, w1), (second.weight, w2)):
        inits[name].CopyFrom(numpy_helper.from_array(value, name))
    if first.bias is not None:
        b1 = numpy_helper.to_array(inits[first.bias]).copy()
        b1[half] /= factor
        inits[first.bias].CopyFrom(numpy_helper.from_array(b1, first.bias))
    return copy


def test_a_float_activation_keeps_its_layers_float_and_lowers_the_error(mobilenet, tmp_path):
    """quantize.cnn.float_activations: the first conv's ReLU6 output stays float (no Q/DQ on it): the first conv
    (traced back through the Clip) and the depthwise conv reading it keep their FP32 weights, everything else is
    INT8, and the held-out logit error halves (measured 1.25e-5 -> 6.3e-6; ~10 s); an unknown tensor is one
    BadInputError with the closest name; another recipe than cnn is refused."""
    from edgepack.errors import BadInputError

    model = stem_dominated(mobilenet)
    path = tmp_path / "fp32.onnx"
    onnx.save(model, path)
    reference = outputs(model, HELD_OUT)
    first_conv = next(n for n in model.graph.node if n.op_type == "Conv")
    stem = next(n for n in model.graph.node if first_conv.output[0] in n.input).output[0]  # its ReLU6 output
    readers = [n.name for n in model.graph.node if stem in n.input]
    errors = {}
    for name, kept in (("8-bit", ()), ("float", (stem,))):
        metrics = quantize_static(path, tmp_path / f"{name}.onnx", calibration_feeds=calibration, n_calibration=32,
                                  options=QuantizeOptions(calibrator="mse", family="cnn",
                                                          cnn=CnnOptions(float_activations=kept)))
        model = onnx.load(str(tmp_path / f"{name}.onnx"))
        quantized_inputs = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
        assert (stem in quantized_inputs) != bool(kept)
        float_weights = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
        for node in model.graph.node:
            if node.name in (first_conv.name, *readers):
                assert (node.input[1] in float_weights) == bool(kept), node.name
        assert sum(n.op_type == "Conv" and n.input[1] in float_weights for n in model.graph.node) == 2 * bool(kept)
        assert any("kept in float" in note for note in metrics["plan"]["notes"]) == bool(kept)
        errors[name] = error(model, reference)
    assert errors["float"] < 0.7 * errors["8-bit"], errors
    with pytest.raises(BadInputError, match=f"no tensor '{stem}x'.*did you mean '{stem}'"):
        quantize_static(path, tmp_path / "bad.onnx", calibration_feeds=calibration, n_calibration=32,
                        options=QuantizeOptions(family="cnn", cnn=CnnOptions(float_activations=(stem + "x",))))
    with pytest.raises(BadInputError, match="applies to the cnn recipe"):
        quantize_static(path, tmp_path / "bad.onnx", calibration_feeds=calibration, n_calibration=32,
                        options=QuantizeOptions(family="generic", cnn=CnnOptions(float_activations=(stem,))))


def test_int4_weights_go_to_the_largest_layers_in_blocks_and_keep_the_logits(mobilenet, tmp_path):
    """quantize.cnn.int4_largest: the three largest 1x1 convolutions / Gemms (the 32x32 pointwise conv, the
    16 -> 24 one and the head; the 24-wide conv has no 16-block). int4_kernel dequantize: the convs get packed
    uint4 weights in 16-channel blocks read by an opset-21 DequantizeLinear and a float bias; matmul-nbits (the
    default): each conv is Transpose -> MatMulNBits -> Transpose with the same codes, and the two graphs compute
    the same logits; the head Gemm is MatMulNBits with its bias there (a blocked DequantizeLinear with
    dequantize: standard ONNX only, what NPU EPs read); the logits stay close to FP32; the INT8
    calibration is reused."""
    from edgepack.quantization.cnn_int4 import eligible_layers
    from edgepack.quantization.quantize import RangeCache

    path = tmp_path / "fp32.onnx"
    onnx.save(mobilenet, path)
    reference = outputs(mobilenet, HELD_OUT)
    cache = RangeCache(tmp_path / "cache", "data-key")
    quantize_static(path, tmp_path / "int8.onnx", calibration_feeds=calibration, n_calibration=32, cache=cache)
    check = ([{"pixel_values": x} for x in HELD_OUT[:8]], "logits")
    metrics, models = {}, {}
    for kernel in ("dequantize", "matmul-nbits"):
        metrics[kernel] = quantize_static(
            path, tmp_path / f"{kernel}.onnx", calibration_feeds=calibration, n_calibration=32, cache=cache,
            check=check, options=QuantizeOptions(cnn=CnnOptions(int4_largest=3, int4_block_size=16,
                                                                int4_kernel=kernel)))
        assert metrics[kernel]["range_cache"]["hit"] and metrics[kernel]["int4"]["kernel"] == kernel
        models[kernel] = onnx.load(str(tmp_path / f"{kernel}.onnx"))
    int8, int4 = onnx.load(str(tmp_path / "int8.onnx")), models["dequantize"]
    eligible = eligible_layers(int8, mobilenet)
    assert [t.elements for t in eligible] == [1024, 384, 320]  # conv 32->32, conv 16->24, head 32->10
    chosen = [r["layer"] for r in metrics["dequantize"]["int4"]["layers"]]
    assert chosen == [t.name for t in eligible]
    for model in models.values():
        assert next(o.version for o in model.opset_import if o.domain == "") == 21
    inits = {t.name: t for t in models["matmul-nbits"].graph.initializer}
    head = next(n for n in models["matmul-nbits"].graph.node if n.name == chosen[2])
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    assert head.op_type == "MatMulNBits"
    assert attrs == {"K": 32, "N": 10, "bits": 4, "block_size": 16, "accuracy_level": 0}
    assert inits[head.input[1]].dims == [10, 2, 8] and inits[head.input[5]].data_type == TensorProto.FLOAT
    inits = {t.name: t for t in int4.graph.initializer}
    producers = {o: n for n in int4.graph.node for o in n.output}
    assert not any(n.domain == "com.microsoft" for n in int4.graph.node)  # dequantize: standard ONNX only
    for node in (n for n in int4.graph.node if n.name in chosen):
        dq = producers[node.input[1]]
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        codes = inits[dq.input[0]]
        assert node.op_type in ("Conv", "Gemm") and codes.data_type == TensorProto.UINT4
        assert attrs == {"axis": 1, "block_size": 16}
        assert len(codes.raw_data) == int(np.prod(codes.dims)) // 2  # two codes per byte
        assert inits[node.input[2]].data_type == TensorProto.FLOAT
    nbits = models["matmul-nbits"]
    producers = {o: n for n in nbits.graph.node for o in n.output}
    readers = {i: n for n in nbits.graph.node for i in n.input}
    for name in chosen[:2]:
        node = next(n for n in nbits.graph.node if n.name == name)
        before, after = producers[node.input[0]], readers[node.output[0]]
        assert node.op_type == "MatMulNBits" and before.op_type == after.op_type == "Transpose"
        assert [helper.get_attribute_value(a) for a in before.attribute] == [[0, 2, 3, 1]]
        assert [helper.get_attribute_value(a) for a in after.attribute] == [[0, 3, 1, 2]]
    assert not any(n.op_type == "Conv" and n.name in chosen for n in nbits.graph.node)
    got = {kernel: outputs(model, HELD_OUT) for kernel, model in models.items()}
    np.testing.assert_allclose(got["matmul-nbits"], got["dequantize"], atol=2e-3 * np.abs(reference).max())
    cosine = {}
    for name, out in (("int8", outputs(int8, HELD_OUT)), ("int4", got["matmul-nbits"])):
        cosine[name] = float(np.mean(np.sum(out * reference, 1) / np.linalg.norm(out, axis=1)
                                     / np.linalg.norm(reference, axis=1)))
    assert 0.97 < cosine["int4"] < cosine["int8"], cosine
    assert abs(metrics["matmul-nbits"]["int4"]["fidelity"]["cosine_mean"] - cosine["int4"]) < 0.02


def test_int4_bias_correction_and_gptq_lower_the_error_of_nearest_int4(mobilenet, tmp_path):
    """On the same INT8 model: INT4 weights of every eligible layer, GPTQ-rounded and bias-corrected, have a lower
    held-out logit error than without bias correction; an unknown layer name is one error listing the eligible."""
    from edgepack.errors import BadInputError
    from edgepack.quantization.cnn_int4 import apply_int4

    path = tmp_path / "fp32.onnx"
    onnx.save(mobilenet, path)
    reference = outputs(mobilenet, HELD_OUT)
    quantize_static(path, tmp_path / "int8.onnx", calibration_feeds=calibration, n_calibration=32)
    errors = {}
    for corrected in (True, False):
        out = tmp_path / f"int4-{corrected}.onnx"
        apply_int4(tmp_path / "int8.onnx", path, calibration, names=[], largest=3, block_size=16, n_samples=32,
                   bias_correction=corrected, out_path=out)
        errors[corrected] = error(onnx.load(str(out)), reference)
    assert errors[True] < errors[False], errors
    with pytest.raises(BadInputError, match="not a quantized 1x1 Conv"):
        apply_int4(tmp_path / "int8.onnx", path, calibration, names=["/nope/Conv"], largest=0, block_size=16,
                   n_samples=32, bias_correction=True, out_path=tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_int4_cosine_budget_takes_the_cheapest_layers_first_and_holds_on_calibration(mobilenet, tmp_path):
    """quantize.cnn.int4_max_cosine_rise: every eligible layer is scored alone at INT4, ranked by error per weight,
    and the longest prefix whose score is within the budget above INT8's is kept: a zero budget takes no layer, a
    loose one all three, half of all-INT4's rise a shorter prefix within it."""
    path = tmp_path / "fp32.onnx"
    onnx.save(mobilenet, path)
    check = ([{"pixel_values": x} for x in CALIBRATION[:16]], "logits")
    picked = {}
    for budget in (0.0, 1.0):
        metrics = quantize_static(path, tmp_path / f"b{budget}.onnx", calibration_feeds=calibration, n_calibration=32,
                                  check=check, options=QuantizeOptions(
                                      cnn=CnnOptions(int4_max_cosine_rise=budget, int4_block_size=16)))
        picked[budget] = metrics["int4"]
    assert picked[0.0]["layers"] == [] and len(picked[1.0]["layers"]) == 3
    sensitivity = picked[1.0]["budget"]["sensitivity"]
    assert len(sensitivity) == 3 and all(v >= 0 for v in sensitivity.values())
    int8_score, int4_score = picked[1.0]["budget"]["int8_score"], picked[1.0]["budget"]["score"]
    assert picked[0.0]["budget"]["score"] == int8_score and int4_score > int8_score > 0
    middle = (int4_score - int8_score) / 2  # below the all-INT4 rise: fewer layers fit
    metrics = quantize_static(path, tmp_path / "mid.onnx", calibration_feeds=calibration, n_calibration=32,
                              check=check, options=QuantizeOptions(
                                  cnn=CnnOptions(int4_max_cosine_rise=middle, int4_block_size=16)))
    budget = metrics["int4"]["budget"]
    assert budget["within_budget"] and budget["score"] - int8_score <= middle and len(metrics["int4"]["layers"]) < 3
    if metrics["int4"]["layers"]:  # the score judged is the shipped model's
        assert 1 - metrics["int4"]["fidelity"]["cosine_mean"] == pytest.approx(budget["score"], abs=1e-9)


def test_int4_kernel_auto_follows_the_eps_and_strided_convs_keep_the_dequantize_form():
    """int4_kernel auto: MatMulNBits (a contrib op) only when every EP is the CPU EP; with an NPU in the list the
    standard blocked DequantizeLinear. A 1x1 Conv is one MatMul per pixel only at stride 1 without padding."""
    from edgepack.errors import BadInputError
    from edgepack.quantization.cnn_int4 import _plain_product
    from edgepack.stages import resolve_int4_kernel

    assert resolve_int4_kernel("auto", ["cpu", "mobile-cpu"]) == "matmul-nbits"
    assert resolve_int4_kernel("auto", ["cpu", "qnn-htp"]) == "dequantize"
    assert resolve_int4_kernel("dequantize", ["cpu"]) == "dequantize"
    conv = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[1, 1])
    assert _plain_product(conv)
    assert not _plain_product(helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[1, 1], strides=[2, 2]))
    assert not _plain_product(helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[1, 1], pads=[1, 1, 1, 1]))
    assert not _plain_product(helper.make_node("Gemm", ["x", "w"], ["y"], alpha=0.5))
    with pytest.raises(BadInputError, match="int4_kernel 'fast': choose matmul-nbits or dequantize"):
        CnnOptions(int4_kernel="fast")
