"""Family onnx: a user's ONNX file from another toolchain (built with onnx.helper): export, metric, quantize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from edgepack import stages
from edgepack.errors import BadInputError
from edgepack.families import open_model
from edgepack.recipe import QuantizeSection

FAMILY = "onnx"


def mlp(path: Path) -> Path:
    """x (batch, 8) -> MatMul -> Relu -> MatMul -> y (batch, 4), opset 13, named nodes, as another exporter writes."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "W2")]
    nodes = [oh.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"), oh.make_node("Relu", ["h"], ["r"], name="act"),
             oh.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    graph = oh.make_graph(nodes, "mlp", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def arrays(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(8).astype(np.float32)} for _ in range(n)]


def test_export_is_not_needed_and_says_so(tmp_path):
    family = open_model(str(mlp(tmp_path / "mlp.onnx")))
    assert family.name == FAMILY and family.io.input_names == ["x"] and family.io.primary_output == "y"
    assert family.io.inputs[0].dims == ("batch", 8)
    with pytest.raises(BadInputError, match="is already ONNX"):
        family.load_torch()
    with pytest.raises(BadInputError, match="text data needs a tokenizer"):
        family.tokenizer  # noqa: B018


def test_metric_is_fidelity_on_the_first_output(tmp_path):
    family = open_model(str(mlp(tmp_path / "mlp.onnx")))
    ref = [{"y": np.array([[1.0, 0.0, 0.0, 0.0]])}]
    assert family.fidelity(ref, [{"y": np.array([[1.0, 1.0, 0.0, 0.0]])}])["cosine_mean"] == pytest.approx(0.7071068)
    assert family.task_metrics(ref, arrays(1)) == {}


def test_quantize_through_the_stage(tmp_path):
    path = mlp(tmp_path / "mlp.onnx")
    family = open_model(str(path))
    result = stages.quantize(path, family, calibration=arrays(16), options=QuantizeSection(max_cosine_drop=None),
                             max_length=1, padding="longest", root=tmp_path)
    ops = [n.op_type for n in onnx.load(str(result.folder / "model.onnx")).graph.node]
    assert ops.count("MatMul") == 2 and ops.count("DequantizeLinear") >= 2
    assert result.manifest["model"]["family"] == FAMILY
