"""Quantization recipes: which nodes each recipe selects (structure) and the SmoothQuant rewrite (numbers).

Micro-graphs are built with onnx.helper: one post-LayerNorm BERT block (embedding Gather -> LayerNorm -> q/k/v ->
single-head attention -> output projection -> residual LayerNorm -> FFN with erf-GELU -> residual LayerNorm).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.errors import BadInputError
from edgepack.quantization.recipes import (
    QUANT_RECIPES,
    ROLE_FFN_IN,
    ROLE_FFN_OUT,
    ROLE_QKV,
    BranchPoint,
    detect_family,
    plan_quantization,
)
from edgepack.quantization.smoothquant import apply_smoothquant, collect_channel_absmax, smoothing_scales

C, F, T, V = 8, 16, 5, 20  # hidden, FFN width, tokens, vocabulary
WEIGHT_MATMULS = {"q", "k", "v", "attn_out", "ffn_in", "ffn_out"}


def _encoder_block(*, gelu: str = "erf", float_input: bool = False, seed: int = 0) -> onnx.ModelProto:
    """One BERT block. float_input: start from x (1, T, C) instead of input_ids -> embedding Gather."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []

    def w(name: str, *shape: int, scale: float = 0.3) -> str:
        inits.append(numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name))
        return name

    def const(name: str, value: float) -> str:
        inits.append(numpy_helper.from_array(np.array(value, np.float32), name))
        return name

    nodes = []
    if float_input:
        graph_input = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, T, C])
        emb = "x"
    else:
        graph_input = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, T])
        nodes.append(helper.make_node("Gather", [w("word_emb", V, C), "input_ids"], ["emb"], name="embed"))
        emb = "emb"
    gamma = np.ones(C, np.float32)
    gamma[3] = 12.0  # an outlier channel after LayerNorm, as in BERT
    inits.append(numpy_helper.from_array(gamma, "ln_gamma"))

    def ln(name: str, x: str) -> onnx.NodeProto:
        beta = w(f"{name}_beta", C, scale=0.1)
        return helper.make_node("LayerNormalization", [x, "ln_gamma", beta], [name], name=name, axis=-1)

    def linear(name: str, x: str, n_in: int, n_out: int) -> list[onnx.NodeProto]:  # (1, T, n_in) -> (1, T, n_out)
        return [helper.make_node("MatMul", [x, w(f"{name}_w", n_in, n_out)], [f"{name}_mm"], name=name),
                helper.make_node("Add", [f"{name}_mm", w(f"{name}_b", n_out, scale=0.1)], [f"{name}_out"],
                                 name=f"{name}_bias")]

    nodes.append(ln("ln0", emb))
    for name in ("q", "k", "v"):
        nodes += linear(name, "ln0", C, C)
    nodes += [
        helper.make_node("Transpose", ["k_out"], ["k_t"], name="k_transpose", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q_out", "k_t"], ["scores"], name="scores"),            # (1, T, T)
        helper.make_node("Div", ["scores", const("sqrt_c", np.sqrt(C))], ["scaled"], name="scale"),
        helper.make_node("Softmax", ["scaled"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "v_out"], ["context"], name="context"),          # (1, T, C)
        helper.make_node("Reshape", ["context", _shape(inits, "ctx_shape", [1, T, C])], ["ctx"], name="ctx_reshape"),
    ]
    nodes += linear("attn_out", "ctx", C, C)
    nodes += [helper.make_node("Add", ["ln0", "attn_out_out"], ["res1"], name="res1"), ln("ln1", "res1")]
    nodes += linear("ffn_in", "ln1", C, F)
    nodes += _gelu(gelu, "ffn_in_out", "gelu", const)
    nodes += linear("ffn_out", "gelu", F, C)
    nodes += [helper.make_node("Add", ["ln1", "ffn_out_out"], ["res2"], name="res2"), ln("ln2", "res2")]
    graph = helper.make_graph(nodes, "block", [graph_input],
                              [helper.make_tensor_value_info("ln2", TensorProto.FLOAT, [1, T, C])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)


def _shape(inits: list[onnx.TensorProto], name: str, shape: list[int]) -> str:
    inits.append(numpy_helper.from_array(np.array(shape, np.int64), name))
    return name


def _gelu(kind: str, x: str, out: str, const: Callable[[str, float], str]) -> list[onnx.NodeProto]:
    if kind == "op":
        return [helper.make_node("Gelu", [x], [out], name="gelu")]
    return [  # x * 0.5 * (1 + erf(x / sqrt 2)), as torch.onnx exports nn.GELU
        helper.make_node("Div", [x, const("sqrt2", np.sqrt(2.0))], ["g_div"], name="g_div"),
        helper.make_node("Erf", ["g_div"], ["g_erf"], name="g_erf"),
        helper.make_node("Add", ["g_erf", const("one", 1.0)], ["g_add"], name="g_add"),
        helper.make_node("Mul", [x, "g_add"], ["g_mul"], name="g_mul"),
        helper.make_node("Mul", ["g_mul", const("half", 0.5)], [out], name="g_half"),
    ]


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def _x(seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(size=(1, T, C)).astype(np.float32)}


# ------------------------------------------------------------------------------------------------ families


def test_detect_family() -> None:
    assert detect_family(_encoder_block()) == "transformer-encoder"
    conv = helper.make_graph(
        [helper.make_node("Conv", ["img", "cw"], ["y"], name="conv"), helper.make_node("Relu", ["y"], ["z"], name="r")],
        "cnn", [helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "cw")])
    assert detect_family(helper.make_model(conv)) == "cnn"
    mlp = helper.make_graph(
        [helper.make_node("MatMul", ["a", "mw"], ["y"], name="fc")], "mlp",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(np.ones((4, 2), np.float32), "mw")])
    assert detect_family(helper.make_model(mlp)) == "generic"


