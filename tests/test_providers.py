"""Provider paths end to end on tiny onnx.helper graphs: CPU, mobile-cpu profiles, QNN HTP (emulated, plugin EP),
NNAPI / CoreML static analysis, coverage with a known unsupported op, fixed shapes and padding, bad input."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.errors import BadInputError, EdgepackError
from edgepack.runtime.coverage import coverage_from_assignment
from edgepack.runtime.fixed_shape import (
    convert_fp16,
    feed_mismatch,
    initializer_bytes,
    make_shapes_fixed,
    pad_feed,
    sequence_outputs,
    trim_outputs,
)
from edgepack.runtime.metrics import fidelity
from edgepack.runtime.probe import ProbeOptions, measure
from edgepack.runtime.providers import get_provider, parse_providers

FAST = ProbeOptions(warmup=1, runs=3, timeout_s=120)
HAS_QNN = importlib.util.find_spec("onnxruntime_qnn") is not None


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _mlp(path: Path) -> Path:
    """y = relu(x @ W); x: (batch, 256) float32, W: (256, 256), big enough for ORT to prepack it (256 KiB)."""
    weight = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32) / 16
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 256])],
        initializer=[numpy_helper.from_array(weight, "W")])
    return _save(graph, path)


def _erf_between_matmuls(path: Path, *, reduce: bool = False) -> Path:
    """x (1, seq, 16) -> MatMul -> Erf -> MatMul -> y (1, seq, 8) [-> ReduceL2 over axis 2 -> (1, seq, 1)].

    Erf alone is an op QNN HTP and NNAPI do not take: it must split the NPU graph in two.
    """
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Erf", ["h"], ["e"]),
             helper.make_node("MatMul", ["e", "W2"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", 8])]
    if reduce:
        nodes.append(helper.make_node("ReduceL2", ["y"], ["n"], axes=[2], keepdims=1))
        outputs = [helper.make_tensor_value_info("n", TensorProto.FLOAT, [1, "seq", 1])]
    graph = helper.make_graph(
        nodes, "erf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", 16])], outputs,
        initializer=[numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32) / 4, "W1"),
                     numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32) / 4, "W2")])
    return _save(graph, path)


def _sequence_feed(length: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((1, length, 16)).astype(np.float32)}


def _quantized(float_path: Path, out: Path) -> Path:
    """Static INT8 QDQ (uint8 activations, int8 per-channel weights) with ORT's own quantize_static."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([_sequence_feed(6, seed) for seed in range(16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    quantize_static(str(float_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


# ------------------------------------------------------------------------------------------- registry / names


def test_mobile_cpu_family_expands_and_profiles_are_checked():
    keys = [p.key for p in parse_providers("cpu,mobile-cpu,qnn-htp/soc69")]
    assert keys == ["cpu", "mobile-cpu/t1", "mobile-cpu/t2", "mobile-cpu/t4", "mobile-cpu/t2-lean",
                    "mobile-cpu/t2-ort", "qnn-htp/soc69"]
    plan = get_provider("mobile-cpu/t4-lean-ort").session_plan(cache_dir=Path("cache"))
    assert (plan.threads, plan.lean_memory, plan.profile_memory) == (4, True, True)
    assert get_provider("mobile-cpu/t4-lean-ort").model_prep().ort_format
    with pytest.raises(BadInputError, match="'mobile-cpu/t0': unknown profile; write t<threads>"):
        get_provider("mobile-cpu/t0")
    with pytest.raises(BadInputError, match="'cpu/t2': unknown profile; it takes no profile"):
        get_provider("cpu/t2")
    with pytest.raises(BadInputError, match="'mobile-cpu/t2' is given twice"):
        parse_providers("mobile-cpu,mobile-cpu/t2")
    with pytest.raises(BadInputError, match="names 5 profiles"):
        measure(Path("m.onnx"), latency_feed={}, evaluation_feeds=[], workdir=Path("."),
                options=ProbeOptions(provider="mobile-cpu"))


def test_gpu_providers_plan_fp16_io_binding_and_engine_cache(tmp_path):
    trt = get_provider("tensorrt/fp16")
    plan = trt.session_plan(cache_dir=tmp_path)
    options = plan.providers[0][1]
    assert plan.providers[1] == "CUDAExecutionProvider" and plan.io_binding_device == "cuda"
    assert options["trt_engine_cache_path"] == str(tmp_path / "tensorrt-engines")
    assert options["trt_fp16_enable"] == "True" and trt.model_prep().fp16
    assert not get_provider("cuda").model_prep().fp16
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "pip install 'edgepack[gpu]'" in get_provider("cuda").availability()


