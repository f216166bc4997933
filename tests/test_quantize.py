"""The static INT8 driver on a tiny CNN: every calibrator runs, the graph is QDQ, outputs stay close; the budget."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgepack.errors import BadInputError, GateFailedError
from edgepack.exporters.onnx import export_onnx
from edgepack.families import open_model
from edgepack.quantization.calibrators import CALIBRATORS
from edgepack.quantization.quantize import QuantizeOptions, quantize_static
from edgepack.quantization.sensitivity import QuantBudget
from edgepack.runtime.metrics import cosine_rows
from tests.tiny_models import CNN_OPTIONS


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> tuple[Path, list[dict[str, np.ndarray]]]:
    adapter = open_model("tests.tiny_models:make_cnn", options=CNN_OPTIONS)
    rng = np.random.default_rng(0)
    samples = [{"pixel_values": rng.standard_normal((3, 16, 16)).astype(np.float32)} for _ in range(24)]
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    export_onnx(adapter, path, check_feeds=list(adapter.feeds(samples[:2])))
    return path, list(adapter.feeds(samples))


@pytest.mark.parametrize("calibrator", CALIBRATORS.names())
def test_every_calibrator_quantizes_a_cnn(cnn, tmp_path, calibrator):
    fp32, feeds = cnn
    out = tmp_path / "int8.onnx"
    metrics = quantize_static(fp32, out, calibration_feeds=lambda: iter(feeds[:16]), n_calibration=16,
                              options=QuantizeOptions(calibrator=calibrator))
    ops = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0 and ops["Conv"] == 2
    assert metrics["plan"]["notes"][0].startswith("family: cnn")
    want = ort.InferenceSession(str(fp32)).run(None, feeds[20])[0]
    got = ort.InferenceSession(str(out)).run(None, feeds[20])[0]
    assert cosine_rows(got, want).min() > 0.98


def test_unknown_calibrator_lists_the_known_ones():
    with pytest.raises(BadInputError, match=r"unknown calibrator 'minmx' \(did you mean 'minmax'\?\)"):
        QuantizeOptions(calibrator="minmx")


def test_excluded_node_must_exist(cnn, tmp_path):
    fp32, feeds = cnn
    with pytest.raises(BadInputError, match=r"quantize.exclude_nodes: node '/conv9/Conv' is not in the model"):
        quantize_static(fp32, tmp_path / "q.onnx", calibration_feeds=lambda: iter(feeds), n_calibration=24,
                        options=QuantizeOptions(exclude_nodes=("/conv9/Conv",)))
    assert not (tmp_path / "q.onnx").exists()


def test_an_unmeetable_budget_exits_3_naming_the_best_and_the_layers_tried(tiny_bert_dir, small_sentences, tmp_path):
    from edgepack.calibration_data import read_samples

    adapter = open_model(str(tiny_bert_dir))
    samples = read_samples(small_sentences)
    fp32 = tmp_path / "fp32.onnx"
    export_onnx(adapter, fp32, check_feeds=list(adapter.feeds(samples[:2])))
    check = (list(adapter.feeds(samples[:8])), "sentence_embedding")
    with pytest.raises(GateFailedError) as err:
        quantize_static(fp32, tmp_path / "q.onnx", calibration_feeds=lambda: adapter.feeds(samples[:16]),
                        n_calibration=16, budget=QuantBudget(max_cosine_drop=0.0, max_fallback_layers=2), check=check)
    message = str(err.value)
    assert "max_cosine_drop 0.0 not met: best cosine" in message and "tried: " in message
    assert message.count("/") >= 2  # two node names were tried
    assert not (tmp_path / "q.onnx").exists()


def test_a_graph_with_nothing_the_recipe_quantizes_is_one_line_naming_the_recipe(tmp_path, capsys):
    """A pooled embedding lookup (Gather, Mul, ReduceMean) has no weight layer for the generic recipe."""
    from edgepack.cli import main
    from tests.test_generated import foreign_encoder

    model = foreign_encoder(tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cal.npz", input_ids=rng.integers(0, 1000, (8, 16)), attention_mask=np.ones((8, 16), np.int64))
    assert main(["quantize", str(model), "--calibration", str(tmp_path / "cal.npz"), "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "the generic (detected) quantization recipe finds no layer to quantize" in err and "Gather" in err
    assert "internal error" not in err and not (tmp_path / "q").exists()
