"""Family torch-module on a tiny CNN factory (`tests.tiny_models:make_cnn`): export, metric, quantize."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgepack import stages
from edgepack.errors import BadInputError
from edgepack.exporters.onnx import export_onnx
from edgepack.families import open_model
from edgepack.recipe import ExportSection, QuantizeSection
from tests.tiny_models import CNN_OPTIONS

FAMILY = "torch-module"


def images(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"pixel_values": rng.standard_normal((3, 16, 16)).astype(np.float32)} for _ in range(n)]


def test_export_matches_torch_with_a_dynamic_batch(tmp_path):
    family = open_model("tests.tiny_models:make_cnn", options=CNN_OPTIONS)
    assert family.name == FAMILY and family.io.dynamic_axes == {"pixel_values": {0: "batch"}, "logits": {0: "batch"}}
    metrics = export_onnx(family, tmp_path / "cnn.onnx", check_feeds=list(family.feeds(images(4))))
    assert metrics["check"]["logits"]["max_abs_diff"] < 1e-5
    assert metrics["parameters"] == sum(p.numel() for p in family.load_torch().parameters())
    session = ort.InferenceSession(str(tmp_path / "cnn.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {"pixel_values": np.zeros((5, 3, 16, 16), np.float32)})[0]
    assert out.shape == (5, 10)


def test_export_needs_its_inputs_stated():
    with pytest.raises(BadInputError, match="model.inputs is empty; family torch-module needs"):
        open_model("tests.tiny_models:make_cnn")
    family = open_model("tests.tiny_models:make_cnn", options=CNN_OPTIONS)
    with pytest.raises(BadInputError, match=r"input 'pixel_values': sample 0 has shape \[3, 8, 8\]"):
        list(family.feeds([{"pixel_values": np.zeros((3, 8, 8), np.float32)}]))
    with pytest.raises(BadInputError, match="cannot import 'tests.nope'"):
        open_model("tests.nope:make", options=CNN_OPTIONS).load_torch()


def test_metric_top1_agreement_and_accuracy():
    family = open_model("tests.tiny_models:make_cnn", options=CNN_OPTIONS)
    reference = [{"logits": np.array([[0.1, 2.0, 0.0]])}, {"logits": np.array([[3.0, 0.0, 0.0]])}]
    variant = [{"logits": np.array([[0.0, 1.9, 0.1]])}, {"logits": np.array([[0.0, 0.1, 0.2]])}]
    metrics = family.fidelity(reference, variant)
    assert metrics["top1_agreement"] == 0.5 and metrics["cosine_min"] < 0.2 < metrics["cosine_mean"]
    labelled = [{"pixel_values": np.zeros(1), "labels": np.array(1)}, {"pixel_values": np.zeros(1), "labels": np.array(0)}]
    assert family.task_metrics(variant, labelled) == {"top1_accuracy": 0.5}


def test_quantize_through_the_stage(tmp_path):
    family = open_model("tests.tiny_models:make_cnn", options=CNN_OPTIONS)
    exported = stages.export(family, check_samples=images(2), options=ExportSection(), max_length=1, root=tmp_path)
    artifact = open_model(str(exported.folder / "model.onnx"))
    assert artifact.name == FAMILY and artifact.io.input_names == ["pixel_values"]
    result = stages.quantize(exported.folder / "model.onnx", artifact, calibration=images(16, seed=1),
                             options=QuantizeSection(max_cosine_drop=None), max_length=1, padding="longest",
                             root=tmp_path)
    assert result.manifest["config"]["recipe"] == "auto"  # the graph decides: a CNN
    assert result.metrics["plan"]["notes"][0].startswith("family: cnn")
    ops = [n.op_type for n in onnx.load(str(result.folder / "model.onnx")).graph.node]
    assert ops.count("Conv") == 2 and "QuantizeLinear" in ops