def test_fp16_conversion_keeps_float32_io(tmp_path):
    converted = convert_fp16(_mlp(tmp_path / "m.onnx"), tmp_path / "m16.onnx")
    model = onnx.load(converted)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert {init.data_type for init in model.graph.initializer} == {TensorProto.FLOAT16}
    assert initializer_bytes(converted) == 256 * 256 * 2  # half of the float32 weight


# ------------------------------------------------------------------------------------------------- coverage


def test_coverage_counts_partitions_and_fallback():
    assignment = [("QNNExecutionProvider", ["DequantizeLinear", "MatMul", "QuantizeLinear"]),
                  ("CPUExecutionProvider", ["Erf"]), ("CPUExecutionProvider", ["QuantizeLinear"]),
                  ("QNNExecutionProvider", ["Gemm", "Add"])]
    cov = coverage_from_assignment(assignment, target="QNNExecutionProvider")
    assert (cov["nodes_on_ep"], cov["nodes_total"], cov["partitions"]) == (5, 7, 2)
    assert cov["fallback_ops"] == {"Erf": 1, "QuantizeLinear": 1}
    assert (cov["matmul_on_ep"], cov["matmul_total"]) == (2, 2)  # Gemm is a fused MatMul
    # A kernel EP lists each node as its own subgraph: all nodes on it is one partition, not four.
    cpu = coverage_from_assignment([("CPUExecutionProvider", ["MatMul"])] * 4, target="CPUExecutionProvider")
    assert (cpu["partitions"], cpu["nodes_on_ep"], cpu["fallback_ops"]) == (1, 4, {})
    assert coverage_from_assignment([], target="CPUExecutionProvider") == {}


# -------------------------------------------------------------------------------------- fixed shapes, padding


def test_fixed_shapes_padding_and_trimming(tmp_path):
    model = _erf_between_matmuls(tmp_path / "m.onnx")
    assert sequence_outputs(model) == {"y"}
    fixed = onnx.load(make_shapes_fixed(model, tmp_path / "fixed.onnx", shapes={"x": [1, 6, 16]}))
    assert [d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim] == [1, 6, 16]
    assert [d.dim_value for d in fixed.graph.output[0].type.tensor_type.shape.dim] == [1, 6, 8]
    padded, length = pad_feed(_sequence_feed(4, 0), {"x": [1, 6, 16]}, index=2)
    assert padded["x"].shape == (1, 6, 16) and length == 4 and not padded["x"][0, 4:].any()
    trimmed = trim_outputs({"y": np.ones((1, 6, 8)), "pooled": np.ones((1, 6))}, names={"y"}, length=4)
    assert trimmed["y"].shape == (1, 4, 8) and trimmed["pooled"].shape == (1, 6)
    with pytest.raises(BadInputError, match=r"evaluation feed 2: input 'x' has shape \[1, 9, 16\], larger than"):
        pad_feed(_sequence_feed(9, 0), {"x": [1, 6, 16]}, index=2)
    with pytest.raises(BadInputError, match=r"input 'x' \[1, 'seq', 16\] cannot take shape \[1, 6\]"):
        make_shapes_fixed(model, tmp_path / "bad.onnx", shapes={"x": [1, 6]})


def test_feed_mismatch_names_the_input_and_shapes(tmp_path):
    model = _erf_between_matmuls(tmp_path / "m.onnx")
    assert feed_mismatch(model, _sequence_feed(3, 0)) is None
    assert "input 'x' (float32 [1, 'seq', 16]) has no array in the data (it has: input_ids int64 [1, 3])" in \
        feed_mismatch(model, {"input_ids": np.zeros((1, 3), np.int64)})
    assert "input 'x' expects float32 [1, 'seq', 16], the data gives float32 [1, 3, 4]" in \
        feed_mismatch(model, {"x": np.zeros((1, 3, 4), np.float32)})
    assert "the data has array(s) z that the model has no input for" in \
        feed_mismatch(model, {**_sequence_feed(3, 0), "z": np.zeros(1)})


# ------------------------------------------------------------------------------------------ CPU and mobile CPU