def test_unknown_family_lists_known_ones() -> None:
    with pytest.raises(BadInputError, match="transformer-encoder"):
        plan_quantization(_encoder_block(), family="transformer-encodr")


@pytest.mark.parametrize("family", QUANT_RECIPES.names())
def test_every_recipe_plans_the_encoder_block(family: str) -> None:
    """Meta-test: a registered recipe without a plan on a real graph fails here."""
    plan = plan_quantization(_encoder_block(), family=family)
    assert plan.op_types_to_quantize
    assert plan.notes[0].startswith(f"family: {family}")
    if plan.nodes_to_quantize is not None:  # selected nodes must exist and be of a quantized op type
        ops = {n.name: n.op_type for n in _encoder_block().graph.node}
        assert plan.nodes_to_quantize
        assert all(ops[name] in plan.op_types_to_quantize for name in plan.nodes_to_quantize)


# ------------------------------------------------------------------------------------- transformer selection


def test_transformer_selects_weight_matmuls_and_embedding_only() -> None:
    plan = plan_quantization(_encoder_block())
    assert set(plan.nodes_to_quantize or ()) == WEIGHT_MATMULS | {"embed"}
    # attention MatMuls (two activations), Add, LayerNorm, Softmax and GELU stay float
    assert not {"scores", "context", "res1", "ln1", "softmax", "g_mul"} & set(plan.nodes_to_quantize or ())
    assert plan.extra_options["OpTypesToExcludeOutputQuantization"] == ["MatMul", "Gemm"]
    assert plan.extra_options["MatMulConstBOnly"] is True
    assert (plan.per_channel, plan.activation_type, plan.weight_type) == (True, "uint8", "int8")


@pytest.mark.parametrize("gelu", ["erf", "op"])
def test_transformer_branch_points_by_role(gelu: str) -> None:
    plan = plan_quantization(_encoder_block(gelu=gelu))
    points = {p.tensor: p for p in plan.branch_points}
    assert set(points) == {"ln0", "ln1", "gelu"}  # attn_out reads ctx alone and is not smoothed: no point
    assert (points["ln0"].role, set(points["ln0"].matmuls), points["ln0"].alpha) == (ROLE_QKV, {"q", "k", "v"}, 0.3)
    assert (points["ln1"].role, points["ln1"].matmuls, points["ln1"].alpha) == (ROLE_FFN_IN, ("ffn_in",), 0.7)
    assert (points["gelu"].role, points["gelu"].matmuls, points["gelu"].alpha) == (ROLE_FFN_OUT, ("ffn_out",), 0.85)


