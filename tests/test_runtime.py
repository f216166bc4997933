"""edgepack.runtime: EP registry, subprocess probe (real child processes on tiny onnx.helper graphs), fidelity."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.errors import BadInputError, EdgepackError
from edgepack.runtime import PROVIDERS, ProbeOptions, cosine_rows, fidelity, get_provider, measure, parse_providers
from edgepack.runtime.devices import CHILD_FILE
from edgepack.runtime.probe import MEMORY_METHOD, _run_child, _write_request
from edgepack.runtime.providers import HOW_VALUES

FAST = ProbeOptions(warmup=3, runs=20, timeout_s=60)


def _matmul_add(path: Path, *, input_name: str = "x") -> Path:
    """y = x @ W + b, z = relu(y); x: (batch, 4) float32 with a dynamic batch dim, y and z: (batch, 3)."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", [input_name, "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"]),
         helper.make_node("Relu", ["y"], ["z"])],
        "matmul_add",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 3]) for name in ("y", "z")],
        initializer=[weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _feed(batch: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, 4)).astype(np.float32)}


# ------------------------------------------------------------------------------------------------ providers


def test_every_provider_is_usable_or_says_why_in_one_line():
    assert PROVIDERS.names() == ["coreml", "cpu", "cuda", "mobile-cpu", "nnapi", "qnn-htp", "tensorrt", "webgpu", "xnnpack"]
    for name in PROVIDERS:
        provider = get_provider(name)
        info = provider.info()
        assert (info.name, info.how) == (name, provider.how) and info.how in HOW_VALUES
        reason = provider.availability()
        assert reason is None or (reason.strip() and "\n" not in reason)
    assert get_provider("cpu").availability() is None
    assert get_provider("cpu").session_plan(cache_dir=Path("c")).providers == ("CPUExecutionProvider",)


def test_xnnpack_is_unavailable_with_a_reason_and_starts_no_process(tmp_path):
    if "XnnpackExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has XNNPACK")
    reason = get_provider("xnnpack").availability()
    assert reason is not None and "XNNPACK is not in the Linux onnxruntime wheel" in reason
    result = measure(_matmul_add(tmp_path / "m.onnx"), latency_feed=_feed(1, 0), evaluation_feeds=[],
                     workdir=tmp_path / "work", options=ProbeOptions(provider="xnnpack"))
    assert (result.status, result.error, result.outputs) == ("unavailable", reason, [])
    assert not (tmp_path / "work").exists()  # no probe folder, so no subprocess


def test_qnn_htp_reports_how_to_install_when_missing():
    if "QNNExecutionProvider" in ort.get_available_providers() or importlib.util.find_spec("onnxruntime_qnn"):
        pytest.skip("QNN is installed here")
    provider = get_provider("qnn-htp")
    assert provider.how == "emulated"
    assert provider.availability() == "onnxruntime_qnn is not installed; pip install 'edgepack[qnn]'"


def test_unknown_provider_lists_the_known_ones():
    with pytest.raises(BadInputError) as caught:
        get_provider("qnn")
    message = str(caught.value)
    assert "did you mean 'qnn-htp'" in message
    for name in PROVIDERS:
        assert name in message


def test_parse_providers():
    assert [p.name for p in parse_providers("cpu, qnn-htp")] == ["cpu", "qnn-htp"]
    with pytest.raises(BadInputError, match="empty provider name"):
        parse_providers("cpu,,qnn-htp")
    with pytest.raises(BadInputError, match="'cpu' is given twice"):
        parse_providers("cpu,cpu")
    with pytest.raises(BadInputError, match="known: coreml, cpu"):
        parse_providers("cpu,gpu")


# ---------------------------------------------------------------------------------------------------- probe