def test_cpu_coverage_and_memory_breakdown(tmp_path):
    model = _mlp(tmp_path / "m.onnx")
    feed = {"x": np.ones((1, 256), np.float32)}
    result = measure(model, latency_feed=feed, evaluation_feeds=[feed], workdir=tmp_path / "w", options=FAST)
    assert result.status == "ok", result.error
    cov = result.coverage
    assert (cov["nodes_on_ep"], cov["nodes_total"], cov["partitions"], cov["fallback_ops"]) == (2, 2, 1, {})
    breakdown = result.memory_mb["breakdown"]
    assert breakdown["initializers"] == pytest.approx(0.25)  # 256 x 256 float32 = 256 KiB
    # ORT packs W for its GEMM and frees the original: all of it is prepacked, none is read as stored.
    assert breakdown["prepacked"] == pytest.approx(0.25) and breakdown["weights"] == pytest.approx(0.0)
    assert breakdown["activations"] >= 0 and breakdown["other"] >= 0
    assert breakdown["runtime_baseline"] == result.memory_mb["baseline"]
    assert "ORT profiler" in breakdown["methods"]["activations"]
    assert result.latency_ms["load_ms"] > 0


def test_mobile_cpu_lean_and_ort_format_profiles(tmp_path):
    model = _mlp(tmp_path / "m.onnx")
    feed = {"x": np.random.default_rng(3).standard_normal((2, 256)).astype(np.float32)}
    expected = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    results = {key: measure(model, latency_feed=feed, evaluation_feeds=[feed], workdir=tmp_path / "w",
                            options=ProbeOptions(provider=key, warmup=1, runs=3))
               for key in ("mobile-cpu/t1-lean", "mobile-cpu/t2-ort")}
    lean, ort_format = results["mobile-cpu/t1-lean"], results["mobile-cpu/t2-ort"]
    assert (lean.status, ort_format.status) == ("ok", "ok"), (lean.error, ort_format.error)
    assert (lean.latency_ms["threads"], ort_format.latency_ms["threads"]) == (1, 2)
    # No arena, no prepacking: the profiler has no allocator figures, activations are estimated from RSS.
    assert lean.memory_mb["breakdown"]["prepacked"] is None
    assert lean.memory_mb["breakdown"]["methods"]["activations"].startswith("estimated")
    assert ort_format.coverage == {}  # ORT records no node assignment for ORT-format models
    # An ORT-format model keeps its initializers in the arena, yet the split stays the same as from .onnx.
    assert ort_format.memory_mb["breakdown"]["prepacked"] == pytest.approx(0.25)
    for result in results.values():
        np.testing.assert_allclose(result.outputs[0]["y"], expected, rtol=1e-5, atol=1e-5)
    leftovers = [p.name for p in (tmp_path / "w").rglob("*") if p.suffix in (".ort", ".onnx", ".npz")]
    assert leftovers == []  # prepared model copies are deleted once measured


def test_a_relative_workdir_finds_the_prepared_model(tmp_path, monkeypatch):
    """The child runs inside its probe folder: a prepared copy (ORT format here; fixed shapes for QNN) named by a
    relative path was looked up under that folder (NO_SUCHFILE), e.g. with `--out runs/x`."""
    model = _mlp(tmp_path / "m.onnx")
    monkeypatch.chdir(tmp_path)
    feed = {"x": np.random.default_rng(3).standard_normal((2, 256)).astype(np.float32)}
    result = measure(model, latency_feed=feed, evaluation_feeds=[feed], workdir=Path("runs") / "w",
                     options=ProbeOptions(provider="mobile-cpu/t2-ort", warmup=0, runs=1))
    assert result.status == "ok", result.error


# ----------------------------------------------------------------------------------------- static analysis


def test_nnapi_and_coreml_static_partitions(tmp_path):
    model = _erf_between_matmuls(tmp_path / "m.onnx", reduce=True)
    feed = _sequence_feed(5, 0)
    nnapi, coreml = (measure(model, latency_feed=feed, evaluation_feeds=[feed], workdir=tmp_path / "w",
                             options=ProbeOptions(provider=name)) for name in ("nnapi", "coreml"))
    assert (nnapi.status, nnapi.how, coreml.how) == ("ok", "static-analysis", "static-analysis")
    assert nnapi.latency_ms == {} and nnapi.memory_mb == {} and nnapi.outputs == []
    # NNAPI takes MatMul but neither Erf nor ReduceL2: MatMul | Erf | MatMul | ReduceL2 -> two partitions.
    n = nnapi.coverage
    assert (n["nodes_on_ep"], n["nodes_total"], n["partitions"]) == (2, 4, 2)
    assert n["fallback_ops"] == {"Erf": 1, "ReduceL2": 1} and n["unsupported_ops"] == ["ai.onnx:Erf", "ai.onnx:ReduceL2"]
    # CoreML (ML Program) takes Erf too: one partition of three nodes.
    c = coreml.coverage
    assert (c["nodes_on_ep"], c["nodes_total"], c["partitions"], c["fallback_ops"]) == (3, 4, 1, {"ReduceL2": 1})
    assert c["matmul_on_ep"] == c["matmul_total"] == 2


# ------------------------------------------------------------------------------------------- QNN HTP (plugin)