def test_exclude_keeps_node_float_and_out_of_its_branch() -> None:
    plan = plan_quantization(_encoder_block(), exclude=["v", "ffn_out"])
    assert "v" not in (plan.nodes_to_quantize or ()) and "ffn_out" not in (plan.nodes_to_quantize or ())
    assert plan.nodes_to_exclude == ("v", "ffn_out")
    points = {p.tensor: p for p in plan.branch_points}
    assert set(points["ln0"].matmuls) == {"q", "k"} and "gelu" not in points


def test_exclude_unknown_node_suggests_the_close_name() -> None:
    with pytest.raises(BadInputError, match="did you mean 'ffn_out'"):
        plan_quantization(_encoder_block(), exclude=["ffn_ou"])


def test_unnamed_weight_matmul_is_a_bad_input() -> None:
    model = _encoder_block()
    next(n for n in model.graph.node if n.name == "ffn_in").name = ""
    with pytest.raises(BadInputError, match="has no name"):
        plan_quantization(model)


def test_generic_isolates_shared_inputs_without_smoothing() -> None:
    plan = plan_quantization(_encoder_block(), family="generic")
    assert set(plan.nodes_to_quantize or ()) == WEIGHT_MATMULS
    assert {(p.tensor, p.alpha) for p in plan.branch_points} == {("ln0", None), ("ln1", None)}


# ------------------------------------------------------------------------------------------------ SmoothQuant


def test_smoothing_scales_limits() -> None:
    act, weight = np.array([8.0, 2.0, 0.0]), np.array([0.5, 4.0, 1.0])
    np.testing.assert_allclose(smoothing_scales(act, weight, alpha=1.0), [8.0, 2.0, 1e-5], rtol=1e-6)
    np.testing.assert_allclose(smoothing_scales(act, weight, alpha=0.0), [2.0, 0.25, 1.0], rtol=1e-6)
    with pytest.raises(BadInputError, match="alpha"):
        smoothing_scales(act, weight, alpha=1.5)


