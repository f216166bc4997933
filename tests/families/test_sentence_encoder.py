"""Family sentence-encoder on a tiny real BERT (MiniLM's tokenizer and pooling files): export, metric, quantize."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgepack import stages
from edgepack.calibration_data import TextSample, read_samples
from edgepack.exporters.onnx import ExportMismatchError, ExportOptions, export_onnx
from edgepack.families import open_model
from edgepack.families.sentence_encoder import paraphrase_retrieval
from edgepack.recipe import ExportSection, QuantizeSection

FAMILY = "sentence-encoder"
SENTENCES = [TextSample(t) for t in ("The train leaves at noon.", "Whisk the eggs before adding flour to the bowl.",
                                     "How do I reset my password?", "Rain is expected tomorrow afternoon.")]


def test_export_matches_torch_with_dynamic_axes(tiny_bert_dir, tmp_path):
    family = open_model(str(tiny_bert_dir))
    assert family.name == FAMILY and (family.pooling, family.normalize) == ("mean", True)
    feeds = list(family.feeds(SENTENCES, batch_size=1))
    metrics = export_onnx(family, tmp_path / "model.onnx", check_feeds=feeds)
    assert metrics["opset"] == 17
    assert metrics["check"]["sentence_embedding"]["max_abs_diff"] < 1e-5
    assert metrics["check"]["sentence_embedding"]["cosine_min"] > 0.99999
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    hidden = model.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in hidden] == ["batch", "sequence", 32]  # only the stated axes move
    # dynamic batch and sequence: a batch of 3 padded to the longest runs and matches torch
    batch = next(family.feeds(SENTENCES[:3], batch_size=3, padding="longest"))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["sentence_embedding"], batch)[0]
    with torch.no_grad():
        want = family.load_torch()(*(torch.from_numpy(batch[n]) for n in family.io.input_names))[1].numpy()
    assert got.shape == (3, 32)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # mean pooling, then L2 normalised


def test_export_mismatch_lists_every_output(tiny_bert_dir, tmp_path):
    family = open_model(str(tiny_bert_dir))
    feeds = list(family.feeds(SENTENCES, batch_size=1))
    with pytest.raises(ExportMismatchError) as err:
        export_onnx(family, tmp_path / "model.onnx", check_feeds=feeds, options=ExportOptions(atol=1e-12))
    message = str(err.value)
    assert "last_hidden_state: max |diff|" in message and "sentence_embedding: max |diff|" in message
    assert "(atol 1e-12)" in message


def test_export_folder_carries_its_preprocessing_and_reopens_as_the_family(tiny_bert_dir, tmp_path):
    family = open_model(str(tiny_bert_dir), options={"pooling": "cls"})
    result = stages.export(family, check_samples=SENTENCES, options=ExportSection(), max_length=64,
                           folder=tmp_path / "exported")
    files = {p.relative_to(result.folder).as_posix() for p in result.folder.rglob("*") if p.is_file()}
    assert {"model.onnx", "manifest.json", "tokenizer.json", "config.json", "1_Pooling/config.json"} <= files
    assert result.manifest["model"] == {"family": FAMILY, "task": "feature-extraction", "primary_output":
                                        "sentence_embedding", "options": {"pooling": "cls", "normalize": True}}
    again = open_model(str(result.folder / "model.onnx"))  # no tokenizer given: it is beside the model
    assert (again.name, again.pooling, again.source.kind) == (FAMILY, "cls", "onnx")
    feed = next(again.feeds(SENTENCES[:1]))
    assert list(feed) == ["input_ids", "attention_mask", "token_type_ids"] and feed["input_ids"][0, 0] == 101
    with pytest.raises(Exception, match="is already ONNX"):
        again.load_torch()


def test_metric_paraphrase_retrieval_numbers():
    def outputs(texts: np.ndarray, pairs: np.ndarray) -> list[dict[str, np.ndarray]]:
        return [{"e": row[None]} for row in np.concatenate([texts, pairs])]

    texts = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    samples = [TextSample("t", "p")] * 3
    perfect = paraphrase_retrieval(outputs(texts, texts), samples, output="e")
    assert perfect["paraphrase_recall_at_1"] == 1.0 and perfect["paraphrase_mrr"] == 1.0
    # margin of text 0: cos 1 to its pair, best other cos(e0, e0+e1) = 0.7071
    assert perfect["paraphrase_margin"] == pytest.approx(1 - 0.70710678)
    swapped = paraphrase_retrieval(outputs(texts, texts[[1, 0, 2]]), samples, output="e")
    assert swapped["paraphrase_recall_at_1"] == pytest.approx(1 / 3) and swapped["paraphrase_margin"] < 0
    assert paraphrase_retrieval([{"e": r[None]} for r in np.eye(2)], [TextSample("a"), TextSample("b")],
                                output="e") == {}


def test_metric_latency_feed_is_exactly_the_sequence_length(tiny_bert_dir):
    family = open_model(str(tiny_bert_dir))
    feed = family.latency_feed([TextSample("a short sentence to repeat " * 10)], sequence_length=32)
    assert feed["input_ids"].shape == (1, 32) and feed["attention_mask"].sum() == 32


def test_quantize_through_the_stage_keeps_the_embedding(tiny_bert_dir, small_sentences, tmp_path):
    family = open_model(str(tiny_bert_dir))
    samples = read_samples(small_sentences)
    exported = stages.export(family, check_samples=samples[:4], options=ExportSection(), max_length=64,
                             root=tmp_path)
    artifact = open_model(str(exported.folder / "model.onnx"))
    result = stages.quantize(exported.folder / "model.onnx", artifact, calibration=samples[:24],
                             options=QuantizeSection(max_cosine_drop=None), max_length=64, padding="longest",
                             root=tmp_path)
    assert result.manifest["config"]["recipe"] == "transformer-encoder"  # the family's quantization recipe
    ops = {n.op_type for n in onnx.load(str(result.folder / "model.onnx")).graph.node}
    assert result.manifest["config"]["graph"] == "fused"  # graph auto on the CPU EP: ORT's fused integer kernels
    assert {"QuantizeLinear", "QAttention", "QEmbedLayerNormalization"} <= ops  # the word table is INT8 too
    fp32 = ort.InferenceSession(str(exported.folder / "model.onnx"))
    int8 = ort.InferenceSession(str(result.folder / "model.onnx"))
    feeds = list(artifact.feeds(samples[30:40]))
    ref = [{"sentence_embedding": fp32.run(["sentence_embedding"], f)[0]} for f in feeds]
    got = [{"sentence_embedding": int8.run(["sentence_embedding"], f)[0]} for f in feeds]
    assert artifact.fidelity(ref, got)["cosine_mean"] > 0.95
    assert open_model(str(result.folder / "model.onnx")).name == FAMILY  # the INT8 folder reopens too


def _weight_only(tmp_path, tiny_bert_dir, small_sentences, **variant):
    """The tiny BERT exported, then one weight-only variant through the stage; (fp32 folder, stage, family)."""
    from edgepack.quantization.weight_only_config import WeightOnlySection, WeightOnlyVariant

    family = open_model(str(tiny_bert_dir))
    samples = read_samples(small_sentences)
    exported = stages.export(family, check_samples=samples[:4], options=ExportSection(), max_length=64,
                             root=tmp_path)
    artifact = open_model(str(exported.folder / "model.onnx"))
    section = WeightOnlySection(calibration_samples=24)
    result = stages.quantize_weight_only(exported.folder / "model.onnx", artifact, calibration=samples[:24],
                                         section=section, variant=WeightOnlyVariant(**variant), root=tmp_path)
    return exported.folder, result, artifact


def _cosine(artifact, fp32_folder, model, samples):
    fp32 = ort.InferenceSession(str(fp32_folder / "model.onnx"))
    quantized = ort.InferenceSession(str(model))
    feeds = list(artifact.feeds(samples))
    ref = [{"sentence_embedding": fp32.run(["sentence_embedding"], f)[0]} for f in feeds]
    got = [{"sentence_embedding": quantized.run(["sentence_embedding"], f)[0]} for f in feeds]
    return artifact.fidelity(ref, got)["cosine_mean"]


def test_quantize_weight_only_int4_serves_the_encoder(tiny_bert_dir, small_sentences, tmp_path):
    """INT4 weight-only on an encoder: every MatMul becomes MatMulNBits, the embedding tables GatherBlockQuantized
    at their own bits (a per-part choice), and the embedding stays the FP32 one's (~2 s)."""
    fp32, result, artifact = _weight_only(tmp_path, tiny_bert_dir, small_sentences, name="int4", bits=4,
                                          block_size=16, method="rtn", embedding_bits=8)
    before = [n for n in onnx.load(str(fp32 / "model.onnx")).graph.node if n.op_type == "MatMul"]
    graph = onnx.load(str(result.folder / "model.onnx")).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    weights = {i.name for i in onnx.load(str(fp32 / "model.onnx")).graph.initializer}
    assert len(nbits) == sum(1 for n in before if n.input[1] in weights) == 12  # 2 layers x (Q, K, V, O, FFN x 2)
    assert {onnx.helper.get_attribute_value(a) for n in nbits for a in n.attribute if a.name == "bits"} == {4}
    tables = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(tables) == 3  # word, position, token type
    assert {onnx.helper.get_attribute_value(a) for n in tables for a in n.attribute if a.name == "bits"} == {8}
    # FP32 4.3 MB, the 30522 x 32 word table 90% of it: INT8 table + INT4 MatMuls ~0.31x (scales per 16 values)
    assert result.metrics["size_ratio"] < 0.4
    assert open_model(str(result.folder / "model.onnx")).name == FAMILY  # the folder reopens as the family
    assert _cosine(artifact, fp32, result.folder / "model.onnx", read_samples(small_sentences)[30:40]) > 0.99
    int4 = _weight_only(tmp_path, tiny_bert_dir, small_sentences, name="int4-all", bits=4, block_size=16,
                        method="rtn")[1]
    assert int4.metrics["size_ratio"] < result.metrics["size_ratio"] - 0.08  # the INT4 table: 4 bits fewer


def test_quantize_weight_only_mixed_plan_keeps_the_cosine_budget(tiny_bert_dir, small_sentences, tmp_path):
    """The family's weight-only fidelity is the embedding cosine: a budget no INT4 layer meets promotes every
    layer to INT8, a loose one promotes none (~3 s)."""
    assert open_model(str(tiny_bert_dir)).weight_only_fidelity == "cosine"
    plans = {}
    for drop in (1e-9, 0.5):
        _, result, _ = _weight_only(tmp_path, tiny_bert_dir, small_sentences, name="mixed", bits=4, block_size=16,
                                    method="rtn", mixed={"max_cosine_drop": drop})
        mixed = result.metrics["mixed"]
        assert mixed["fidelity"] == "cosine" and mixed["units"] == 2  # layer.0, layer.1
        plans[drop] = mixed
    assert sorted(plans[1e-9]["promoted"]) == ["layer.0", "layer.1"]
    assert plans[0.5]["promoted"] == [] and plans[0.5]["met_on_calibration"]
    assert 0.5 < plans[0.5]["calibration_cosine_fake_quant"] <= 1.0
