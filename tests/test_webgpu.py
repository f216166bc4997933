"""The WebGPU plugin EP (onnxruntime-ep-webgpu): registry, plan, and real runs where an adapter exists.

On a machine without a GPU, `webgpu` fails at session creation ("No supported adapters") and its test skips with
that message; `webgpu/software` takes Mesa's lavapipe (software Vulkan) where Dawn accepts it (Mesa >= 25 here, from
bookworm-backports, which .ci/run installs), so the GPU code path runs on the CPU, labelled emulated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.errors import BadInputError
from edgepack.runtime import ProbeOptions, get_provider, measure

OPTIONS = dict(warmup=1, runs=3, timeout_s=120)


def _model(path: Path) -> Path:
    """y = erf(relu(x @ W)) + x: x (1, 16) float32 (MatMul, an activation, a unary and a residual Add)."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((rng.standard_normal((16, 16)) / 4).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
         helper.make_node("Erf", ["b"], ["c"]), helper.make_node("Add", ["c", "x"], ["y"])], "webgpu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def test_webgpu_profiles_and_plugin_plan(tmp_path):
    assert [get_provider(k).how for k in ("webgpu", "webgpu/fp16", "webgpu/software", "webgpu/fp16-software")] \
        == ["device", "device", "emulated", "emulated"]
    assert get_provider("webgpu/fp16").model_prep().fp16 and not get_provider("webgpu").model_prep().fp16
    with pytest.raises(BadInputError, match="write webgpu, webgpu/fp16, webgpu/software"):
        get_provider("webgpu/int8")
    reason = get_provider("webgpu").availability()
    if reason is not None:
        assert "pip install 'edgepack[webgpu]'" in reason or "onnxruntime>=1.24.4" in reason
        pytest.skip(reason)
    plan = get_provider("webgpu/software").session_plan(cache_dir=tmp_path)
    assert plan.plugin is not None and plan.plugin.registration_name == "webgpu"
    assert plan.expect_ep == "WebGpuExecutionProvider" and plan.providers == ()
    assert plan.plugin_env == {"ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER": "1"}
    assert get_provider("webgpu").session_plan(cache_dir=tmp_path).plugin_env == {}


def _run_or_skip(key: str, tmp_path: Path, feeds: list[dict[str, np.ndarray]]):
    provider = get_provider(key)
    if provider.availability() is not None:
        pytest.skip(provider.availability())
    result = measure(_model(tmp_path / "m.onnx"), latency_feed=feeds[0], evaluation_feeds=feeds,
                     workdir=tmp_path / key.replace("/", "_"), options=ProbeOptions(provider=key, **OPTIONS))
    if result.status == "failed" and any(why in (result.error or "") for why in ("adapter", "reports no device")):
        pytest.skip(f"{key}: session creation failed here: {result.error}")
    return result


@pytest.mark.parametrize("key, atol", [("webgpu/software", 1e-5), ("webgpu/fp16-software", 2e-2),
                                       ("webgpu", 1e-5), ("webgpu/fp16", 2e-2)])
def test_webgpu_runs_the_model_and_matches_the_cpu(key, atol, tmp_path):
    feeds = [{"x": np.random.default_rng(seed).standard_normal((1, 16)).astype(np.float32)} for seed in range(3)]
    result = _run_or_skip(key, tmp_path, feeds)
    assert result.status == "ok", result.error
    cpu = measure(_model(tmp_path / "m.onnx"), latency_feed=feeds[0], evaluation_feeds=feeds,
                  workdir=tmp_path / "cpu", options=ProbeOptions(**OPTIONS))
    for gpu, ref in zip(result.outputs, cpu.outputs, strict=True):
        assert gpu["y"].dtype == np.float32  # fp16 keeps float32 inputs and outputs
        np.testing.assert_allclose(gpu["y"], ref["y"], atol=atol)
    assert result.how == get_provider(key).how
    assert result.coverage["nodes_on_ep"] >= 3 and result.coverage["matmul_on_ep"] == 1
    assert result.latency_ms["runs"] == 3 and result.memory_mb["peak"] > result.memory_mb["baseline"]