def test_smoothquant_preserves_fp32_outputs_and_leaves_residual_float() -> None:
    model = _encoder_block(float_input=True)
    plan = plan_quantization(model)
    absmax = {p.tensor: np.abs(np.random.default_rng(2).normal(size=p_channels(p))) * 10 for p in plan.branch_points}
    smoothed = apply_smoothquant(model, absmax, points=plan.branch_points)
    onnx.checker.check_model(smoothed)
    for seed in range(3):
        np.testing.assert_allclose(_run(smoothed, _x(seed)), _run(model, _x(seed)), atol=1e-5)
    nodes = {n.name: n for n in smoothed.graph.node}
    muls = [n for n in smoothed.graph.node if n.name.endswith("/quant_branch")]
    assert len(muls) == 3 and all(n.op_type == "Mul" for n in muls)
    assert {nodes[m].input[0] for m in ("q", "k", "v")} == {"ln0/quant_branch"}
    assert nodes["res1"].input[0] == "ln0" and nodes["res2"].input[0] == "ln1"  # residual reads the float tensor
    weights = {t.name: numpy_helper.to_array(t) for t in smoothed.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert not np.allclose(weights["ffn_out_w"], original["ffn_out_w"])
    assert len(model.graph.node) == len(smoothed.graph.node) - 3  # input model untouched


def p_channels(point: BranchPoint) -> int:
    return F if point.tensor == "gelu" else C


def test_identity_branch_when_alpha_is_none() -> None:
    model = _encoder_block(float_input=True)
    points = [BranchPoint("ln1", ("ffn_in",), ROLE_FFN_IN, None)]
    branched = apply_smoothquant(model, {}, points=points)
    nodes = {n.name: n for n in branched.graph.node}
    assert nodes["ln1/quant_branch"].op_type == "Identity" and nodes["ffn_in"].input[0] == "ln1/quant_branch"
    np.testing.assert_array_equal(_run(branched, _x()), _run(model, _x()))


def test_tied_weight_is_copied_not_scaled_in_place() -> None:
    model = _encoder_block(float_input=True)
    next(n for n in model.graph.node if n.name == "k").input[1] = "q_w"  # q and k share one weight
    points = [BranchPoint("ln0", ("q",), ROLE_QKV, 0.5)]
    smoothed = apply_smoothquant(model, {"ln0": np.full(C, 5.0)}, points=points)
    nodes = {n.name: n for n in smoothed.graph.node}
    assert nodes["k"].input[1] == "q_w" and nodes["q"].input[1] != "q_w"
    np.testing.assert_allclose(_run(smoothed, _x()), _run(model, _x()), atol=1e-5)


def test_missing_absmax_is_a_bad_input() -> None:
    model = _encoder_block(float_input=True)
    with pytest.raises(BadInputError, match="collect_channel_absmax"):
        apply_smoothquant(model, {}, points=plan_quantization(model).branch_points)


def test_collect_channel_absmax_matches_numpy(tmp_path: Path) -> None:
    model = _encoder_block(float_input=True)
    path = tmp_path / "block.onnx"
    onnx.save(model, str(path))
    feeds = [_x(seed) for seed in range(4)]
    absmax = collect_channel_absmax(path, feeds, tensors=["ln1", "gelu"])
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend([onnx.ValueInfoProto(name="ln1"), onnx.ValueInfoProto(name="gelu")])
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = [session.run(["ln1", "gelu"], f) for f in feeds]
    np.testing.assert_allclose(absmax["ln1"], np.max([np.abs(o[0]).max(axis=(0, 1)) for o in outs], axis=0))
    assert absmax["gelu"].shape == (F,)


def test_plan_through_ort_quantizer_keeps_residual_float(tmp_path: Path) -> None:
    """The whole seam on the micro block: branches -> MinMax ranges -> QDQQuantizer. Q/DQ only on MatMul inputs."""
    from onnxruntime.quantization import CalibrationMethod, QuantType, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    model = _encoder_block(float_input=True)
    plan = plan_quantization(model)
    feeds = [_x(seed) for seed in range(8)]
    path = tmp_path / "block.onnx"
    onnx.save(model, str(path))
    smoothed = apply_smoothquant(model, collect_channel_absmax(path, feeds, tensors=["ln0", "ln1", "gelu"]),
                                 points=plan.branch_points)
    names = [o for n in smoothed.graph.node for o in n.output]
    probe = onnx.ModelProto()
    probe.CopyFrom(smoothed)
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    values = [dict(zip(names, session.run(names, f), strict=True)) for f in feeds]
    ranges = TensorsData(CalibrationMethod.MinMax, {
        n: TensorData(lowest=np.float32(min(v[n].min() for v in values)), highest=np.float32(max(v[n].max() for v in values)))
        for n in names})
    inferred = onnx.shape_inference.infer_shapes(smoothed)
    quantized = QDQQuantizer(inferred, plan.per_channel, False, QuantType.QInt8, QuantType.QUInt8, ranges,
                             list(plan.nodes_to_quantize or ()), [], list(plan.op_types_to_quantize),
                             dict(plan.extra_options)).quantize_model()
    producer = {o: n for n in quantized.graph.node for o in n.output}
    reads_dq = {n.name for n in quantized.graph.node
                if any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in n.input)}
    assert reads_dq == WEIGHT_MATMULS  # not the residual Adds, LayerNorms, Softmax or attention MatMuls
    reference, result = _run(model, _x(9)), _run(quantized, _x(9))
    cosine = (reference * result).sum(-1) / np.linalg.norm(reference, axis=-1) / np.linalg.norm(result, axis=-1)
    assert cosine.min() > 0.99


# ------------------------------------------------------------------------------------------- a real export


