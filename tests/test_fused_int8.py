"""Fused INT8 (QAttention / MatMulIntegerToFloat / QEmbedLayerNormalization), lean QDQ and dynamic INT8 on a tiny
real BERT (2 layers, 32 wide, MiniLM's tokenizer): graph structure before and after ONNX Runtime's optimizations,
op counts, numerics vs FP32 and vs ORT's own quantizer. About 40 s on 2 cores."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgepack.calibration_data import read_samples
from edgepack.errors import BadInputError
from edgepack.exporters.onnx import export_onnx
from edgepack.families import open_model
from edgepack.quantization.dynamic import quantize_dynamic_int8
from edgepack.quantization.fused import fuse_transformer, lower_to_integer_ops, weight_per_column
from edgepack.quantization.quantize import QuantizeOptions, quantize_static
from edgepack.runtime.metrics import fidelity
from edgepack.runtime.op_profile import optimized_op_counts, profile_ops
from edgepack.stages import resolve_graph

LAYERS = 2
OUT = "sentence_embedding"


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir, small_sentences, tmp_path_factory):
    family = open_model(str(tiny_bert_dir))
    samples = read_samples(small_sentences)
    fp32 = tmp_path_factory.mktemp("fused") / "fp32.onnx"
    export_onnx(family, fp32, check_feeds=list(family.feeds(samples[:2])))
    return family, samples, fp32


def _outputs(path: Path, feeds: list[dict]) -> list[dict]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [{OUT: session.run([OUT], feed)[0]} for feed in feeds]


@pytest.fixture(scope="module")
def fused_int8(tiny, tmp_path_factory):
    family, samples, fp32 = tiny
    out = tmp_path_factory.mktemp("fused-int8") / "int8.onnx"
    metrics = quantize_static(fp32, out, calibration_feeds=lambda: family.feeds(samples[:24]), n_calibration=24,
                              options=QuantizeOptions(graph="fused"))
    return out, metrics


def test_fuse_transformer_finds_every_bert_pattern(tiny, tmp_path):
    _, _, fp32 = tiny
    counts = fuse_transformer(fp32, tmp_path / "fused.onnx")
    assert counts == {"EmbedLayerNormalization": 1, "Attention": LAYERS, "BiasGelu": LAYERS,
                      "SkipLayerNormalization": 2 * LAYERS}
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node)
    assert ops["Softmax"] == 0 and ops["MatMul"] == 3 * LAYERS  # attention-out, FFN in, FFN out per layer


def test_fused_int8_graph_structure_and_what_ort_runs(fused_int8):
    path, metrics = fused_int8
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["QAttention"] == LAYERS and ops["QEmbedLayerNormalization"] == 1
    assert ops["MatMulIntegerToFloat"] == 3 * LAYERS
    # one QuantizeLinear per quantized activation (q/k/v input, attention out, FFN in, FFN out), no DQ at all
    assert ops["QuantizeLinear"] == 4 * LAYERS and ops["DequantizeLinear"] == 0
    assert ops["Attention"] == ops["MatMul"] == ops["Softmax"] == 0
    smoothed = sum(layer["alpha"] is not None for layer in metrics["smoothquant"]["layers"])
    assert len(metrics["smoothquant"]["layers"]) == 3 * LAYERS  # q/k/v, FFN in, FFN out searched per layer
    assert ops["Mul"] == smoothed + 1  # a SmoothQuant branch Mul where the search smooths, + mean pooling
    # ORT's slow SkipLayerNormalization / BiasGelu kernels are split (bias into MatMulIntegerToFloat), and ORT
    # keeps every integer op and does not fuse the split ones back
    assert ops["SkipLayerNormalization"] == ops["BiasGelu"] == 0
    assert ops["LayerNormalization"] == ops["Sum"] == 2 * LAYERS and ops["Gelu"] == LAYERS
    matmuls = [n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert all(len(n.input) == 7 and n.input[6] for n in matmuls)  # every bias in the GEMM's output stage
    ran = optimized_op_counts(path)
    for op in ("QAttention", "MatMulIntegerToFloat", "QEmbedLayerNormalization", "LayerNormalization", "Sum", "Gelu"):
        assert ran[op] == ops[op]
    assert ran.get("SkipLayerNormalization", 0) == ran.get("BiasGelu", 0) == ran.get("Add", 0) == 0
    assert metrics["graph"] == "fused" and metrics["fused_ops"]["Attention"] == LAYERS
    assert any("graph fused (static)" in note and "CPU EP only" in note for note in metrics["plan"]["notes"])


def test_fused_int8_matches_fp32_and_the_qdq_graph(tiny, fused_int8, tmp_path):
    family, samples, fp32 = tiny
    path, _ = fused_int8
    qdq = tmp_path / "qdq.onnx"
    quantize_static(fp32, qdq, calibration_feeds=lambda: family.feeds(samples[:24]), n_calibration=24,
                    options=QuantizeOptions(graph="qdq"))
    feeds = list(family.feeds(samples[24:40]))
    reference = _outputs(fp32, feeds)
    fused, portable = (fidelity(reference, _outputs(p, feeds), output=OUT) for p in (path, qdq))
    assert fused["cosine_min"] > 0.99 and fused["cosine_mean"] > 0.995
    assert abs(fused["cosine_mean"] - portable["cosine_mean"]) < 0.003  # same scales, other kernels


def test_fused_int8_respects_the_attention_mask(tiny, fused_int8):
    family, samples, _ = tiny
    path, _ = fused_int8
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    alone = [session.run([OUT], f)[0] for f in family.feeds(samples[:4], batch_size=1)]
    padded = session.run([OUT], next(iter(family.feeds(samples[:4], batch_size=4, padding="max_length",
                                                         max_length=64))))[0]
    np.testing.assert_allclose(np.concatenate(alone), padded, atol=2e-3)


def test_weight_per_column_is_onnxruntime_symmetric_rule():
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.quant_utils import quantize_data

    weight = np.random.default_rng(0).standard_normal((16, 5)).astype(np.float32)
    weight[:, 3] = 0.0
    ours, scale = weight_per_column(weight)
    for column in (0, 4):
        _, ort_scale, ort_q = quantize_data(weight[:, column], QuantType.QInt8.tensor_type, symmetric=True)
        np.testing.assert_allclose(scale[column], ort_scale, rtol=1e-6)
        np.testing.assert_array_equal(ours[:, column], ort_q)
    assert scale[3] == 1.0 and not ours[:, 3].any()


def test_lowering_leaves_excluded_and_unknown_nodes_float(tiny, tmp_path):
    _, _, fp32 = tiny
    fuse_transformer(fp32, tmp_path / "fused.onnx")
    model = onnx.load(str(tmp_path / "fused.onnx"))
    attention = next(n for n in model.graph.node if n.op_type == "Attention")
    ranges = {attention.input[0]: (-3.0, 3.0)}
    lowered, counts = lower_to_integer_ops(model, ranges, nodes={attention.name})
    ops = Counter(n.op_type for n in lowered.graph.node)
    assert counts == {"QAttention": 1} and ops["Attention"] == LAYERS - 1 and ops["MatMul"] == 3 * LAYERS
    assert attention.input[1] not in {t.name for t in lowered.graph.initializer}  # float qkv weight dropped


def test_qdq_graph_is_lean_after_ort_optimizations(tiny, tmp_path):
    """The QDQ graph ORT runs: every weight DQ folded into MatMulIntegerToFloat, one QuantizeLinear per quantized
    activation, DequantizeLinear only after the three embedding Gathers (word, position, token type)."""
    family, samples, fp32 = tiny
    qdq = tmp_path / "qdq.onnx"
    quantize_static(fp32, qdq, calibration_feeds=lambda: family.feeds(samples[:24]), n_calibration=24,
                    options=QuantizeOptions(graph="qdq"))
    written = Counter(n.op_type for n in onnx.load(str(qdq)).graph.node)
    ran = optimized_op_counts(qdq)
    assert written["DequantizeLinear"] > written["QuantizeLinear"]  # weight and activation DQs as written
    assert ran["MatMulIntegerToFloat"] == 6 * LAYERS  # the six weight MatMuls per layer
    assert ran["MatMul"] + ran["FusedMatMul"] == 2 * LAYERS  # QK^T (scale fused) and PV stay float
    assert ran["QuantizeLinear"] == 4 * LAYERS
    assert ran["DequantizeLinear"] == 3


def test_dynamic_int8_on_the_fused_graph(tiny, tmp_path):
    family, samples, fp32 = tiny
    out = tmp_path / "dyn.onnx"
    metrics = quantize_dynamic_int8(fp32, out, calibration_feeds=lambda: family.feeds(samples[:24]),
                                    n_calibration=24, options=QuantizeOptions(graph="fused"))
    ran = optimized_op_counts(out)
    assert ran["QAttention"] == LAYERS and ran["DynamicQuantizeMatMul"] == 3 * LAYERS
    assert ran.get("SkipLayerNormalization", 0) == 0 and ran["LayerNormalization"] == 2 * LAYERS
    assert ran.get("QuantizeLinear", 0) == 0  # no calibrated scales anywhere
    assert metrics["mode"] == "dynamic" and len(metrics["smoothquant"]["layers"]) == 3 * LAYERS
    smoothed = sum(layer["alpha"] is not None for layer in metrics["smoothquant"]["layers"])
    clips = [n for n in onnx.load(str(out)).graph.node if n.op_type == "Clip" and n.name.endswith("/clip")]
    assert len(clips) == smoothed > 0  # each smoothed branch is clipped to its calibrated range
    feeds = list(family.feeds(samples[24:40]))
    assert fidelity(_outputs(fp32, feeds), _outputs(out, feeds), output=OUT)["cosine_mean"] > 0.99


def test_profile_ops_reports_time_per_op_type(fused_int8):
    path, _ = fused_int8
    feed = {"input_ids": np.full((1, 16), 1000, np.int64), "attention_mask": np.ones((1, 16), np.int64),
            "token_type_ids": np.zeros((1, 16), np.int64)}
    profile = profile_ops(path, feed, warmup=2, runs=5)
    assert profile.nodes["QAttention"] == LAYERS and profile.fused["QAttention"] == LAYERS
    assert profile.ms_per_op["QAttention"] > 0 and profile.total_ms > 0
    assert "QAttention" in profile.describe(n=20)


@pytest.mark.parametrize(("providers", "recipe", "graph"), [
    (["cpu"], "transformer-encoder", "fused"), (["cpu", "mobile-cpu/t2"], "auto", "fused"),
    (["cpu", "qnn-htp"], "transformer-encoder", "qdq"), (["nnapi"], "transformer-encoder", "qdq"),
    (["cpu"], "generic", "qdq")])
def test_graph_auto_is_fused_only_for_cpu_eps_and_transformers(tiny, providers, recipe, graph):
    assert resolve_graph("auto", fp32=tiny[2], recipe=recipe, providers=providers) == graph
    assert resolve_graph("qdq", fp32=tiny[2], recipe=recipe, providers=providers) == "qdq"


def test_a_mixed_ep_list_gets_a_fused_and_a_qdq_variant(tiny):
    from edgepack.stages import int8_variants

    fp32 = tiny[2]
    assert int8_variants("auto", fp32=fp32, recipe="transformer-encoder", providers=["cpu", "qnn-htp"]) == {
        "int8": "fused", "int8-qdq": "qdq"}
    assert int8_variants("auto", fp32=fp32, recipe="transformer-encoder", providers=["cpu"]) == {"int8": "fused"}
    assert int8_variants("auto", fp32=fp32, recipe="transformer-encoder", providers=["nnapi"]) == {"int8": "qdq"}
    assert int8_variants("fused", fp32=fp32, recipe="transformer-encoder", providers=["cpu", "qnn-htp"]) == {
        "int8": "fused"}


def test_fused_graph_options_are_checked():
    with pytest.raises(BadInputError, match="quantize.graph: unknown graph 'fusd' \\(did you mean 'fused'\\?\\)"):
        QuantizeOptions(graph="fusd")
    with pytest.raises(BadInputError, match="activation_type must be uint8"):
        QuantizeOptions(graph="fused", activation_type="int8")


def test_quantize_stage_dynamic_mode_from_the_recipe(tiny, tmp_path):
    from edgepack import stages
    from edgepack.recipe import parse_recipe

    family, samples, fp32 = tiny
    options = parse_recipe({"quantize": {"mode": "dynamic", "smoothquant": "off", "max_cosine_drop": None}}).quantize
    result = stages.quantize(fp32, family, calibration=samples[:16], options=options, max_length=64,
                             padding="longest", folder=tmp_path / "q")
    assert result.manifest["config"]["graph"] == "fused" and result.metrics["mode"] == "dynamic"
    assert result.metrics["smoothquant"]["layers"] == [] and result.metrics["calibrated_tensors"] == 0
    assert optimized_op_counts(result.folder / "model.onnx")["DynamicQuantizeMatMul"] == 3 * LAYERS
    assert (result.folder / "tokenizer.json").is_file()  # the artifact carries its tokenizer, as static INT8 does
    with pytest.raises(BadInputError, match="quantize.mode"):
        parse_recipe({"quantize": {"mode": "dynamc"}})