def test_measure_cpu_reports_latency_memory_and_exact_outputs(tmp_path):
    model = _matmul_add(tmp_path / "m.onnx")
    evaluation = [_feed(2, 1), _feed(3, 2), _feed(1, 3)]
    result = measure(model, latency_feed=_feed(1, 0), evaluation_feeds=evaluation, workdir=tmp_path / "work",
                     options=FAST)
    assert (result.status, result.how, result.error) == ("ok", "device", None)

    latency = result.latency_ms
    assert 0 < latency["min"] <= latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert latency["std"] >= 0 and latency["min"] <= latency["mean"] <= latency["max"]
    assert (latency["runs"], latency["warmup"], latency["threads"]) == (20, 3, 2)
    assert latency["shape"] == {"x": [1, 4]} and latency["first_run_ms"] > 0

    memory = result.memory_mb
    assert memory["method"] == MEMORY_METHOD
    assert 10 < memory["baseline"] <= memory["peak"]  # numpy + onnxruntime alone are tens of MiB
    assert memory["after_session"] > 0 and memory["after_first_run"] > 0
    assert memory["peak"] >= max(memory["after_session"], memory["after_first_run"])

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    assert len(result.outputs) == len(evaluation)
    for feed, outputs in zip(evaluation, result.outputs, strict=True):
        expected_y, expected_z = session.run(["y", "z"], feed)
        assert sorted(outputs) == ["y", "z"]
        assert outputs["y"].dtype == np.float32 and outputs["y"].shape == (len(feed["x"]), 3)
        np.testing.assert_array_equal(outputs["y"], expected_y)
        np.testing.assert_array_equal(outputs["z"], expected_z)

    json.dumps(result.to_report())  # report.json-ready, outputs left out
    (probe_dir,) = (tmp_path / "work").iterdir()
    assert sorted(p.name for p in probe_dir.iterdir()) == ["request.json", "result.json"]  # .npz cleaned up


def test_input_name_mismatch_fails_with_ort_message(tmp_path):
    model = _matmul_add(tmp_path / "m.onnx", input_name="input_ids")
    result = measure(model, latency_feed=_feed(1, 0), evaluation_feeds=[_feed(1, 1)], workdir=tmp_path,
                     options=FAST)
    assert result.status == "failed" and result.outputs == []
    assert "input_ids" in result.error and "\n" not in result.error


def test_truncated_model_fails_instead_of_raising(tmp_path):
    model = _matmul_add(tmp_path / "m.onnx")
    model.write_bytes(model.read_bytes()[:40])
    result = measure(model, latency_feed=_feed(1, 0), evaluation_feeds=[], workdir=tmp_path, options=FAST)
    assert result.status == "failed"
    assert "ONNXRuntimeError" in result.error


def test_timeout_kills_the_probe(tmp_path):
    model = _matmul_add(tmp_path / "m.onnx")
    result = measure(model, latency_feed=_feed(1, 0), evaluation_feeds=[], workdir=tmp_path,
                     options=ProbeOptions(timeout_s=0.05))
    assert result.status == "failed" and "did not finish within 0.05 s" in result.error


def test_a_crashed_child_reports_the_last_line_of_its_stderr(tmp_path):
    # The request file does not exist: the child dies with a traceback before it can write a result.
    failure = _run_child(tmp_path / "absent.json", tmp_path / "result.json", timeout_s=60)
    assert failure.startswith("the probe process exited with code 1: FileNotFoundError")
    assert "absent.json" in failure and not (tmp_path / "result.json").exists()


def test_missing_model_and_bad_options_are_input_errors(tmp_path):
    with pytest.raises(BadInputError, match="model file not found"):
        measure(tmp_path / "nope.onnx", latency_feed=_feed(1, 0), evaluation_feeds=[], workdir=tmp_path,
                options=FAST)
    with pytest.raises(BadInputError, match="runs=0"):
        ProbeOptions(runs=0)