def test_plan_on_exported_bert_finds_every_role(tmp_path: Path) -> None:
    """torch.onnx's BERT graph (erf-GELU, opset 17 LayerNormalization), 2 layers: the patterns hold on it."""
    torch = pytest.importorskip("torch")
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, attn_implementation="eager")
    bert = BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(0, 50, (1, 6))
    path = tmp_path / "bert.onnx"
    torch.onnx.export(bert, (ids, torch.ones_like(ids)), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state"], opset_version=17, dynamo=False)
    model = onnx.load(str(path))
    plan = plan_quantization(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    selected = plan.nodes_to_quantize or ()
    assert sorted(ops[n] for n in selected).count("MatMul") == 12  # (q, k, v, attn-out, FFN-in, FFN-out) x 2
    assert sum(ops[n] == "Gather" for n in selected) == 3           # word, position, token-type tables
    roles = sorted(p.role for p in plan.branch_points)
    assert roles == sorted([ROLE_QKV, ROLE_FFN_IN, ROLE_FFN_OUT] * 2)


# ------------------------------------------------------------------------------------ the core claim, MiniLM


@pytest.mark.slow
def test_minilm_recipe_keeps_embeddings(tmp_path: Path, minilm_path: Path) -> None:
    """all-MiniLM-L6-v2 through the whole seam: static INT8 QDQ, file <= 0.26x, cosine mean >= 0.995, min >= 0.98.

    Measured 0.9972 / 0.989 on 476 held-out bundled sentences with 200 calibration ones; here 120 + 60 to stay fast.
    """
    import torch
    from onnxruntime.quantization import CalibrationMethod, QuantType, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from transformers import AutoModel, AutoTokenizer

    from edgepack.calibration_data import read_samples, sample_path, split_samples, tokenize_batches
    from edgepack.quantization.calibrators import collect_tensor_ranges, make_calibrator
    from edgepack.quantization.quantize import tensors_to_calibrate

    class Pooled(torch.nn.Module):  # sentence-transformers head: mean pooling + L2 normalise
        def __init__(self, encoder: torch.nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor):  # noqa: ANN201
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state       # (B, T, C)
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)                         # (B, T, 1)
            return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=1)

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    module = Pooled(AutoModel.from_pretrained(minilm_path, attn_implementation="eager")).eval()
    example = tuple(torch.from_numpy(a) for a in next(tokenize_batches(
        tokenizer, ["a b", "c d e"], batch_size=2, max_length=16, padding="longest", input_names=names)).values())
    fp32 = tmp_path / "fp32.onnx"
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    torch.onnx.export(module, example, str(fp32), input_names=names, output_names=["sentence_embedding"],
                      dynamic_axes=axes, opset_version=17, dynamo=False)

    split = split_samples(read_samples(sample_path()), n_calibration=120, n_evaluation=60, seed=0, source="samples")

    def feeds(samples: list) -> list[dict[str, np.ndarray]]:  # batch 1, unpadded: (1, T) int64 per input
        return list(tokenize_batches(tokenizer, [s.text for s in samples], batch_size=1, max_length=128,
                                     padding="longest", input_names=names))

    calibration, evaluation = feeds(split.calibration), feeds(split.evaluation)

    model = onnx.load(str(fp32))
    plan = plan_quantization(model)
    tensors = [p.tensor for p in plan.branch_points if p.alpha is not None]
    smoothed = apply_smoothquant(model, collect_channel_absmax(fp32, calibration, tensors=tensors),
                                 points=plan.branch_points)
    smoothed_path = tmp_path / "smoothed.onnx"
    onnx.save(smoothed, str(smoothed_path))
    ranges = collect_tensor_ranges(smoothed_path, calibration, tensors=tensors_to_calibrate(smoothed, plan),
                                   calibrator=make_calibrator("minmax"))
    data = TensorsData(CalibrationMethod.MinMax, {
        k: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for k, (lo, hi) in ranges.items()})
    quantized = QDQQuantizer(onnx.shape_inference.infer_shapes(smoothed), plan.per_channel, False, QuantType.QInt8,
                             QuantType.QUInt8, data, list(plan.nodes_to_quantize or ()), [],
                             list(plan.op_types_to_quantize), dict(plan.extra_options)).quantize_model()
    int8 = tmp_path / "int8.onnx"
    onnx.save(quantized, str(int8))

    assert int8.stat().st_size <= 0.26 * fp32.stat().st_size
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fp32, int8)]
    reference, result = (np.concatenate([s.run(None, f)[0] for f in evaluation]) for s in sessions)  # (N, 384) each
    cosine = (reference * result).sum(1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(result, axis=1)
    assert cosine.mean() >= 0.995 and cosine.min() >= 0.98, (cosine.mean(), cosine.min())