@pytest.mark.qnn
@pytest.mark.skipif(not HAS_QNN, reason="onnxruntime_qnn is not installed (pip install 'edgepack[qnn]')")
def test_qnn_htp_emulated_coverage_and_fidelity_on_padded_feeds(tmp_path):
    model = _quantized(_erf_between_matmuls(tmp_path / "f.onnx"), tmp_path / "q.onnx")
    provider = get_provider("qnn-htp")
    plan = provider.session_plan(cache_dir=tmp_path)
    assert provider.availability() is None and plan.plugin is not None
    assert Path(plan.plugin.library_path).is_file() and plan.plugin_options["backend_path"].endswith("libQnnHtp.so")
    evaluation = [_sequence_feed(3, 10), _sequence_feed(5, 11)]
    result = measure(model, latency_feed=_sequence_feed(6, 12), evaluation_feeds=evaluation, workdir=tmp_path / "w",
                     options=ProbeOptions(provider="qnn-htp", warmup=0, runs=1))
    assert result.status == "ok", result.error
    assert result.how == ("device" if provider.how == "device" else "emulated")
    cov = result.coverage
    # Erf is not a QNN op: the HTP graph splits into two partitions around it, and both MatMuls stay on HTP.
    assert cov["partitions"] == 2 and cov["fallback_ops"].get("Erf") == 1
    assert cov["matmul_on_ep"] == cov["matmul_total"] == 2
    # Outputs come back at each sample's own length (padded to 6 for the fixed-shape model, then cut).
    assert [out["y"].shape for out in result.outputs] == [(1, 3, 8), (1, 5, 8)]
    # Fidelity against the FP32 model on the unpadded samples, as the harness measures it.
    fp32 = ort.InferenceSession(str(tmp_path / "f.onnx"), providers=["CPUExecutionProvider"])
    reference = [{"y": fp32.run(None, feed)[0]} for feed in evaluation]
    metrics = fidelity(reference, result.outputs, output="y")
    assert metrics["cosine_min"] > 0.99 and not math.isinf(metrics["sqnr_db"])  # INT8: close, never exact


# ------------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="needs onnxruntime-gpu and a CUDA GPU (pip install 'edgepack[gpu]')")
def test_cuda_fp16_with_io_binding_matches_cpu(tmp_path):
    model = _mlp(tmp_path / "m.onnx")
    feed = {"x": np.random.default_rng(4).standard_normal((1, 256)).astype(np.float32)}
    expected = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    for key, tolerance in (("cuda", 1e-3), ("cuda/fp16", 2e-2)):
        result = measure(model, latency_feed=feed, evaluation_feeds=[feed], workdir=tmp_path / "w",
                         options=ProbeOptions(provider=key, warmup=2, runs=5))
        assert result.status == "ok", result.error
        assert result.outputs[0]["y"].dtype == np.float32  # keep_io_types: float32 in and out
        np.testing.assert_allclose(result.outputs[0]["y"], expected, atol=tolerance, rtol=tolerance)
        assert result.coverage["matmul_on_ep"] == 1


@pytest.mark.gpu
@pytest.mark.skipif("TensorrtExecutionProvider" not in ort.get_available_providers(),
                    reason="needs onnxruntime-gpu with TensorRT and a CUDA GPU")
def test_tensorrt_writes_its_engine_cache(tmp_path):
    model = _mlp(tmp_path / "m.onnx")
    feed = {"x": np.ones((1, 256), np.float32)}
    result = measure(model, latency_feed=feed, evaluation_feeds=[feed], workdir=tmp_path / "w",
                     options=ProbeOptions(provider="tensorrt/fp16", warmup=1, runs=3, cache_dir=tmp_path / "cache"))
    assert result.status == "ok", result.error
    assert any((tmp_path / "cache" / "tensorrt-engines").iterdir())  # the next run loads the engine, not builds it


def test_session_providers_for_builtin_eps_and_configure_session_for_plugins(tmp_path):
    assert get_provider("mobile-cpu/t2").session_providers() == ["CPUExecutionProvider"]
    if not HAS_QNN:
        pytest.skip("onnxruntime_qnn is not installed")
    qnn = get_provider("qnn-htp")
    with pytest.raises(EdgepackError, match="plugin EP .*configure_session"):
        qnn.session_providers()  # naming it in providers= would silently run on the CPU
    options = ort.SessionOptions()
    providers = qnn.configure_session(options, cache_dir=tmp_path)
    session = ort.InferenceSession(str(_mlp(tmp_path / "m.onnx")), options, providers=providers)
    assert providers is None and session.get_providers()[0] == "QNNExecutionProvider"