def test_probe_child_is_one_standalone_file_that_imports_no_torch(tmp_path):
    model = _matmul_add(tmp_path / "m.onnx")
    plan = get_provider("cpu").session_plan(cache_dir=tmp_path)
    request = _write_request(model, plan, latency_feed=_feed(1, 0),
                             evaluation_feeds=[_feed(2, 1)], probe_dir=tmp_path, options=FAST)
    # The file alone, copied away from the package, in isolated mode (-I: no PYTHONPATH, no cwd on sys.path):
    # what a remote device runs. Then look at what it imported.
    alone = tmp_path / "elsewhere" / "probe_child.py"
    alone.parent.mkdir()
    alone.write_text(CHILD_FILE.read_text())
    script = ("import runpy, sys\n"
              f"sys.argv = ['probe_child.py', {str(request)!r}, 'result.json']\n"
              "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
              "except SystemExit:\n    pass\n"
              "print(sorted(m for m in ('torch', 'transformers', 'onnx', 'edgepack') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=alone.parent, check=True)
    assert json.loads((alone.parent / "result.json").read_text())["status"] == "ok"
    assert done.stdout.strip() == "[]"
    assert done.stderr == ""
    facts = json.loads(subprocess.run([sys.executable, "-I", str(alone), "--facts"], capture_output=True, text=True,
                                      timeout=60, check=True).stdout)
    assert facts["onnxruntime"] == ort.__version__ and "CPUExecutionProvider" in facts["ort_providers"]
    assert facts["cpu"] and facts["int8_isa"] and facts["memory_available_mb"] > 0


# -------------------------------------------------------------------------------------------------- metrics


def test_cosine_rows_zero_and_sign():
    a = np.array([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0], [3.0, -1.0]])
    b = np.array([[2.0, 4.0], [0.0, 0.0], [1.0, 0.0], [-3.0, 1.0]])
    np.testing.assert_allclose(cosine_rows(a, b), [1.0, 1.0, 0.0, -1.0])
    # (B, T, C) flattens to (B, T*C): orthogonal rows, cosine 0.
    x = np.zeros((1, 2, 2))
    x[0, 0, 0] = 1.0
    y = np.zeros((1, 2, 2))
    y[0, 1, 1] = 1.0
    np.testing.assert_allclose(cosine_rows(x, y), [0.0])


def test_fidelity_identical_and_sign_flipped():
    ref = [{"y": np.arange(12, dtype=np.float32).reshape(3, 4) - 5}]
    same = fidelity(ref, ref, output="y")
    assert same == {"cosine_mean": 1.0, "cosine_min": 1.0, "max_abs_diff": 0.0, "sqnr_db": math.inf}
    flipped = fidelity(ref, [{"y": -ref[0]["y"]}], output="y")
    assert flipped["cosine_mean"] == pytest.approx(-1.0) and flipped["cosine_min"] == pytest.approx(-1.0)
    assert flipped["max_abs_diff"] == pytest.approx(12.0)  # 2 * |−6|
    assert flipped["sqnr_db"] == pytest.approx(10 * math.log10(1 / 4))  # noise = (2·ref)² = 4·signal


def test_fidelity_known_sqnr_over_several_feeds():
    ref = [{"y": np.ones((2, 10), np.float32)}, {"y": np.ones((3, 10), np.float32)}]
    noisy = [{"y": r["y"] + np.float32(0.1)} for r in ref]
    metrics = fidelity(ref, noisy, output="y")
    assert metrics["sqnr_db"] == pytest.approx(20.0, abs=1e-4)  # Σ1 / Σ0.01 = 100
    assert metrics["max_abs_diff"] == pytest.approx(0.1, abs=1e-6)
    assert metrics["cosine_min"] == pytest.approx(1.0)
    # Rows of all feeds are pooled: cosines [1, -1] and [1] -> mean 1/3, min -1.
    a = np.array([[1.0, 2.0], [1.0, 2.0]])
    mixed = fidelity([{"y": a}, {"y": a[:1]}], [{"y": a * [[1], [-1]]}, {"y": a[:1]}], output="y")
    assert mixed["cosine_mean"] == pytest.approx(1 / 3) and mixed["cosine_min"] == pytest.approx(-1.0)


def test_fidelity_mismatches_name_the_output():
    ref = [{"y": np.ones((1, 2))}]
    with pytest.raises(EdgepackError, match="output 'y': reference has 1 feeds' outputs, variant 2"):
        fidelity(ref, ref * 2, output="y")
    with pytest.raises(EdgepackError, match="output 'z' is missing from the reference"):
        fidelity(ref, ref, output="z")
    with pytest.raises(EdgepackError, match="output 'y', feed 0: shape"):
        fidelity(ref, [{"y": np.ones((1, 3))}], output="y")


