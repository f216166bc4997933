import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgepack.calibration_data import TextSample
from edgepack.exporters.onnx import ExportMismatchError, ExportOptions, export_onnx
from edgepack.models import get_adapter
from edgepack.models.torch_module import InputSpec

SENTENCES = [TextSample(t) for t in ("The train leaves at noon.", "Whisk the eggs before adding flour to the bowl.",
                                     "How do I reset my password?", "Rain is expected tomorrow afternoon.")]


def test_hf_encoder_export_matches_torch_with_dynamic_axes(tiny_bert_dir, tmp_path):
    adapter = get_adapter("hf-encoder", str(tiny_bert_dir))
    feeds = list(adapter.feeds(SENTENCES, batch_size=1))
    metrics = export_onnx(adapter, tmp_path / "model.onnx", check_feeds=feeds)
    assert metrics["opset"] == 17
    assert metrics["check"]["sentence_embedding"]["max_abs_diff"] < 1e-5
    assert metrics["check"]["sentence_embedding"]["cosine_min"] > 0.99999
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert model.opset_import[0].version == 17
    # dynamic batch and sequence: a batch of 3 padded to the longest runs and matches torch
    batch = next(adapter.feeds(SENTENCES[:3], batch_size=3, padding="longest"))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["sentence_embedding"], batch)[0]
    with torch.no_grad():
        want = adapter.load_torch()(*(torch.from_numpy(batch[n]) for n in adapter.input_names))[1].numpy()
    assert got.shape == (3, 32)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # the all-MiniLM head: mean pooling then L2 normalisation
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_export_mismatch_lists_every_output(tiny_bert_dir, tmp_path):
    adapter = get_adapter("hf-encoder", str(tiny_bert_dir))
    feeds = list(adapter.feeds(SENTENCES, batch_size=1))
    with pytest.raises(ExportMismatchError) as err:
        export_onnx(adapter, tmp_path / "model.onnx", check_feeds=feeds, options=ExportOptions(atol=1e-12))
    message = str(err.value)
    assert "last_hidden_state: max |diff|" in message and "sentence_embedding: max |diff|" in message
    assert "(atol 1e-12)" in message


def test_torch_module_export(tmp_path):
    adapter = get_adapter("torch-module", "tests.tiny_models:make_cnn",
                          inputs=[InputSpec("pixel_values", (1, 3, 16, 16))], outputs=["logits"])
    rng = np.random.default_rng(0)
    samples = [{"pixel_values": rng.standard_normal((3, 16, 16)).astype(np.float32)} for _ in range(4)]
    metrics = export_onnx(adapter, tmp_path / "cnn.onnx", check_feeds=list(adapter.feeds(samples)))
    assert metrics["check"]["logits"]["max_abs_diff"] < 1e-5
    assert metrics["parameters"] == sum(p.numel() for p in adapter.load_torch().parameters())
    session = ort.InferenceSession(str(tmp_path / "cnn.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {"pixel_values": rng.standard_normal((5, 3, 16, 16)).astype(np.float32)})[0]
    assert out.shape == (5, 10)


def test_torch_module_sample_shape_mismatch_names_input():
    adapter = get_adapter("torch-module", "tests.tiny_models:make_cnn",
                          inputs=[InputSpec("pixel_values", (1, 3, 16, 16))], outputs=["logits"])
    with pytest.raises(Exception, match=r"input 'pixel_values': sample 0 has shape \[3, 8, 8\]"):
        list(adapter.feeds([{"pixel_values": np.zeros((3, 8, 8), np.float32)}]))
