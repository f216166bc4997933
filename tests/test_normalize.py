"""Graph normalisation of foreign ONNX files (onnx.helper graphs with Constant weights at opset 11) and their static
INT8: each pass by structure and by numbers, the budget fallback on Conv layers, and quiet ONNX Runtime logs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.errors import GateFailedError
from edgepack.exporters.normalize import normalize_model
from edgepack.quantization.quantize import QuantizeOptions, quantize_static
from edgepack.quantization.sensitivity import QuantBudget
from tests.vision_graphs import images, paddle_style_segmenter


def run(model: onnx.ModelProto | str, feeds: list[np.ndarray], name: str = "x") -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return [session.run(None, {name: x})[0] for x in feeds]


def test_paddle_style_graph_is_normalised_and_computes_the_same():
    original = paddle_style_segmenter()
    model, report = normalize_model(original)
    ops = [n.op_type for n in model.graph.node]
    assert report.opset_from == 11 and report.opset_to == 13
    assert report.constants_to_initializers == 18 and "Constant" not in ops
    assert dict(report.batch_norms_folded) == {"Conv": 2, "ConvTranspose": 1} and "BatchNormalization" not in ops
    assert report.pads_fused == 1 and "Pad" not in ops
    assert all(n.name for n in model.graph.node) and len({n.name for n in model.graph.node}) == len(ops)
    assert report.shape_inference == "complete"
    assert [n.op_type for n in original.graph.node].count("Constant") == 18  # the input is not modified
    feeds = images(3)
    for want, got in zip(run(original, feeds), run(model, feeds), strict=True):
        assert np.abs(want - got).max() < 1e-5
    assert "opset 11 -> 13" in report.summary() and "3 BatchNormalization folded" in report.summary()


def _conv_transpose_bn(group: int) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    c_in, c_out = 4, 6
    inits = [numpy_helper.from_array(rng.normal(size=(c_in, c_out // group, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=c_out).astype(np.float32), "b")]
    for name, values in (("gamma", rng.uniform(0.5, 2, c_out)), ("beta", rng.normal(size=c_out)),
                         ("mean", rng.normal(size=c_out)), ("var", rng.uniform(0.1, 2, c_out))):
        inits.append(numpy_helper.from_array(values.astype(np.float32), name))
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["t"], strides=[2, 2], group=group, name="deconv"),
             helper.make_node("BatchNormalization", ["t", "gamma", "beta", "mean", "var"], ["y"], name="bn"),
             helper.make_node("BatchNormalization", ["x", "gamma4", "beta4", "mean4", "var4"], ["z"], name="lone_bn")]
    for name in ("gamma4", "beta4", "mean4", "var4"):
        inits.append(numpy_helper.from_array(rng.uniform(0.5, 1.5, c_in).astype(np.float32), name))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("group", [1, 2])
def test_batch_norm_folds_into_a_grouped_conv_transpose_and_a_lone_one_is_left(group):
    original = _conv_transpose_bn(group)
    model, report = normalize_model(original)
    assert dict(report.batch_norms_folded) == {"ConvTranspose": 1} and report.batch_norms_left == 1
    assert "1 BatchNormalization left (no Conv before it)" in report.summary()
    x = np.random.default_rng(2).normal(size=(1, 4, 5, 5)).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(original.SerializeToString(), options).run(None, {"x": x})
    got = ort.InferenceSession(model.SerializeToString(), options).run(None, {"x": x})
    assert all(np.abs(a - b).max() < 1e-4 for a, b in zip(want, got, strict=True))


def test_a_failed_opset_upgrade_is_noted_and_weights_go_per_tensor(tmp_path, monkeypatch):
    from onnx import version_converter

    def refuse(model, version):
        raise RuntimeError("No Adapter For Pad")

    monkeypatch.setattr(version_converter, "convert_version", refuse)
    path = tmp_path / "m.onnx"
    onnx.save(paddle_style_segmenter(), path)
    metrics = quantize_static(path, tmp_path / "q.onnx", calibration_feeds=lambda: ({"x": x} for x in images(8)),
                              n_calibration=8)
    assert metrics["normalization"]["opset"]["note"].startswith("opset 11 kept: onnx's version converter failed")
    assert "per-tensor weights" in metrics["per_channel_note"]
    dequant = [n for n in onnx.load(str(tmp_path / "q.onnx")).graph.node if n.op_type == "DequantizeLinear"]
    assert dequant and not any(a.name == "axis" for n in dequant for a in n.attribute)  # opset 11 has no axis


def test_shape_inference_degrades_to_onnx_runtime_types():
    """A com.microsoft op onnx cannot type: its output is typed by ONNX Runtime instead of stopping quantization."""
    nodes = [helper.make_node("Gelu", ["x"], ["g"], domain="com.microsoft", name="gelu"),
             helper.make_node("Relu", ["g"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft",
                                                                                                      1)])
    normalized, report = normalize_model(model)
    typed = {v.name: v.type.tensor_type.elem_type for v in normalized.graph.value_info}
    assert typed.get("g") == TensorProto.FLOAT
    assert report.shape_inference in ("complete", "partial (1 tensors typed by ONNX Runtime)")


def test_paddle_style_export_quantizes_without_error_quietly(tmp_path, capfd):
    path = tmp_path / "paddle.onnx"
    onnx.save(paddle_style_segmenter(), path)
    feeds = [{"x": x} for x in images(16)]
    metrics = quantize_static(path, tmp_path / "q.onnx", calibration_feeds=lambda: iter(feeds), n_calibration=16,
                              budget=QuantBudget(max_cosine_drop=0.01), check=(feeds[:8], "prob"))
    assert metrics["budget"]["met"] and metrics["plan"]["notes"][0] == "family: cnn (detected)"
    quantized = onnx.load(str(tmp_path / "q.onnx"))
    assert {a.name for n in quantized.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute} == {"axis"}
    cosine = [float(np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b))
              for a, b in zip(run(str(path), [f["x"] for f in feeds[8:]]), run(str(tmp_path / "q.onnx"),
                                                                              [f["x"] for f in feeds[8:]]), strict=True)]
    assert min(cosine) > 0.99
    assert "graph.cc" not in capfd.readouterr().err  # no page of ORT warnings about Constant-node initializers


def test_the_budget_falls_back_conv_layers_and_names_the_ones_it_tried(tmp_path):
    path = tmp_path / "paddle.onnx"
    onnx.save(paddle_style_segmenter(), path)
    feeds = [{"x": x} for x in images(16)]
    with pytest.raises(GateFailedError, match=r"not met: best cosine .* with \d layer\(s\) in float \(tried: "
                                              r"(conv1|conv2|deconv1|deconv2)(, (conv1|conv2|deconv1|deconv2))+\)"):
        quantize_static(path, tmp_path / "q.onnx", calibration_feeds=lambda: iter(feeds), n_calibration=16,
                        budget=QuantBudget(max_cosine_drop=0.0, max_fallback_layers=2), check=(feeds[:8], "prob"))


def test_a_fallback_conv_runs_in_float_in_onnx_runtime(tmp_path):
    """ORT's WeightBiasQuantization would quantize a float Conv fed by a DequantizeLinear (per tensor) at session
    creation; the fallback layer must reach the CPU EP as a float Conv."""
    path = tmp_path / "paddle.onnx"
    onnx.save(paddle_style_segmenter(), path)
    feeds = [{"x": x} for x in images(8)]
    quantize_static(path, tmp_path / "q.onnx", calibration_feeds=lambda: iter(feeds), n_calibration=8,
                    options=QuantizeOptions(exclude_nodes=("conv2",)))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(tmp_path / "q.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    conv2 = [n for n in optimized.graph.node if n.name.startswith("conv2") and n.op_type != "Max"]
    assert conv2 and all(n.op_type in ("Conv", "FusedConv") for n in conv2)
    weight_inputs = {n.input[1] for n in conv2}
    assert not any(n.output[0] in weight_inputs for n in optimized.graph.node if n.op_type == "DequantizeLinear")
    # and its weight is the FP32 one, not the INT8-grid weight the CNN preparation wrote for every layer
    fp32 = {t.name: numpy_helper.to_array(t) for t in normalize_model(paddle_style_segmenter())[0].graph.initializer}
    float_weight = next(numpy_helper.to_array(t) for t in optimized.graph.initializer if t.name in weight_inputs)
    assert np.array_equal(float_weight, fp32["conv2.weight_bn_folded"])
    assert any(n.op_type == "QLinearConv" for n in optimized.graph.node)  # the others stay INT8


def test_a_graph_without_node_names_gets_stable_unique_names_and_quantizes(tmp_path):
    """Some exporters name no node at all; ORT's quantizer selects nodes by name, and the BatchNorm fold names the
    weights it writes after the Conv (an unnamed Conv gave every fold the same '.weight_bn_folded')."""
    model = paddle_style_segmenter()
    for node in model.graph.node:
        node.name = ""
    model.graph.node[-1].name = "Conv_0"  # a name a generated one would take: the first named node keeps it
    first, report = normalize_model(model)
    names = [n.name for n in first.graph.node]
    assert all(names) and len(set(names)) == len(names) and "Conv_0" in names
    assert names == [n.name for n in normalize_model(model)[0].graph.node]  # stable: same graph, same names
    assert report.nodes_named > 0
    folded = [t.name for t in first.graph.initializer if "bn_folded" in t.name]
    assert len(folded) == len(set(folded)) == 6  # weight + bias of the 3 folded layers, no clash
    path = tmp_path / "unnamed.onnx"
    onnx.save(model, path)
    feeds = [{"x": x} for x in images(12)]
    metrics = quantize_static(path, tmp_path / "q.onnx", calibration_feeds=lambda: iter(feeds), n_calibration=12,
                              check=(feeds[:6], "prob"))
    assert metrics["plan"]["notes"][0] == "family: cnn (detected)"
    got, want = run(str(tmp_path / "q.onnx"), [f["x"] for f in feeds[6:]]), run(str(path), [f["x"] for f in feeds[6:]])
    assert min(float(np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b))
               for a, b in zip(want, got, strict=True)) > 0.99