# -------------------------------------------------------------------------------------------------- harness


def _array_samples(count: int) -> list[dict[str, np.ndarray]]:
    """Array samples without the batch dim, as an .npz reader yields them: x (4,) float32."""
    rng = np.random.default_rng(7)
    return [{"x": rng.standard_normal(4).astype(np.float32)} for _ in range(count)]


def _harness(tmp_path: Path, variants: dict[str, Path], providers: str, **settings: int) -> dict:
    from edgepack.families import open_model
    from edgepack.runtime.harness import ValidationSettings, validate_variants

    family = open_model(str(variants["fp32"]))
    options = ValidationSettings(warmup=1, runs=3, **settings)
    compared = {name: None if name == "fp32" else "fp32" for name in variants}
    return validate_variants(variants, family=family, samples=_array_samples(5), providers=parse_providers(providers),
                             workdir=tmp_path / "validate", settings=options, compared_to=compared,
                             cache_dir=tmp_path / "ep-cache")


def test_harness_rows_and_an_ep_failure_does_not_stop_the_others(tmp_path):
    good = _matmul_add(tmp_path / "good.onnx")
    broken = _matmul_add(tmp_path / "broken.onnx")
    model = onnx.load(broken)  # W (4, 3) -> (5, 3): valid protobuf, but ORT's shape inference rejects the MatMul
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((5, 3), np.float32), "W"))
    onnx.save(model, broken)
    report = _harness(tmp_path, {"fp32": good, "broken": broken}, "cpu,mobile-cpu/t1-lean,nnapi")

    cpu, lean, nnapi = (report["fp32"]["providers"][key] for key in ("cpu", "mobile-cpu/t1-lean", "nnapi"))
    assert cpu["metrics"]["cosine_min"] == 1.0 and cpu["evaluation_samples"] == 5  # the reference vs itself
    assert lean["metrics"]["cosine_min"] == pytest.approx(1.0) and lean["latency_ms"]["threads"] == 1
    assert cpu["coverage"]["nodes_on_ep"] == cpu["coverage"]["nodes_total"] > 0
    assert (nnapi["status"], nnapi["how"], set(nnapi)) == ("ok", "static-analysis", {"status", "how", "coverage", "device"})
    for key in ("cpu", "mobile-cpu/t1-lean", "nnapi"):
        row = report["broken"]["providers"][key]
        assert row["status"] == "failed" and "\n" not in row["error"]
        assert "matmul" in row["error"].lower() or "shape" in row["error"].lower()
    json.dumps(report)


def test_harness_rejects_data_that_does_not_fit_a_variant(tmp_path):
    good = _matmul_add(tmp_path / "good.onnx")
    other = _matmul_add(tmp_path / "other.onnx", input_name="input_ids")
    with pytest.raises(BadInputError, match=r"variant 'int8' \(other.onnx\): input 'input_ids' \(float32 "
                                            r"\['batch', 4\]\) has no array in the data \(it has: x float32 \[1, 4\]\)"):
        _harness(tmp_path, {"fp32": good, "int8": other}, "cpu")


@pytest.mark.qnn
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_qnn") is None, reason="onnxruntime_qnn is not installed")
def test_harness_emulated_rows_use_a_sample_subset_against_the_same_reference(tmp_path):
    report = _harness(tmp_path, {"fp32": _matmul_add(tmp_path / "m.onnx")}, "cpu,qnn-htp",
                      emulated_samples=2)["fp32"]["providers"]
    cpu, qnn = report["cpu"], report["qnn-htp"]
    assert (cpu["status"], qnn["status"]) == ("ok", "ok"), (cpu.get("error"), qnn.get("error"))
    assert (cpu["evaluation_samples"], qnn["evaluation_samples"]) == (5, 2)
    assert qnn["how"] == "emulated" and qnn["latency_ms"]["runs"] == 1 and qnn["latency_ms"]["warmup"] == 0
    assert qnn["metrics"]["cosine_min"] > 0.99  # FP32 runs as FP16 on the HTP: close to the CPU, not equal
    assert qnn["coverage"]["fallback_ops"] == {} and qnn["coverage"]["partitions"] == 1
